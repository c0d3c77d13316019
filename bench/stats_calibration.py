#!/usr/bin/env python
"""Calibration of the study intervals (utils/stats.py) on simulated studies with a known truth
(tests/simulation.py): coverage and mean width of the 95% intervals of one cell's CER and of a
paired difference, for 2, 3 and 5 seeds with training noise absent, moderate and large, beside the
same intervals with Welch-Satterthwaite degrees of freedom (the alternative that was not chosen),
and the share of transfer tables with any mark when no ticket differs (Holm over each table).
Prints the markdown tables of docs/statistics.md.

    python bench/stats_calibration.py              # 2,000 studies per row, about a minute
"""

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy.special import stdtrit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import result_row  # noqa: E402
from tests.simulation import NOISE_LEVELS, simulate  # noqa: E402
from utils.report import paired_table  # noqa: E402
from utils.stats import Interval, cell_interval, difference_interval  # noqa: E402


def satterthwaite(ci: Interval, cells: list, weights: list[float]) -> Interval:
    """The same standard error with Welch-Satterthwaite degrees of freedom (seeds k - 1, utterances n - 1)."""
    per_seed = sum(w * c.per_seed() for w, c in zip(weights, cells))
    z = sum(w * c.contributions().mean(axis=0) for w, c in zip(weights, cells))
    k, n = len(per_seed), z.size
    seed_part, test_part = per_seed.var(ddof=1) / k, z.var(ddof=1) / n
    df = (seed_part + test_part) ** 2 / (seed_part**2 / (k - 1) + test_part**2 / (n - 1))
    half = stdtrit(df, 0.975) * ci.se
    return Interval(ci.estimate, ci.estimate - half, ci.estimate + half, ci.se, df, k)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=2000, help="simulated studies per row")
    parser.add_argument("--utterances", type=int, default=100)
    args = parser.parse_args()
    print(f"{args.studies} simulated studies per row, {args.utterances} test utterances; true CER 40% and 45%.\n")
    print("| seeds | training noise (sd) | cell: coverage | cell: mean width (pp) | difference: coverage | difference: mean width (pp) "
          "| Welch-Satterthwaite df: cell / difference coverage |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for seeds in (2, 3, 5):
        for name, tau in NOISE_LEVELS.items():
            rng = np.random.default_rng(1000 * seeds + int(1000 * tau))
            hits, widths, welch = np.zeros(2), np.zeros(2), np.zeros(2)
            for _ in range(args.studies):
                cells = simulate(rng, seeds, args.utterances, tau, {"a": 0.40, "b": 0.45})
                cell = cell_interval(cells["a"])
                diff = difference_interval({"t": cells["a"]}, {"t": cells["b"]})
                for i, (ci, truth, parts) in enumerate(((cell, 0.40, ([cells["a"]], [1.0])), (diff, -0.05, ([cells["a"], cells["b"]], [1.0, -1.0])))):
                    hits[i] += ci.low <= truth <= ci.high
                    widths[i] += ci.high - ci.low
                    alt = satterthwaite(ci, *parts)
                    welch[i] += alt.low <= truth <= alt.high
            hits, widths, welch = hits / args.studies, 100 * widths / args.studies, welch / args.studies
            print(f"| {seeds} | {name} ({tau:.2f}) | {hits[0]:.3f} | {widths[0]:.2f} | {hits[1]:.3f} | {widths[1]:.2f} | {welch[0]:.3f} / {welch[1]:.3f} |")
    tickets, downstream = ["en", "de", "es"], ["ca", "fr"]
    names = [f"{u}->{d}" for u in tickets for d in downstream]
    print("\n| seeds | training noise (sd) | tables | with any mark (no true difference) |")
    print("|---:|---|---:|---:|")
    for seeds in (3, 5):
        for name, tau in NOISE_LEVELS.items():
            rng = np.random.default_rng(7 + seeds + int(1000 * tau))
            marked = 0
            tables = args.studies // 4
            for _ in range(tables):
                cells = simulate(rng, seeds, 60, tau, {n: 0.45 for n in names}, {n: n.split("->")[1] for n in names})
                rows = [result_row(*n.split("->"), 0.8, cells[n].edits[s].astype(int).tolist(), cells[n].lengths[s].astype(int).tolist(), seed=s)
                        for n in names for s in range(seeds)]
                marked += any(v["marked"] for v in paired_table(rows, 0.8, tickets, downstream)[1]["family"].values())
            print(f"| {seeds} | {name} ({tau:.2f}) | {tables} | {marked / tables:.3f} |")


if __name__ == "__main__":
    main()
