#!/usr/bin/env python
"""Cost of holding a mask during training: HoldMaskCallback's re-masking (uint8 masks, one byte per
prunable weight) against a training step without it, and against the float masks it replaced
(four bytes per weight, the named baseline), in one run.

    python bench/bench_mask_hold.py --width 300m          # XLS-R 300M widths, 4 layers, CPU
    python bench/bench_mask_hold.py --width 2b            # XLS-R 2B widths (hidden 1920, ffn 7680)
    python bench/bench_mask_hold.py --width 2b --layers 48 --device cuda --bf16 --seconds 10

Random-init model (nothing downloaded), synthetic clips, AdamW. Re-masking is per weight, so its
share of a step does not depend on the layer count; the target is under 2% of a step.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.pruning import compute_masks, prunable_parameters  # noqa: E402
from utils.training import HoldMaskCallback  # noqa: E402

WIDTHS = {"300m": (1024, 16, 4096), "2b": (1920, 16, 7680)}


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", choices=list(WIDTHS), default="300m")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=2.0, help="clip length")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    hidden, heads, ffn = WIDTHS[args.width]
    config = Wav2Vec2Config(hidden_size=hidden, num_hidden_layers=args.layers, num_attention_heads=heads, intermediate_size=ffn, conv_dim=(512,) * 7,
                            feat_extract_norm="layer", do_stable_layer_norm=True, vocab_size=40, mask_time_prob=0.0, ctc_loss_reduction="mean")
    model = Wav2Vec2ForCTC(config).to(args.device).train()
    model.freeze_feature_encoder()
    mask = compute_masks(prunable_parameters(model), [0.8])[0.8]
    hold = HoldMaskCallback(mask)
    hold.on_train_begin(None, None, None, model=model)
    params = hold._params
    floats = [f.to(p.dtype) for f, p in zip(hold._factors, params)]  # the baseline: the float masks held before
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    inputs = torch.randn(args.batch, int(args.seconds * 16000), device=args.device)
    labels = torch.randint(1, 40, (args.batch, int(args.seconds * 10)), device=args.device)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    def timed(fn) -> float:
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    def step():
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.bf16):
            loss = model(inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    timed(step)  # warm-up
    steps = [timed(step) for _ in range(args.steps)]
    with torch.no_grad():
        held = [timed(lambda: hold.on_optimizer_step(None, None, None)) for _ in range(args.steps * 3)]
        float_held = [timed(lambda: torch._foreach_mul_(params, floats)) for _ in range(args.steps * 3)]
    assert all(torch.all(p.detach()[~k.to(p.device)] == 0) for p, k in zip(params, mask.values()))
    weights = sum(k.numel() for k in mask.values())
    mask_bytes = sum(f.numel() * f.element_size() for f in hold._factors)
    step_s, ours, base = median(steps), median(held), median(float_held)
    print(f"{args.width} widths, {args.layers} layers, {weights:,} masked weights, batch {args.batch} x {args.seconds:.0f} s, "
          f"{args.device}{' bf16' if args.bf16 else ''}, {torch.get_num_threads()} threads")
    print(f"median training step (no re-masking)          {step_s * 1000:9.1f} ms")
    print(f"re-masking, uint8 masks (ours)                {ours * 1000:9.2f} ms = {ours / step_s:.2%} of a step (target < 2%); "
          f"{mask_bytes / weights:.0f} byte/weight, {mask_bytes / 2**20:,.0f} MB")
    print(f"re-masking, float masks (baseline)            {base * 1000:9.2f} ms = {base / step_s:.2%} of a step; "
          f"{4 * weights / 2**20:,.0f} MB; ours/baseline time {ours / base:.2f}x, memory 0.25x")


if __name__ == "__main__":
    main()
