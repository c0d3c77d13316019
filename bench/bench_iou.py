#!/usr/bin/env python
"""IoU matrix of ten XLS-R-300M-sized masks: our packed-bit path vs torch bool tensors pair by
pair (the baseline), each in its own process, loading the files included.

    python bench/bench_iou.py              # 10 masks, 144 tensors, 301,989,888 weights each
    python bench/bench_iou.py --device cuda

Masks are random at 80% sparsity, written once to a temporary folder as mask.safetensors files
(zstd). "extra peak" is the peak resident memory above the process's state before loading.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from procmem import reset_peak, rss_bytes  # bench/ is the script directory

ROOT = Path(__file__).resolve().parents[1]
LAYERS, HIDDEN, FFN = 24, 1024, 4096


def shapes() -> dict[str, tuple[int, int]]:
    out = {}
    for i in range(LAYERS):
        for m in ("k_proj", "v_proj", "q_proj", "out_proj"):
            out[f"wav2vec2.encoder.layers.{i}.attention.{m}.weight"] = (HIDDEN, HIDDEN)
        out[f"wav2vec2.encoder.layers.{i}.feed_forward.intermediate_dense.weight"] = (FFN, HIDDEN)
        out[f"wav2vec2.encoder.layers.{i}.feed_forward.output_dense.weight"] = (HIDDEN, FFN)
    return out


def make_masks(folder: Path, count: int) -> list[Path]:
    import torch

    from utils.masks import Mask

    paths = []
    for k in range(count):
        generator = torch.Generator().manual_seed(k)
        mask = {name: torch.rand(shape, generator=generator) >= 0.8 for name, shape in shapes().items()}
        paths.append(folder / f"mask{k}.safetensors")
        Mask.save(paths[-1], mask, {"sparsity": 0.8, "scope": "encoder_linear"})
    return paths


def worker(method: str, paths: list[str], device: str) -> dict:
    import torch  # noqa: F401  (imported before the baseline memory reading, for both methods)

    from utils.iou import iou_tables
    from utils.masks import Mask

    base = rss_bytes("VmRSS")
    reset_peak()
    start = time.perf_counter()
    if method == "packed":
        overall, _ = iou_tables([Mask.load(p, str(i)) for i, p in enumerate(paths)])
        values = {(r["a"], r["b"]): r["iou"] for r in overall}
    else:
        masks = [{k: v.to(device) for k, v in Mask.load(p).bools().items()} for p in paths]
        values = {}
        for i in range(len(masks)):
            for j in range(i + 1, len(masks)):
                inter = sum(int((masks[i][n] & masks[j][n]).sum()) for n in masks[i])
                union = sum(int((masks[i][n] | masks[j][n]).sum()) for n in masks[i])
                values[(str(i), str(j))] = inter / union
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "extra_peak_bytes": rss_bytes("VmHWM") - base, "values": {f"{a},{b}": v for (a, b), v in values.items()}}


def run(method: str, paths: list[Path], device: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, device, *map(str, paths)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    sys.path.insert(0, str(ROOT))
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2], sys.argv[4:], sys.argv[3])))
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--device", default="cpu", help="device of the torch bool baseline")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        paths = make_masks(Path(folder), args.count)
        ours, base = run("packed", paths, args.device), run("torch-bool", paths, args.device)
    assert all(abs(ours["values"][k] - base["values"][k]) < 1e-12 for k in base["values"])
    n = args.count * (args.count - 1) // 2
    print(f"{args.count} masks x 301,989,888 weights, {n} pairs, files loaded included")
    print(f"packed bits (ours)      {ours['seconds']:7.2f} s  extra peak {ours['extra_peak_bytes'] / 2**20:7.0f} MB")
    print(f"torch bool, pair by pair {base['seconds']:6.2f} s  extra peak {base['extra_peak_bytes'] / 2**20:7.0f} MB ({args.device})")
    print(f"speed-up {base['seconds'] / ours['seconds']:.1f}x (target >= 20x); ours under 2 s: {ours['seconds'] < 2}; under 500 MB: {ours['extra_peak_bytes'] < 500 * 2**20}")


if __name__ == "__main__":
    main()
