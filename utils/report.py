"""Tables and pictures: CSV files, the IoU heatmap and per-layer plot, CER-vs-sparsity curves, and
the study's REPORT.md, built only from what the runs wrote (no value is typed in).

Every CER in a report comes with an interval that counts training noise (between seeds) and
test-set sampling (over utterances), recomputed from the ``predictions_test.jsonl`` each run wrote
(see ``utils.stats``); every comparison is paired by utterance and seed, compares like with like
(the same downstream languages on both sides), and is marked only when it survives Holm-Bonferroni
correction over its table; every table of comparisons says what difference its design could have
detected. Every IoU stands beside the random baseline, its chance-corrected value and, with several
seeds, the seed-to-seed IoU of the same language."""

from __future__ import annotations

import csv
import math
import os
from collections import defaultdict
from itertools import combinations
from pathlib import Path
from statistics import mean, stdev
from typing import Optional, Sequence

import numpy as np

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


from .errors import UsageError
from .iou import chance_corrected
from .layout import ONE_SHOT
from .records import StudyResults
from .runs import atomic_open
from .stats import ALPHA, CONFIDENCE, N_RESAMPLES, SEED, Interval, Rates, cell_interval, detectable_line, difference_interval, holm_marks, mean_interval, rate_interval
from .structure import split_method_label

RESULT_COLUMNS = ["upstream", "downstream", "sparsity", "seed", "prune_method", "test_cer", "test_cer_low", "test_cer_high", "test_wer", "test_samples", "eval_loss",
                  "measured_sparsity", "mask_held", "epochs", "steps", "ticket", "wall_time_s", "suite_version"]
PER_RUN_METHOD = (f"results.csv: one row per run, its {CONFIDENCE:.0%} interval a percentile bootstrap over that run's test utterances "
                  f"({N_RESAMPLES:,} resamples, seed {SEED}; scipy.stats.bootstrap), test-set sampling only")


ONE_SEED_HEADER = " (one seed: [95% CI] covers test sampling only)"


def intervals_method(seeds: int) -> str:
    """What the intervals of a report with ``seeds`` seeds count, in one paragraph."""
    if seeds > 1:
        return (f"{seeds} seeds: each cell is the mean over seeds ± their standard deviation, and its {CONFIDENCE:.0%} interval counts both "
                "sources of noise: training (between seeds: a Student t with k − 1 degrees of freedom) and test-set sampling (over "
                "utterances, delta method), computed from every run's predictions_test.jsonl (utils/stats.py; method and calibration in the "
                "suite's docs/statistics.md).")
    return ("**One seed: every interval covers test-set sampling only, not training noise**, so no difference is marked significant. "
            "Intervals that count training noise need at least 2 seeds, and 3 or more in practice (with 2, a t with 1 degree of freedom "
            "multiplies the standard error by 12.7; with 3, by 4.3; with 5, by 2.8).")


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
    """Heatmap of the chance-corrected IoU, its colour scale spent on the off-diagonal cells (the
    diagonal, 1 by definition, is left blank); each cell annotated with its IoU and chance-corrected value."""
    n = len(labels)
    corrected = np.array([[chance_corrected(matrix[i][j], random_matrix[i][j]) if i != j else np.nan for j in range(n)] for i in range(n)])
    off = corrected[~np.isnan(corrected)]
    low, high = (float(off.min()), float(off.max())) if off.size else (0.0, 1.0)
    if high - low < 1e-6:
        low, high = low - 0.01, high + 0.01
    fig, ax = plt.subplots(figsize=(1.2 * n + 2, 1.0 * n + 1.5))
    image = ax.imshow(np.ma.masked_invalid(corrected), cmap="viridis", vmin=low, vmax=high)
    ax.set_xticks(range(n), labels)
    ax.set_yticks(range(n), labels)
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            text = f"{100 * matrix[i][j]:.1f}\n({100 * corrected[i, j]:.1f})"
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if corrected[i, j] < (low + high) / 2 else "black")
    fig.colorbar(image, ax=ax, label="chance-corrected IoU (off-diagonal range)")
    ax.set_title(title + "\nIoU % (chance-corrected %)", fontsize=10)
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
    """Mean test CER over non-matching downstream languages against sparsity, a line per upstream,
    each point with its interval (seeds and utterances, see ``intervals_method``)."""
    sparsities = sorted({r["sparsity"] for r in rows})
    upstreams = sorted({r["upstream"] for r in rows})
    cells = {s: cells_at(rows, s) for s in sparsities}
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for offset, upstream in enumerate(upstreams):
        xs, ys, errs = [], [], [[], []]
        for s in sparsities:
            own = {d: cell_rates(runs) for (u, d), runs in cells[s].items() if u == upstream and d != upstream}
            if not own:
                continue
            ci = mean_interval(own)
            xs.append(s + 0.004 * (offset - (len(upstreams) - 1) / 2))  # side by side, not on top of each other
            ys.append(100 * ci.estimate)
            errs[0].append(100 * (ci.estimate - ci.low))
            errs[1].append(100 * (ci.high - ci.estimate))
        if xs:
            ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=4, label=upstream)
    ax.set_xticks(sparsities, [f"{s:.0%}" for s in sparsities])
    ax.set_xlim(min(sparsities) - 0.05, max(sparsities) + 0.05)
    ax.set_xlabel("sparsity")
    ax.set_ylabel("mean test CER (%) on non-matching languages")
    ax.set_title(f"Transfer CER by upstream ticket ({CONFIDENCE:.0%} intervals)")
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
    for r in sorted(rows, key=lambda r: (r["sparsity"], r["upstream"], r["downstream"], r["seed"], r["prune_method"])):
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
    """The edit counts of one cell's runs, one row per seed (named by the runs' seeds)."""
    return Rates.from_seeds([_edits(r) for r in runs], [r["seed"] for r in runs])


def own_rates(own: list[dict]) -> dict[str, Rates]:
    """Each upstream model's own test runs (its language's test set), one row per seed."""
    by_language: dict[str, list[dict]] = defaultdict(list)
    for r in own:
        by_language[r["upstream"]].append(r)
    return {u: cell_rates(sorted(runs, key=lambda r: r["seed"])) for u, runs in by_language.items()}


def pct(x: float) -> str:
    return f"{100 * x:.2f}"


def fmt_rate(rates: Rates, test_set: str) -> str:
    """CER (%), ± standard deviation over seeds when there are several, and the interval."""
    ci = cell_interval(rates, test_set)
    spread = f" ± {pct(stdev(rates.per_seed()))}" if len(rates.seeds) > 1 else ""
    return f"{pct(ci.estimate)}{spread} [{pct(ci.low)}, {pct(ci.high)}]"


def fmt_difference(ci: Interval, marked: bool, spread: Optional[list[float]] = None) -> str:
    """A difference in percentage points with its interval, \\* when marked, and the seed sd of the per-seed differences."""
    sd = f"; seed sd {pct(stdev(spread))}" if spread is not None and len(spread) > 1 else ""
    return f"{100 * ci.estimate:+.2f} [{100 * ci.low:+.2f}, {100 * ci.high:+.2f}]" + (" \\*" if marked else "") + sd


def negated(ci: Interval) -> Interval:
    return Interval(-ci.estimate, -ci.high, -ci.low, ci.se, ci.df, ci.seeds)


def cer_table(rows: list[dict], sparsity: float, upstreams: list[str], downstreams: list[str], own: Optional[list[dict]] = None) -> tuple[str, dict]:
    """The paper's transfer table at one sparsity: CER (%) of every upstream ticket (rows) on every
    downstream language (columns) with intervals; best per column in bold, matched language marked
    †, the upstream model's own test CER (the confound every transfer comparison carries), and the
    average over the ticket's non-matching languages. Returns the markdown and the numbers used."""
    cells = cells_at(rows, sparsity)
    rates = {key: cell_rates(runs) for key, runs in cells.items()}
    upstream_rates = own_rates(own or [])
    best = {}
    for d in downstreams:
        values = [rates[(u, d)].rate() for u in upstreams if (u, d) in rates]
        best[d] = min(values) if values else None
    table, averages = [], {}
    for u in upstreams:
        line = [f"**{u}**", fmt_rate(upstream_rates[u], u) if u in upstream_rates else "–"]
        for d in downstreams:
            text = fmt_rate(rates[(u, d)], d) if (u, d) in rates else "–"
            if (u, d) in rates and math.isclose(rates[(u, d)].rate(), best[d]):
                text = f"**{text}**"
            if u == d:
                text += " †"
            line.append(text)
        non_matching = {d: rates[(u, d)] for d in downstreams if d != u and (u, d) in rates}
        averages[u] = mean_interval(non_matching) if non_matching else None
        line.append(f"{pct(averages[u].estimate)} [{pct(averages[u].low)}, {pct(averages[u].high)}]" if averages[u] else "–")
        table.append(line)
    one_seed = max(len(r.seeds) for r in rates.values()) < 2 if rates else False
    header = ["upstream ticket \\ downstream" + (ONE_SEED_HEADER if one_seed else ""), "upstream model's own CER"] + downstreams + ["avg non-matching"]
    numbers = {"cells": {f"{u}->{d}": float(r.rate()) for (u, d), r in rates.items()}, "avg_non_matching": {u: (a.estimate if a else None) for u, a in averages.items()},
               "own": {u: float(r.rate()) for u, r in upstream_rates.items()}}
    return markdown_table(header, table), numbers


def per_seed_difference(a: Rates, b: Rates) -> list[float]:
    seeds = [s for s in a.seeds if s in b.seeds]
    return list(a.only(seeds).per_seed() - b.only(seeds).per_seed())


def comparison_family(rates: dict[tuple[str, str], Rates], upstreams: list[str], downstreams: list[str]) -> dict[str, Interval]:
    """Every pairwise comparison a transfer table at one sparsity implies: each pair of tickets on
    each downstream language (``a-b@d``), and each pair's means over the downstream languages that
    are neither ticket's own (``a-b@avg``, like with like). Holm's correction runs over all of them,
    so picking the best ticket of a column after seeing the data cannot manufacture a mark."""
    family: dict[str, Interval] = {}
    for d in downstreams:
        present = [u for u in upstreams if (u, d) in rates]
        for a, b in combinations(present, 2):
            family[f"{a}-{b}@{d}"] = difference_interval({d: rates[(a, d)]}, {d: rates[(b, d)]})
    for a, b in combinations(upstreams, 2):
        shared = [d for d in downstreams if d not in (a, b) and (a, d) in rates and (b, d) in rates]
        if shared:
            family[f"{a}-{b}@avg"] = difference_interval({d: rates[(a, d)] for d in shared}, {d: rates[(b, d)] for d in shared})
    return family


def _lookup(family: dict[str, Interval], a: str, b: str, where: str) -> tuple[Optional[str], Optional[Interval]]:
    """``a - b`` at ``where`` from the family (stored in either order)."""
    if f"{a}-{b}@{where}" in family:
        return f"{a}-{b}@{where}", family[f"{a}-{b}@{where}"]
    if f"{b}-{a}@{where}" in family:
        return f"{b}-{a}@{where}", negated(family[f"{b}-{a}@{where}"])
    return None, None


def paired_table(rows: list[dict], sparsity: float, upstreams: list[str], downstreams: list[str]) -> tuple[str, dict]:
    """Every ticket against the best one of its column: CER difference (percentage points) paired by
    utterance and seed, with its interval; \\* when it survives Holm's correction over the whole
    family (``comparison_family``). The last column compares the two tickets' means over the same
    downstream languages. Returns the markdown (with the detectable-difference line) and the numbers."""
    cells = cells_at(rows, sparsity)
    rates = {key: cell_rates(runs) for key, runs in cells.items()}
    family = comparison_family(rates, upstreams, downstreams)
    marked = dict(zip(family, holm_marks(list(family.values()))))
    numbers: dict[str, dict] = {}
    columns: dict[str, dict[str, str]] = defaultdict(dict)

    def show(u: str, best: str, where: str, spread: Optional[list[float]]) -> None:
        key, ci = _lookup(family, u, best, where)
        if ci is None:
            columns[u][where] = "–"
            return
        numbers[f"{u}-{best}@{where}"] = ci.numbers(marked[key])
        columns[u][where] = fmt_difference(ci, marked[key], spread)

    for d in downstreams:
        present = [u for u in upstreams if (u, d) in rates]
        if not present:
            continue
        best = min(present, key=lambda u: rates[(u, d)].rate())
        for u in present:
            if u == best:
                columns[u][d] = f"best ({pct(rates[(u, d)].rate())})"
            else:
                show(u, best, d, per_seed_difference(rates[(u, d)], rates[(best, d)]))
    own_sets = {u: [d for d in downstreams if d != u and (u, d) in rates] for u in upstreams}
    ranked = [u for u in upstreams if own_sets[u]]
    if ranked:
        best = min(ranked, key=lambda u: np.mean([rates[(u, d)].rate() for d in own_sets[u]]))
        for u in ranked:
            if u == best:
                columns[u]["avg"] = "best"
            else:
                show(u, best, "avg", None)
    table = [[f"**{u}**"] + [columns[u].get(d, "–") for d in downstreams] + [columns[u].get("avg", "–")] for u in upstreams]
    one_seed = min((ci.seeds for ci in family.values()), default=1) < 2
    header = ["ticket − best (pp)" + (ONE_SEED_HEADER if one_seed else "")] + downstreams + ["avg non-matching (same languages)"]
    text = markdown_table(header, table)
    line = detectable_line(list(family.values()))
    return text + (f"\n\n{line}" if line else ""), numbers | {"family": {k: v.numbers(marked[k]) for k, v in family.items()}}


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
    seeds (the noise floor), against different languages of other seeds (the comparison that
    differs from it only by the language), of the same seed, and against the base; and per layer."""
    summary: dict[str, dict] = defaultdict(lambda: {"seed_to_seed": [], "cross_both": [], "cross_language": [], "vs_base": [], "random": []})
    for row in seed_iou["pairs"]:
        (la, sa), (lb, sb) = _split_label(row["a"]), _split_label(row["b"])
        for mine, other, my_seed, other_seed in ((la, lb, sa, sb), (lb, la, sb, sa)):
            if mine == other and my_seed != other_seed:
                summary[mine]["seed_to_seed"].append(row)
                break
            if mine != other and my_seed == other_seed and mine != "base":
                summary[mine]["vs_base" if other == "base" else "cross_language"].append(row)
            elif mine != other and "base" not in (mine, other):
                summary[mine]["cross_both"].append(row)
    layers = []
    for row in seed_iou["layers"]:
        if row["group_kind"] != "layer" or not row["group"].isdigit():
            continue
        (la, sa), (lb, sb) = _split_label(row["a"]), _split_label(row["b"])
        if la == lb and sa != sb and la != "base":  # language tickets only (a shared base prunes to the same ticket in every seed)
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


def _corrected(rows: list[dict]) -> list[dict]:
    return [{"cc": chance_corrected(r["iou"], r["random_iou"])} for r in rows]


def noise_floor_markdown(seed_iou: dict, shared_base: bool = False) -> str:
    summary, layers = noise_floor(seed_iou)
    table = []
    for label in sorted(summary, key=lambda x: (x == "base", x)):
        s = summary[label]
        pairs = [cell for kind in ("seed_to_seed", "cross_both", "cross_language") for cell in (_stat(s[kind]), _stat(_corrected(s[kind]), "cc"))]
        table.append([f"**{label}**", *pairs, _stat(s["vs_base"]), _stat(s["seed_to_seed"] + s["cross_language"], "random_iou")])
    header = ["ticket", "same language, other seed", "(chance-corr.)", "other languages, other seed", "(chance-corr.)", "other languages, same seed",
              "(chance-corr.)", "vs base, same seed", "random"]
    text = markdown_table(header, table)
    text += ("\n\nIoU (%) as mean [min, max] over the pairs of seeds or languages. The first two pairs of columns differ only by the language "
             "(both compare tickets of different seeds): if a language's tickets overlap across seeds about as much as other languages' "
             "tickets of other seeds do, the cross-language differences are within the noise of training. Tickets of the same seed share "
             "that seed's randomness (head initialisation, data order), which can raise their overlap whatever the language. ")
    text += ("Every seed started from one shared base (as every seed of an XLS-R study starts from the one checkpoint): the same language's "
             "tickets across seeds differ only by fine-tuning noise, so their overlap is the noise floor that cross-language overlap is read against."
             if shared_base else
             "Each seed made its own base (initial weights and pretraining), so the same language's tickets across seeds also differ by "
             "their base: overlap near chance across seeds is expected by construction, and it is not the noise floor of a study on one "
             "checkpoint such as XLS-R (a study config's `shared_base: true` measures that one).")
    groups = sorted({r["group"] for r in layers}, key=int)
    if groups:
        per_layer = [[g, _stat([r for r in layers if r["group"] == g and r["kind"] == "seed-to-seed"]),
                      _stat([r for r in layers if r["group"] == g and r["kind"] == "cross-language"]),
                      _stat([r for r in layers if r["group"] == g], "random_iou")] for g in groups]
        text += "\n\nPer encoder layer (all languages together):\n\n" + markdown_table(["layer", "same language, other seed", "other languages, same seed", "random"], per_layer)
    return text


# ---------------------------------------------------------------------------------------------
# Ticket-finding methods compared


def methods_transfer_table(method_rows: dict[str, list[dict]], sparsity: float, upstreams: list[str], downstreams: list[str]) -> tuple[str, dict]:
    """Transfer CER (%) of each language's ticket found by each method, on each downstream language,
    with intervals, and each other method minus one-shot (percentage points, paired by utterance
    and seed); the last row per ticket compares the means over the downstream languages other than
    its own. \\* marks survive Holm's correction over every difference of this table."""
    methods = list(method_rows)
    rates = {m: {key: cell_rates(runs) for key, runs in cells_at(rows, sparsity).items()} for m, rows in method_rows.items()}
    others = [m for m in methods if m != ONE_SHOT]
    family: dict[str, Interval] = {}
    spreads: dict[str, list[float]] = {}
    for m in others:
        for u in upstreams:
            for d in downstreams:
                if (u, d) in rates[m] and (u, d) in rates[ONE_SHOT]:
                    name, mine, theirs = f"{m}-{ONE_SHOT}:{u}->{d}", rates[m][(u, d)], rates[ONE_SHOT][(u, d)]
                    family[name], spreads[name] = difference_interval({d: mine}, {d: theirs}), per_seed_difference(mine, theirs)
            shared = [d for d in downstreams if d != u and (u, d) in rates[m] and (u, d) in rates[ONE_SHOT]]
            if len(shared) > 1:
                family[f"{m}-{ONE_SHOT}:{u}->avg"] = difference_interval({d: rates[m][(u, d)] for d in shared}, {d: rates[ONE_SHOT][(u, d)] for d in shared})
    marked = dict(zip(family, holm_marks(list(family.values()))))
    table = []
    for u in upstreams:
        for d in downstreams + ["avg"]:
            key = f"{u}->{d}"
            if d == "avg" and not any(f"{m}-{ONE_SHOT}:{key}" in family for m in others):
                continue
            line = [f"**{u}** → {'avg non-matching' if d == 'avg' else d}"]
            for m in methods:
                line.append(fmt_rate(rates[m][(u, d)], d) if (u, d) in rates[m] else "–")
            for m in others:
                name = f"{m}-{ONE_SHOT}:{key}"
                line.append(fmt_difference(family[name], marked[name], spreads.get(name)) if name in family else "–")
            table.append(line)
    one_seed = min((ci.seeds for ci in family.values()), default=1) < 2
    header = ["ticket → downstream" + (ONE_SEED_HEADER if one_seed else "")] + [f"{m} CER" for m in methods] + [f"{m} − {ONE_SHOT} (pp)" for m in others]
    line = detectable_line(list(family.values()))
    numbers = {"cer": {m: {f"{u}->{d}": float(r.rate()) for (u, d), r in rates[m].items()} for m in methods},
               "family": {k: v.numbers(marked[k]) for k, v in family.items()}}
    return markdown_table(header, table) + (f"\n\n{line}" if line else ""), numbers


def methods_iou_tables(iou: dict, methods: list[str]) -> tuple[str, str, dict]:
    """From the IoU of every method's ticket of every language (seed by seed): per language, how
    much the methods' tickets agree; per method, how much different languages' tickets overlap (is
    language-specificity a property of the method?) and how much each overlaps the one-shot base."""
    per_seed = iou.get("per_seed", [iou])
    agree: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    cross: dict[str, list[dict]] = defaultdict(list)
    base: dict[str, list[dict]] = defaultdict(list)
    for summary in per_seed:
        for row in summary["pairs"]:
            (ma, la), (mb, lb) = split_method_label(row["a"]), split_method_label(row["b"])
            if "base" in (row["a"], row["b"]):
                base[ma or mb].append(row)
            elif la == lb:
                first, second = sorted((ma, mb), key=methods.index)
                agree[(la, first, second)].append(row)
            elif ma == mb:
                cross[ma].append(row)
    languages = list(dict.fromkeys(language for language, _, _ in agree))
    pairs = list(combinations(methods, 2))
    rows = [[f"**{language}**"] + [f"{_stat(agree[(language, a, b)])} ({_stat(_corrected(agree[(language, a, b)]), 'cc')})" for a, b in pairs]
            for language in languages]
    agreement = markdown_table(["language"] + [f"{a} vs {b}: IoU (chance-corr.)" for a, b in pairs], rows)
    rows = [[f"**{m}**", _stat(cross[m]), _stat(_corrected(cross[m]), "cc"), _stat(base[m]), _stat(cross[m], "random_iou")] for m in methods]
    specificity = markdown_table(["method", "other languages' tickets", "(chance-corr.)", "vs one-shot base", "random"], rows)
    numbers = {"agreement": {f"{language}:{a}-{b}": [r["iou"] for r in agree[(language, a, b)]] for language in languages for a, b in pairs},
               "cross_language": {m: [r["iou"] for r in cross[m]] for m in methods}, "vs_base": {m: [r["iou"] for r in base[m]] for m in methods}}
    return agreement, specificity, numbers


def imp_rounds_markdown(imp_runs: list[dict]) -> str:
    """Each language's IMP rounds: the sparsity each trained at and its eval and test CER (%),
    mean [min, max] over seeds."""
    by_round: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for run in imp_runs:
        for record in run["rounds"]:
            by_round[(run["upstream"], record["round"])].append(record)
    rows = [[f"**{u}**", str(r), f"{100 * records[0]['sparsity']:.1f}", _stat(records, "eval_cer"), _stat(records, "test_cer"), str(len(records))]
            for (u, r), records in sorted(by_round.items())]
    return markdown_table(["language", "round", "sparsity %", "eval CER %", "test CER %", "seeds"], rows)


def methods_markdown(results: StudyResults, sparsity: float, upstreams: list[str], downstreams: list[str]) -> str:
    """The report's section comparing the ticket-finding methods at one sparsity."""
    methods = list(results.method_rows)
    parts = [f"## Ticket-finding methods at {sparsity:.0%} sparsity\n"]
    if any(abs(r["sparsity"] - sparsity) < 1e-9 for rows in results.method_rows.values() for r in rows):
        table, numbers = methods_transfer_table(results.method_rows, sparsity, upstreams, downstreams)
        parts.append(
            "Transfer CER (%) of each upstream language's ticket as each method found it, with intervals as above, and each method minus "
            f"{ONE_SHOT} in percentage points, paired by test utterance and seed. "
            + (f"\\* marks a difference that survives Holm-Bonferroni correction (family-wise {ALPHA:g}) over all {len(numbers['family'])} "
               "differences of this table." if len({r["seed"] for rows in results.method_rows.values() for r in rows}) > 1
               else "No marks: with one seed the intervals miss training noise.")
            + "\n\n" + table + "\n")
    if sparsity in results.method_ious:
        agreement, specificity, _ = methods_iou_tables(results.method_ious[sparsity], methods)
        parts.append("Do the methods agree on which weights matter? IoU (%) of the same language's tickets found by two methods, mean "
                     "[min, max] over seeds:\n\n" + agreement + "\n")
        parts.append("Is language-specificity a property of the method? Per method, the IoU (%) of different languages' tickets of the same "
                     "seed (mean [min, max] over language pairs and seeds), and of each language's ticket with the one-shot base ticket:\n\n"
                     + specificity + "\n")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# REPORT.md


def write_report(study_dir: str | os.PathLike, results: StudyResults, upstreams: list[str], downstreams: list[str], title: str,
                 note: Optional[str] = None, sections: Sequence[str] = ()) -> Path:
    """REPORT.md with the transfer tables per sparsity (intervals, paired comparisons), IoU
    matrices, the seed-to-seed noise floor, pictures in figures/, and ``sections`` (markdown made
    elsewhere, e.g. the analyses of ``utils.analysis``) at the end."""
    study_dir = Path(study_dir)
    figures = study_dir / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    rows, ious, seed_ious = results.rows, results.ious, results.seed_ious
    sparsities = sorted({r["sparsity"] for r in rows} | set(ious) | set(seed_ious))
    seeds = sorted({r["seed"] for r in rows})
    parts = [f"# {title}\n"]
    if note:
        parts.append(note + "\n")
    parts.append(
        "Test CER (%) of each upstream ticket fine-tuned on each downstream language. " + intervals_method(len(seeds))
        + (f" Seeds: {', '.join(map(str, seeds))}" + ("; every seed started from one shared base." if results.shared_base else "; each seed made its own base.")
           if len(seeds) > 1 else "")
        + " **Bold**: best in its column. †: upstream = downstream (the matched diagonal). Second column: the upstream model's own test CER "
        "on its language (before pruning): a ticket from a weaker model may transfer worse for that reason alone. Last column: the ticket's "
        f"mean over the downstream languages other than its own (a description; comparisons below use the same languages on both sides). {PER_RUN_METHOD}.\n"
    )
    if rows:
        made_by = sorted({r.get("suite_version") or "not recorded (runs made before 0.9.0)" for r in rows})
        parts.append(f"Version of language-tickets that made the runs (from their results.json): {', '.join(made_by)}.\n")
    if results.missing:
        parts.append(f"## Missing results\n\n{len(results.missing)} run(s) whose results this report would show have not finished; their cells "
                     "show – and the comparisons leave them out:\n\n" + "\n".join(f"- `{step}`: {why}" for step, why in results.missing) + "\n")
    for s in sparsities:
        if not any(abs(r["sparsity"] - s) < 1e-9 for r in rows):
            continue
        table, _ = cer_table(rows, s, upstreams, downstreams, results.own)
        parts.append(f"## Sparsity {s:.0%}\n\n{table}\n")
        paired, numbers = paired_table(rows, s, upstreams, downstreams)
        parts.append(
            f"Paired comparisons at {s:.0%}: CER of each ticket minus the best ticket's in that column, in percentage points, paired by test "
            f"utterance and seed, with {CONFIDENCE:.0%} intervals as above" + ("; seed sd: standard deviation of the per-seed differences" if len(seeds) > 1 else "")
            + ". The last column compares the two tickets' means over the same downstream languages: those that are neither ticket's own. "
            + (f"\\* marks a difference that survives Holm-Bonferroni correction (family-wise {ALPHA:g}) over all {len(numbers['family'])} pairwise "
               "comparisons of this table (every pair of tickets in every column, not only the ones shown)."
               if len(seeds) > 1 else "No marks: with one seed the intervals miss training noise.")
            + "\n\n" + paired + "\n"
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
            parts.append(f"### Noise floor at {s:.0%}: the same language's tickets across seeds\n\n{noise_floor_markdown(seed_ious[s], results.shared_base)}\n")
            if layers:
                plot_noise_floor(layers, f"IoU per layer at {s:.0%}: across seeds vs across languages", figures / f"iou_noise_floor_{tag}.png")
                parts.append(f"![noise floor](figures/iou_noise_floor_{tag}.png)\n")
    for s in sparsities if len(results.method_rows) > 1 else []:
        parts.append(methods_markdown(results, s, upstreams, downstreams))
    if results.imp_rounds:
        parts.append("## IMP's rounds\n\nEach round of iterative magnitude pruning (run_imp.py) on the upstream language: the sparsity it "
                     "fine-tuned at (round 0: dense) and the CER (%) of its kept checkpoint, mean [min, max] over seeds. Each requested "
                     "sparsity's ticket is the model of the round that trained at it.\n\n" + imp_rounds_markdown(results.imp_rounds) + "\n")
    parts += [section for section in sections if section]
    path = study_dir / "REPORT.md"
    with atomic_open(path) as f:
        f.write("\n".join(parts))
    return path
