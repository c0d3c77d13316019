#!/usr/bin/env python
"""GPU check, one script, under 8 minutes on one GPU (never needed by the tests):

    python bench/gpu_check.py                       # XLS-R-300M shape, bf16, on cuda
    python bench/gpu_check.py --device cpu --smoke  # a seconds-long run of the same code on CPU

Prints, for a random-init XLS-R-300M-shaped Wav2Vec2ForCTC (nothing downloaded):
- bf16 fine-tuning throughput in audio-seconds per second, FLOPs per step (counted by
  torch.utils.flop_counter) and the MFU estimate against ``--peak_tflops`` (dense bf16 of the chip);
- peak GPU memory;
- the step time with and without holding an 80% mask (HoldMaskCallback's re-masking), and the ratio;
- the exact global prune of the 302M in-scope weights on the GPU;
- a 10x10 IoU matrix of 80% masks: ours (packed bits, numpy) against torch bool tensors on the GPU.
"""

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0, help="clip length")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--peak_tflops", type=float, default=989.0, help="dense bf16 peak of the chip (H100/H200 SXM: 989)")
    parser.add_argument("--smoke", action="store_true", help="a 2-layer model, 2 short clips, 3 steps: checks the script runs")
    args = parser.parse_args()

    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    from utils.iou import iou_tables
    from utils.masks import Mask
    from utils.pruning import compute_masks, prunable_parameters
    from utils.training import HoldMaskCallback

    layers = 2 if args.smoke else 24
    batch, seconds, steps = (2, 1.0, 3) if args.smoke else (args.batch, args.seconds, args.steps)
    config = Wav2Vec2Config(hidden_size=1024, num_hidden_layers=layers, num_attention_heads=16, intermediate_size=4096, conv_dim=(512,) * 7,
                            feat_extract_norm="layer", do_stable_layer_norm=True, vocab_size=40, mask_time_prob=0.05, layerdrop=0.0,
                            ctc_zero_infinity=True, pad_token_id=0)
    torch.manual_seed(0)
    model = Wav2Vec2ForCTC(config).to(args.device)
    model.freeze_feature_encoder()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    samples = int(seconds * 16000)
    inputs = {"input_values": torch.randn(batch, samples, device=args.device),
              "labels": torch.randint(1, 40, (batch, int(seconds * 15)), device=args.device)}
    autocast = torch.autocast(device_type=args.device.split(":")[0], dtype=torch.bfloat16)

    def step():
        with autocast:
            loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    params = prunable_parameters(model)
    mask = compute_masks({n: p.detach() for n, p in params.items()}, [0.8])[0.8]
    hold = HoldMaskCallback(mask)
    hold.on_train_begin(None, None, None, model=model)

    def timed(with_mask: bool) -> float:
        for _ in range(2):  # warm-up
            step()
            if with_mask:
                hold.on_optimizer_step(None, None, None)
        _sync(args.device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
            if with_mask:
                hold.on_optimizer_step(None, None, None)
        _sync(args.device)
        return (time.perf_counter() - start) / steps

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    plain, masked = timed(False), timed(True)
    peak_gb = torch.cuda.max_memory_allocated() / 1024**3 if args.device.startswith("cuda") else float("nan")
    out = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
        "layers": layers, "batch": batch, "clip_seconds": seconds,
        "step_s": round(plain, 4), "audio_seconds_per_s": round(batch * seconds / plain, 1),
        "tflops_per_step": round(flops / 1e12, 3), "mfu": round(flops / plain / (args.peak_tflops * 1e12), 4),
        "peak_gpu_memory_gb": round(peak_gb, 2),
        "step_with_mask_hold_s": round(masked, 4), "mask_hold_overhead": round(masked / plain - 1, 4),
    }

    # Pruning: the exact global threshold over the encoder's 302M weights, on this device.
    _sync(args.device)
    start = time.perf_counter()
    compute_masks({n: p.detach() for n, p in params.items()}, [0.8])
    _sync(args.device)
    out["prune_s"] = round(time.perf_counter() - start, 2)

    # 10x10 IoU: ten random masks of this scope, packed on disk, ours vs torch bool on the device.
    import tempfile

    shapes = {n: tuple(p.shape) for n, p in params.items()}
    model = optimizer = params = mask = hold = None  # free the training state before the IoU part
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(10):
            rng = np.random.default_rng(i)
            m = {n: torch.from_numpy(rng.random(s, dtype=np.float32) >= 0.8) for n, s in shapes.items()}
            paths.append(str(Path(tmp) / f"m{i}.safetensors"))
            Mask.save(paths[-1], m, {"sparsity": 0.8, "scope": "encoder_linear"}, compress=False)
        start = time.perf_counter()
        overall, _ = iou_tables([Mask.load(p, f"m{i}") for i, p in enumerate(paths)])
        out["iou_10x10_ours_s"] = round(time.perf_counter() - start, 2)

        start = time.perf_counter()
        bools = [{n: t.to(args.device) for n, t in Mask.load(p).bools().items()} for p in paths]
        values = []
        for i in range(10):
            for j in range(i + 1, 10):
                inter = sum(int((bools[i][n] & bools[j][n]).sum()) for n in shapes)
                union = sum(int((bools[i][n] | bools[j][n]).sum()) for n in shapes)
                values.append(inter / union)
        _sync(args.device)
        out["iou_10x10_torch_bool_s"] = round(time.perf_counter() - start, 2)
        out["iou_max_abs_difference"] = max(abs(a - b["iou"]) for a, b in zip(values, overall))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
