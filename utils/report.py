"""Tables and pictures: CSV files, the IoU heatmap and per-layer plot, CER-vs-sparsity curves, and
the study's REPORT.md, built only from what the runs wrote (no value is typed in).

Every CER comes with its 95% bootstrap interval over test utterances, recomputed from the
``predictions_test.jsonl`` each transfer wrote (see ``utils.stats``); every comparison the paper
makes is a paired difference with its interval; every IoU stands beside the random baseline, its
chance-corrected value and, with several seeds, the seed-to-seed IoU of the same language."""

from __future__ import annotations

import csv
import math
import os
from collections import defaultdict
from pathlib import Path
from statistics import mean, stdev
from typing import Optional

import numpy as np

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


from .errors import UsageError
from .iou import chance_corrected
from .runs import atomic_open
from .stats import CONFIDENCE, N_RESAMPLES, SEED, Interval, Rates, mean_rate_interval, paired_difference_interval, rate_interval

RESULT_COLUMNS = ["upstream", "downstream", "sparsity", "seed", "test_cer", "test_cer_low", "test_cer_high", "test_wer", "test_samples", "eval_loss",
                  "measured_sparsity", "mask_held", "epochs", "steps", "ticket", "wall_time_s"]
METHOD = (f"{CONFIDENCE:.0%} intervals: percentile bootstrap over test utterances ({N_RESAMPLES:,} resamples, seed {SEED}; "
          "scipy.stats.bootstrap), recomputed from each run's predictions_test.jsonl")


def write_csv_atomic(path: str | os.PathLike, rows: list[dict], columns: list[str]) -> None:
    with atomic_open(path, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def save_figure(fig, path: str | os.PathLike) -> None:
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format=Path(path).suffix.lstrip("."), dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_iou_heatmap(labels: list[str], matrix: list[list[float]], random_matrix: list[list[float]], title: str, path: str | os.PathLike) -> None:
    """Heatmap of the IoU matrix, each cell annotated with its IoU and the random baseline."""
    n = len(labels)
    fig, ax = plt.subplots(figsize=(1.2 * n + 2, 1.0 * n + 1.5))
    off_diagonal = [matrix[i][j] for i in range(n) for j in range(n) if i != j]
    low = min(off_diagonal) if off_diagonal else 0.0
    image = ax.imshow(matrix, cmap="viridis", vmin=max(0.0, low - 0.02), vmax=1.0)
    ax.set_xticks(range(n), labels)
    ax.set_yticks(range(n), labels)
    for i in range(n):
        for j in range(n):
            text = f"{matrix[i][j]:.3f}" if i == j else f"{matrix[i][j]:.3f}\n(rnd {random_matrix[i][j]:.3f})"
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if matrix[i][j] < (1 + low) / 2 else "black")
    fig.colorbar(image, ax=ax, label="IoU of kept weights")
    ax.set_title(title)
    save_figure(fig, path)


def plot_layer_iou(detail: list[dict], pairs: list[tuple[str, str]], title: str, path: str | os.PathLike) -> None:
    """IoU per encoder layer for the given pairs, with each pair's random baseline dashed."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for a, b in pairs:
        rows = [r for r in detail if r["group_kind"] == "layer" and r["group"].isdigit() and {r["a"], r["b"]} == {a, b}]
        rows.sort(key=lambda r: int(r["group"]))
        layers = [int(r["group"]) for r in rows]
        line = ax.plot(layers, [r["iou"] for r in rows], marker="o", label=f"{a} vs {b}")[0]
        ax.plot(layers, [r["random_iou"] for r in rows], linestyle="--", color=line.get_color(), alpha=0.5)
    _finish_layer_plot(fig, ax, "IoU (dashed: random masks of the same densities)", title, path)


def _finish_layer_plot(fig, ax, ylabel: str, title: str, path: str | os.PathLike) -> None:
    ax.set_xlabel("encoder layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=0)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def plot_noise_floor(layers: list[dict], title: str, path: str | os.PathLike) -> None:
    """Per-layer IoU of the same language across seeds (solid) against different languages of the
    same seed (dashed) and random masks (dotted)."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    groups = sorted({r["group"] for r in layers}, key=int)
    for kind, style in (("seed-to-seed", "-"), ("cross-language", "--")):
        by_label = defaultdict(lambda: defaultdict(list))
        for r in layers:
            if r["kind"] == kind:
                by_label[r["label"]][r["group"]].append(r["iou"])
        for label in sorted(by_label):
            ax.plot([int(g) for g in groups], [mean(by_label[label][g]) for g in groups], style, marker="o", label=f"{label}: {kind}")
    rnd = [mean(r["random_iou"] for r in layers if r["group"] == g) for g in groups]
    ax.plot([int(g) for g in groups], rnd, ":", color="grey", label="random masks")
    _finish_layer_plot(fig, ax, "IoU", title, path)


def plot_cer_curves(rows: list[dict], path: str | os.PathLike) -> None:
    """Mean test CER over non-matching downstream languages against sparsity, a line per upstream."""
    by_upstream = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["upstream"] != r["downstream"]:
            by_upstream[r["upstream"]][r["sparsity"]].append(r["test_cer"])  # several seeds: their mean
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for upstream in sorted(by_upstream):
        xs = sorted(by_upstream[upstream])
        ax.plot(xs, [100 * mean(by_upstream[upstream][x]) for x in xs], marker="o", label=upstream)
    ax.set_xlabel("sparsity")
    ax.set_ylabel("mean test CER (%) on non-matching languages")
    ax.set_title("Transfer CER by upstream ticket")
    ax.legend(title="upstream")
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# CER cells: seeds pooled on shared test utterances


def _edits(row: dict) -> tuple[list[int], list[int]]:
    return [u.char_edits for u in row["utterances"]], [u.ref_chars for u in row["utterances"]]


def result_rows(rows: list[dict]) -> list[dict]:
    """``results.csv`` rows: each run's result with its own bootstrap interval."""
    out = []
    for r in sorted(rows, key=lambda r: (r["sparsity"], r["upstream"], r["downstream"], r["seed"])):
        ci = rate_interval(Rates.from_seeds([_edits(r)]))
        out.append({k: v for k, v in r.items() if k != "utterances"} | {"test_cer_low": ci.low, "test_cer_high": ci.high})
    return out


def cells_at(rows: list[dict], sparsity: float) -> dict[tuple[str, str], list[dict]]:
    """Runs per (upstream, downstream) at one sparsity, sorted by seed; the runs of one downstream
    language must have been tested on the same utterances, in the same order."""
    cells: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        if abs(r["sparsity"] - sparsity) < 1e-9:
            cells[(r["upstream"], r["downstream"])].append(r)
    reference: dict[str, tuple[list[str], str]] = {}
    for (u, d), runs in sorted(cells.items()):
        runs.sort(key=lambda r: r["seed"])
        seeds = [r["seed"] for r in runs]
        if len(set(seeds)) != len(seeds):
            raise UsageError(f"{u}->{d} at sparsity {sparsity:.2f} has seeds {seeds}: expected one run per seed")
        for r in runs:
            ids = [x.id for x in r["utterances"]]
            label = f"{u}->{d} seed {r['seed']}"
            if d not in reference:
                reference[d] = (ids, label)
            elif ids != reference[d][0]:
                raise UsageError(f"{label} was tested on other utterances than {reference[d][1]}: expected the same {d} test set for a paired comparison")
    return cells


def cell_rates(runs: list[dict]) -> Rates:
    return Rates.from_seeds([_edits(r) for r in runs])


def pct(x: float) -> str:
    return f"{100 * x:.2f}"


def _fmt_cell(runs: list[dict]) -> str:
    """CER (%), ± standard deviation over seeds when there are several, and the bootstrap interval."""
    if not runs:
        return "–"
    rates = cell_rates(runs)
    ci = rate_interval(rates)
    spread = f" ± {pct(stdev(rates.per_seed()))}" if len(runs) > 1 else ""
    return f"{pct(ci.estimate)}{spread} [{pct(ci.low)}, {pct(ci.high)}]"


def cer_table(rows: list[dict], sparsity: float, upstreams: list[str], downstreams: list[str]) -> tuple[str, dict]:
    """The paper's transfer table at one sparsity: CER (%) of every upstream ticket (rows) on every
    downstream language (columns) with intervals; best per column in bold, matched language marked
    †, and the average over non-matching languages with its (stratified) interval. Returns the
    markdown and the numbers used."""
    cells = cells_at(rows, sparsity)
    rates = {key: cell_rates(runs) for key, runs in cells.items()}
    best = {}
    for d in downstreams:
        values = [rates[(u, d)].rate() for u in upstreams if (u, d) in rates]
        best[d] = min(values) if values else None
    table, averages = [], {}
    for u in upstreams:
        line = [f"**{u}**"]
        for d in downstreams:
            text = _fmt_cell(cells.get((u, d), []))
            if (u, d) in rates and math.isclose(rates[(u, d)].rate(), best[d]):
                text = f"**{text}**"
            if u == d:
                text += " †"
            line.append(text)
        non_matching = {d: rates[(u, d)] for d in downstreams if d != u and (u, d) in rates}
        averages[u] = mean_rate_interval(non_matching) if non_matching else None
        line.append(f"{pct(averages[u].estimate)} [{pct(averages[u].low)}, {pct(averages[u].high)}]" if averages[u] else "–")
        table.append(line)
    header = ["upstream ticket \\ downstream"] + downstreams + ["avg non-matching"]
    numbers = {"cells": {f"{u}->{d}": float(r.rate()) for (u, d), r in rates.items()}, "avg_non_matching": {u: (a.estimate if a else None) for u, a in averages.items()}}
    return markdown_table(header, table), numbers


def _seed_spread(a: list[dict], b: list[dict]) -> str:
    """Standard deviation over seeds of the per-seed difference a - b (seeds matched by number)."""
    by_seed = {r["seed"]: r["test_cer"] for r in b}
    diffs = [r["test_cer"] - by_seed[r["seed"]] for r in a if r["seed"] in by_seed]
    return f"; seed sd {pct(stdev(diffs))}" if len(diffs) > 1 else ""


def _fmt_difference(ci: Interval, spread: str = "") -> str:
    mark = " \\*" if ci.excludes_zero else ""
    return f"{100 * ci.estimate:+.2f} [{100 * ci.low:+.2f}, {100 * ci.high:+.2f}]{mark}{spread}"


def paired_table(rows: list[dict], sparsity: float, upstreams: list[str], downstreams: list[str]) -> tuple[str, dict]:
    """Every ticket against the best one of its column: CER difference (percentage points) with a
    paired bootstrap interval over the same test utterances (seeds pooled), * when it excludes 0;
    the last column compares averages over non-matching languages the same way."""
    cells = cells_at(rows, sparsity)
    rates = {key: cell_rates(runs) for key, runs in cells.items()}
    numbers: dict[str, dict] = {}
    columns: dict[str, dict[str, str]] = defaultdict(dict)
    for d in downstreams:
        present = [u for u in upstreams if (u, d) in rates]
        if not present:
            continue
        best = min(present, key=lambda u: rates[(u, d)].rate())
        for u in present:
            if u == best:
                columns[u][d] = f"best ({pct(rates[(u, d)].rate())})"
                continue
            ci = paired_difference_interval({d: rates[(u, d)]}, {d: rates[(best, d)]})
            numbers[f"{u}-{best}@{d}"] = {"estimate": ci.estimate, "low": ci.low, "high": ci.high}
            columns[u][d] = _fmt_difference(ci, _seed_spread(cells[(u, d)], cells[(best, d)]))
    non_matching = {u: {d: rates[(u, d)] for d in downstreams if d != u and (u, d) in rates} for u in upstreams}
    non_matching = {u: v for u, v in non_matching.items() if v}
    if non_matching:
        best = min(non_matching, key=lambda u: np.mean([r.rate() for r in non_matching[u].values()]))
        for u in non_matching:
            if u == best:
                columns[u]["avg"] = "best"
                continue
            ci = paired_difference_interval(non_matching[u], non_matching[best])
            numbers[f"{u}-{best}@avg"] = {"estimate": ci.estimate, "low": ci.low, "high": ci.high}
            columns[u]["avg"] = _fmt_difference(ci)
    table = [[f"**{u}**"] + [columns[u].get(d, "–") for d in downstreams] + [columns[u].get("avg", "–")] for u in upstreams]
    header = ["ticket − best (pp)"] + downstreams + ["avg non-matching"]
    return markdown_table(header, table), numbers


# ---------------------------------------------------------------------------------------------
# Mask overlap


def iou_markdown(iou: dict) -> str:
    """IoU matrix (%), each cell with its chance-corrected value, and the random baseline."""
    labels = iou["labels"]
    rows = []
    for i, a in enumerate(labels):
        line = [f"**{a}**"]
        for j, _ in enumerate(labels):
            if i == j:
                line.append("100")
            else:
                value, rnd = iou["matrix"][i][j], iou["random_matrix"][i][j]
                line.append(f"{pct(value)} ({pct(chance_corrected(value, rnd))})")
        rows.append(line)
    text = markdown_table(["IoU % (chance-corrected %)"] + labels, rows)
    text += (f"\n\nRandom masks of these densities would overlap {pct(iou['random_baseline'])}% (d/(2-d), d = {iou['density']:.3f}). "
             "Chance-corrected: (IoU − random) / (1 − random), 0 for random masks, 100 for identical ones.")
    if iou.get("seeds", 1) > 1:
        text += f" Each cell is the mean over {iou['seeds']} seeds."
    return text


def _split_label(label: str) -> tuple[str, str]:
    language, _, seed = label.rpartition("@")
    return language, seed


def noise_floor(seed_iou: dict) -> tuple[dict[str, dict], list[dict]]:
    """From the IoU of every ticket of every seed: per language, the IoU of its tickets across
    seeds (the noise floor), against different languages within a seed and against the base;
    and the same per layer."""
    summary: dict[str, dict] = defaultdict(lambda: {"seed_to_seed": [], "cross_language": [], "vs_base": [], "random": []})
    for row in seed_iou["pairs"]:
        (la, sa), (lb, sb) = _split_label(row["a"]), _split_label(row["b"])
        for mine, other, my_seed, other_seed in ((la, lb, sa, sb), (lb, la, sb, sa)):
            if mine == other and my_seed != other_seed:
                summary[mine]["seed_to_seed"].append(row)
                break
            if mine != other and my_seed == other_seed and mine != "base":
                summary[mine]["vs_base" if other == "base" else "cross_language"].append(row)
    layers = []
    for row in seed_iou["layers"]:
        if row["group_kind"] != "layer" or not row["group"].isdigit():
            continue
        (la, sa), (lb, sb) = _split_label(row["a"]), _split_label(row["b"])
        if la == lb and sa != sb:
            layers.append({"label": la, "kind": "seed-to-seed", **row})
        elif la != lb and sa == sb and "base" not in (la, lb):
            for label in (la, lb):
                layers.append({"label": label, "kind": "cross-language", **row})
    return dict(summary), layers


def _stat(rows: list[dict], key: str = "iou") -> str:
    if not rows:
        return "–"
    values = [r[key] for r in rows]
    spread = f" [{pct(min(values))}, {pct(max(values))}]" if len(values) > 1 else ""
    return f"{pct(mean(values))}{spread}"


def noise_floor_markdown(seed_iou: dict) -> str:
    summary, layers = noise_floor(seed_iou)
    table = []
    for label in sorted(summary, key=lambda x: (x == "base", x)):
        s = summary[label]
        cc = [{"cc": chance_corrected(r["iou"], r["random_iou"])} for r in s["seed_to_seed"]]
        cross_cc = [{"cc": chance_corrected(r["iou"], r["random_iou"])} for r in s["cross_language"]]
        table.append([f"**{label}**", _stat(s["seed_to_seed"]), _stat(cc, "cc"), _stat(s["cross_language"]), _stat(cross_cc, "cc"), _stat(s["vs_base"]),
                      _stat(s["seed_to_seed"] + s["cross_language"], "random_iou")])
    header = ["ticket", "same language, other seed", "(chance-corr.)", "other languages, same seed", "(chance-corr.)", "vs base, same seed", "random"]
    text = markdown_table(header, table)
    text += ("\n\nIoU (%) as mean [min, max] over the pairs of seeds or languages. If a language's tickets overlap across seeds about as much "
             "as different languages' tickets do, the cross-language differences are within the noise of training.")
    groups = sorted({r["group"] for r in layers}, key=int)
    if groups:
        per_layer = [[g, _stat([r for r in layers if r["group"] == g and r["kind"] == "seed-to-seed"]),
                      _stat([r for r in layers if r["group"] == g and r["kind"] == "cross-language"]),
                      _stat([r for r in layers if r["group"] == g], "random_iou")] for g in groups]
        text += "\n\nPer encoder layer (all languages together):\n\n" + markdown_table(["layer", "same language, other seed", "other languages, same seed", "random"], per_layer)
    return text


# ---------------------------------------------------------------------------------------------
# REPORT.md


def write_report(
    study_dir: str | os.PathLike,
    rows: list[dict],
    ious: dict[float, dict],
    upstreams: list[str],
    downstreams: list[str],
    title: str,
    note: Optional[str] = None,
    seed_ious: Optional[dict[float, dict]] = None,
) -> Path:
    """REPORT.md with the transfer tables per sparsity (intervals, paired comparisons), IoU
    matrices, the seed-to-seed noise floor, and pictures in figures/."""
    study_dir = Path(study_dir)
    figures = study_dir / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    seed_ious = seed_ious or {}
    sparsities = sorted({r["sparsity"] for r in rows} | set(ious) | set(seed_ious))
    seeds = sorted({r["seed"] for r in rows})
    parts = [f"# {title}\n"]
    if note:
        parts.append(note + "\n")
    parts.append(
        "Test CER (%) of each upstream ticket fine-tuned on each downstream language, with its "
        f"{METHOD}. " + (f"{len(seeds)} seeds ({', '.join(map(str, seeds))}): mean ± standard deviation over seeds, the interval pooled over seeds "
                        "on the shared test utterances. " if len(seeds) > 1 else "One seed: the interval covers test-set sampling only, not training noise. ")
        + "**Bold**: best in its column. †: upstream = downstream (the matched diagonal). Last column: mean over the non-matching languages, "
        "its interval from resampling each language's utterances independently.\n"
    )
    for s in sparsities:
        if not any(abs(r["sparsity"] - s) < 1e-9 for r in rows):
            continue
        table, _ = cer_table(rows, s, upstreams, downstreams)
        parts.append(f"## Sparsity {s:.0%}\n\n{table}\n")
        paired, _ = paired_table(rows, s, upstreams, downstreams)
        parts.append(
            f"Paired comparisons at {s:.0%}: CER of each ticket minus the best ticket's in that column, in percentage points, with a "
            f"{CONFIDENCE:.0%} paired bootstrap interval over the same test utterances" + (" (seeds pooled; seed sd: standard deviation of the per-seed differences)" if len(seeds) > 1 else "")
            + ". \\* marks a difference whose interval excludes 0.\n\n" + paired + "\n"
        )
    if rows:
        plot_cer_curves(rows, figures / "cer_vs_sparsity.png")
        parts.append("![CER vs sparsity](figures/cer_vs_sparsity.png)\n")
    for s in sparsities:
        tag = f"{s:.2f}"
        if s in ious:
            iou = ious[s]
            plot_iou_heatmap(iou["labels"], iou["matrix"], iou["random_matrix"], f"Ticket IoU at {s:.0%} sparsity", figures / f"iou_heatmap_{tag}.png")
            pairs = [(a, "base") for a in iou["labels"] if a != "base"] if "base" in iou["labels"] else [(r["a"], r["b"]) for r in iou["pairs"]]
            plot_layer_iou(iou["layers"], pairs, f"Per-layer IoU at {s:.0%} sparsity", figures / f"iou_layers_{tag}.png")
            parts.append(f"## Mask overlap at {s:.0%} sparsity\n\n{iou_markdown(iou)}\n")
            parts.append(f"![IoU heatmap](figures/iou_heatmap_{tag}.png)\n\n![per-layer IoU](figures/iou_layers_{tag}.png)\n")
        if s in seed_ious:
            _, layers = noise_floor(seed_ious[s])
            parts.append(f"### Noise floor at {s:.0%}: the same language's tickets across seeds\n\n{noise_floor_markdown(seed_ious[s])}\n")
            if layers:
                plot_noise_floor(layers, f"IoU per layer at {s:.0%}: across seeds vs across languages", figures / f"iou_noise_floor_{tag}.png")
                parts.append(f"![noise floor](figures/iou_noise_floor_{tag}.png)\n")
    path = study_dir / "REPORT.md"
    with atomic_open(path) as f:
        f.write("\n".join(parts))
    return path
