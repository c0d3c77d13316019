#!/usr/bin/env python
"""Pruning speed and memory: our exact global threshold vs torch.nn.utils.prune.global_unstructured.

    python bench/bench_prune.py                 # XLS-R 300M shape with both methods; 1B, 2B and w2v-BERT 2.0 (ours)
    python bench/bench_prune.py --shapes 300m   # one shape
    python bench/bench_prune.py --device cuda   # on a GPU

Random-init models of the real shapes (nothing downloaded). Each method runs in its own process;
"extra peak" is the peak resident memory (CPU, VmHWM reset before the call) or peak CUDA memory
above what the model itself holds. Prints ratios against torch.nn.utils.prune measured in the
same run. torch.nn.utils.prune is not run on the 2B shape: it would need ~50 GB extra.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from procmem import reset_peak, rss_bytes  # bench/ is the script directory

ROOT = Path(__file__).resolve().parents[1]
_XLSR = dict(conv_dim=(512,) * 7, feat_extract_norm="layer", do_stable_layer_norm=True, model_type="wav2vec2")
SHAPES = {  # published sizes; the scope (which tensors) comes from utils.structure
    "300m": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, **_XLSR),
    "1b": dict(hidden_size=1280, num_hidden_layers=48, num_attention_heads=16, intermediate_size=5120, **_XLSR),
    "2b": dict(hidden_size=1920, num_hidden_layers=48, num_attention_heads=16, intermediate_size=7680, **_XLSR),
    "w2v-bert-600m": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, conv_depthwise_kernel_size=31,
                          model_type="wav2vec2-bert"),
}


def random_model(shape: str, device: str = "cpu"):
    """A CTC model of a published shape with seeded N(0, 0.02) weights, allocated once (built on
    the meta device first)."""
    import torch
    from transformers import AutoConfig, AutoModelForCTC

    sizes = dict(SHAPES[shape])
    config = AutoConfig.for_model(sizes.pop("model_type"), vocab_size=32, **sizes)
    with torch.device("meta"):
        model = AutoModelForCTC.from_config(config)
    model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02, generator=generator)
    return model


def worker(shape: str, method: str, sparsity: float, device: str) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from utils.pruning import apply_mask, compute_masks, prunable_parameters

    model = random_model(shape, device)
    params = prunable_parameters(model)
    n = sum(p.numel() for p in params.values())
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes("VmRSS")
        reset_peak()
    start = time.perf_counter()
    if method == "ours":
        mask = compute_masks(params, [sparsity])[sparsity]
        apply_mask(model, mask)
    else:
        import torch.nn.utils.prune as prune

        modules = dict(model.named_modules())
        targets = [(modules[name.rsplit(".", 1)[0]], "weight") for name in params]
        prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=sparsity)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else rss_bytes("VmHWM")
    kept = sum(int((p != 0).sum()) for p in params.values()) if method == "ours" else None
    return {"shape": shape, "method": method, "weights": n, "seconds": seconds, "extra_peak_bytes": peak - base, "kept": kept}


def run(shape: str, method: str, sparsity: float, device: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", shape, method, str(sparsity), device]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        shape, method, sparsity, device = sys.argv[2:6]
        print(json.dumps(worker(shape, method, float(sparsity), device)))
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--sparsity", type=float, default=0.8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip_baseline", action="store_true")
    args = parser.parse_args()
    print(f"{'shape':13} {'method':22} {'weights':>13} {'seconds':>8} {'extra peak':>11}")
    for shape in args.shapes:
        ours = run(shape, "ours", args.sparsity, args.device)
        print(f"{shape:13} {'ours (exact, packed)':22} {ours['weights']:13,} {ours['seconds']:8.2f} {ours['extra_peak_bytes'] / 2**20:9.0f} MB")
        expected = ours["weights"] - round(args.sparsity * ours["weights"])
        assert ours["kept"] == expected, (ours["kept"], expected)
        if args.skip_baseline or shape != "300m":
            continue
        base = run(shape, "torch.nn.utils.prune", args.sparsity, args.device)
        print(f"{shape:13} {'torch.nn.utils.prune':22} {base['weights']:13,} {base['seconds']:8.2f} {base['extra_peak_bytes'] / 2**20:9.0f} MB")
        print(f"              speed-up {base['seconds'] / ours['seconds']:.1f}x (target >= 10x); "
              f"extra memory {ours['extra_peak_bytes'] / base['extra_peak_bytes']:.3f} of the baseline (target <= 0.05)")


if __name__ == "__main__":
    main()
