#!/usr/bin/env python
"""Pruning a checkpoint on disk, whole process: run_prune.py (pruning from the checkpoint's files)
against the same tickets written by loading the model, against torch.nn.utils.prune in a plain
load-prune-save script, and against copying the checkpoint with ``cp -r`` (the floor: reading and
writing it once).

    python bench/bench_prune_files.py                       # XLS-R 300M shape
    python bench/bench_prune_files.py --shapes 300m 1b 2b   # torch.nn.utils.prune only where it fits in memory

Each command runs in its own process on a random-init checkpoint of the real shape (nothing
downloaded), written first into --workdir; every run reads it from a warm page cache (cp runs
first and warms it). Wall time and peak RSS come from the kernel's accounting of the child
(``os.wait4``: the figure GNU time prints, file-backed pages included). Prints ratios against
torch.nn.utils.prune and against cp measured in the same run.
"""

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench_prune import SHAPES  # bench/ is the script directory

ROOT = Path(__file__).resolve().parents[1]
TORCH_PRUNE_FITS = {"300m"}  # it needs ~16.5 GB at 300M; 1B would need ~55 GB
MODEL_PATH_FITS = {"300m", "1b"}  # loading the 2B model, its masks and scores would take most of a 24 GiB machine

MAKE = """
import sys
from transformers import Wav2Vec2FeatureExtractor
sys.path.insert(0, {bench!r})
from bench_prune import random_model
random_model({shape!r}).save_pretrained({out!r})
Wav2Vec2FeatureExtractor().save_pretrained({out!r})
"""

BY_MODEL = """
import sys
from pathlib import Path
sys.path.insert(0, {root!r})
from utils.tickets import PruneSpec, build_tickets
build_tickets({src!r}, "main", {{0.8: Path({out!r})}}, PruneSpec(), "en", from_files=False)
"""

TORCH_PRUNE = """
import sys
import torch.nn.utils.prune as prune
from transformers import AutoFeatureExtractor, AutoModelForCTC
sys.path.insert(0, {root!r})
from utils.pruning import prunable_parameters
model = AutoModelForCTC.from_pretrained({src!r})
modules = dict(model.named_modules())
targets = [(modules[name.rsplit(".", 1)[0]], "weight") for name in prunable_parameters(model)]
prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=0.8)
for module, name in targets:
    prune.remove(module, name)
model.save_pretrained({out!r})
AutoFeatureExtractor.from_pretrained({src!r}).save_pretrained({out!r})
"""


def measure(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{cmd[:3]} failed: {proc.stderr.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss * 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["300m"], choices=[s for s in SHAPES if s != "w2v-bert-600m"])
    parser.add_argument("--workdir", default="/tmp/bench-prune-files", help="where checkpoints and tickets are written (the disk measured)")
    args = parser.parse_args()
    work = Path(args.workdir)
    print("whole process, warm page cache; peak RSS as GNU time reports it")
    print(f"{'shape':6} {'command':40} {'seconds':>8} {'peak RSS':>10}")
    for shape in args.shapes:
        shutil.rmtree(work, ignore_errors=True)
        src = work / "checkpoint"
        subprocess.run([sys.executable, "-c", MAKE.format(bench=str(ROOT / "bench"), shape=shape, out=str(src))], check=True, capture_output=True)
        size = sum(p.stat().st_size for p in src.iterdir())
        runs = {"cp -r (the floor)": ["cp", "-r", str(src), str(work / "copy")]}
        runs["run_prune.py (from the files)"] = [sys.executable, "run_prune.py", "--model_name_or_path", str(src), "--language", "en",
                                                 "--sparsity", "0.8", "--output_dir", str(work / "ticket")]
        if shape in MODEL_PATH_FITS:
            runs["build_tickets by loading the model"] = [sys.executable, "-c", BY_MODEL.format(root=str(ROOT), src=str(src), out=str(work / "by-model"))]
        if shape in TORCH_PRUNE_FITS:
            runs["torch.nn.utils.prune, load-prune-save"] = [sys.executable, "-c", TORCH_PRUNE.format(root=str(ROOT), src=str(src), out=str(work / "torch"))]
        results = {}
        for label, cmd in runs.items():
            results[label] = measure(cmd)
            print(f"{shape:6} {label:40} {results[label][0]:8.1f} {results[label][1] / 1e9:8.2f} GB", flush=True)
        ours, copy = results["run_prune.py (from the files)"], results["cp -r (the floor)"]
        print(f"{shape:6} checkpoint {size / 1e9:.2f} GB; run_prune.py takes {ours[0] / copy[0]:.1f}x the time of cp (target <= 2x)")
        if "build_tickets by loading the model" in results:
            model = results["build_tickets by loading the model"]
            print(f"{shape:6} loading the model takes {model[0] / ours[0]:.1f}x the time and {model[1] / ours[1]:.1f}x the peak memory of run_prune.py")
        if "torch.nn.utils.prune, load-prune-save" in results:
            base = results["torch.nn.utils.prune, load-prune-save"]
            print(f"{shape:6} against torch.nn.utils.prune: {base[0] / ours[0]:.1f}x faster (target >= 10x), "
                  f"{base[1] / ours[1]:.1f}x less peak memory (target >= 10x)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
