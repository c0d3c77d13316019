#!/usr/bin/env python
"""How fast the command line answers: each script's ``--help``, the grid's ``--status`` and
``--dry_run``, against the baseline of importing torch, transformers and datasets (what every one
of them paid before they imported only what they need), measured in the same run.

    python bench/bench_cli.py            # median of 5 runs each; target: under 1 s for the light ones

A fresh interpreter per run; the page cache is warm (the first, discarded run warms it).
"""

import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {
    "baseline: import torch, transformers, datasets": ["-c", "import torch, transformers, datasets; transformers.TrainingArguments"],
    "run_prune.py --help": ["run_prune.py", "--help"],
    "run_iou.py --help": ["run_iou.py", "--help"],
    "run_grid.py --help": ["run_grid.py", "--help"],
    "run_grid.py --status (demo)": ["run_grid.py", "--config", "configs/demo.yaml", "--status"],
    "run_grid.py --dry_run (demo)": ["run_grid.py", "--config", "configs/demo.yaml", "--dry_run"],
    "run_finetune.py --help": ["run_finetune.py", "--help"],
    "run_transfer.py --help": ["run_transfer.py", "--help"],
    "run_pretrain.py --help": ["run_pretrain.py", "--help"],
}
LIGHT = ("run_prune.py --help", "run_iou.py --help", "run_grid.py --help", "run_grid.py --status (demo)")


def seconds(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, *argv], cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - start


def main():
    runs = 5
    baseline = None
    print(f"{'command':48} {'median s':>9} {'of baseline':>12}")
    for label, argv in COMMANDS.items():
        seconds(argv)  # warm the page cache
        median = statistics.median(seconds(argv) for _ in range(runs))
        baseline = baseline or median
        target = "  (target < 1 s)" if label in LIGHT else ""
        print(f"{label:48} {median:9.2f} {median / baseline:11.2f}x{target}", flush=True)


if __name__ == "__main__":
    main()
