"""Tables and pictures: CSV files, the IoU heatmap and per-layer plot, CER-vs-sparsity curves, and
the study's REPORT.md, built only from what the runs wrote (no value is typed in)."""

from __future__ import annotations

import csv
import math
import os
from collections import defaultdict
from pathlib import Path
from statistics import mean, pstdev
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def write_csv_atomic(path: str | os.PathLike, rows: list[dict], columns: list[str]) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def _save(fig, path: str | os.PathLike) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


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
    _save(fig, path)


def plot_layer_iou(detail: list[dict], pairs: list[tuple[str, str]], title: str, path: str | os.PathLike) -> None:
    """IoU per encoder layer for the given pairs, with each pair's random baseline dashed."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for a, b in pairs:
        rows = [r for r in detail if r["group_kind"] == "layer" and r["group"].isdigit() and {r["a"], r["b"]} == {a, b}]
        rows.sort(key=lambda r: int(r["group"]))
        layers = [int(r["group"]) for r in rows]
        line = ax.plot(layers, [r["iou"] for r in rows], marker="o", label=f"{a} vs {b}")[0]
        ax.plot(layers, [r["random_iou"] for r in rows], linestyle="--", color=line.get_color(), alpha=0.5)
    ax.set_xlabel("encoder layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=0)
    ax.set_ylabel("IoU (dashed: random masks of the same densities)")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_cer_curves(rows: list[dict], path: str | os.PathLike) -> None:
    """Mean test CER over non-matching downstream languages against sparsity, a line per upstream."""
    by_upstream = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["upstream"] != r["downstream"]:
            by_upstream[r["upstream"]][r["sparsity"]].append(r["test_cer"])
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for upstream in sorted(by_upstream):
        xs = sorted(by_upstream[upstream])
        ax.plot(xs, [100 * mean(by_upstream[upstream][x]) for x in xs], marker="o", label=upstream)
    ax.set_xlabel("sparsity")
    ax.set_ylabel("mean test CER (%) on non-matching languages")
    ax.set_title("Transfer CER by upstream ticket")
    ax.legend(title="upstream")
    ax.grid(alpha=0.3)
    _save(fig, path)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _fmt(values: list[float]) -> str:
    """CER in percent; mean ± std over seeds when there are several."""
    if not values:
        return "–"
    return f"{100 * mean(values):.2f}" + (f" ± {100 * pstdev(values):.2f}" if len(values) > 1 else "")


def cer_table(rows: list[dict], sparsity: float, upstreams: list[str], downstreams: list[str]) -> tuple[str, dict]:
    """The paper's transfer table at one sparsity: CER (%) of every upstream ticket (rows) on every
    downstream language (columns); best per column in bold, matched language marked †, and the
    average over non-matching languages. Returns the markdown and the numbers used."""
    cells: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in rows:
        if abs(r["sparsity"] - sparsity) < 1e-9:
            cells[(r["upstream"], r["downstream"])].append(r["test_cer"])
    best = {}
    for d in downstreams:
        values = [mean(cells[(u, d)]) for u in upstreams if cells[(u, d)]]
        best[d] = min(values) if values else None
    table, averages = [], {}
    for u in upstreams:
        line = [f"**{u}**"]
        for d in downstreams:
            text = _fmt(cells[(u, d)])
            if cells[(u, d)] and math.isclose(mean(cells[(u, d)]), best[d]):
                text = f"**{text}**"
            if u == d:
                text += " †"
            line.append(text)
        non_matching = [mean(cells[(u, d)]) for d in downstreams if d != u and cells[(u, d)]]
        averages[u] = mean(non_matching) if non_matching else None
        line.append(f"{100 * averages[u]:.2f}" if averages[u] is not None else "–")
        table.append(line)
    header = ["upstream ticket \\ downstream"] + downstreams + ["avg non-matching"]
    return markdown_table(header, table), {"cells": {f"{u}->{d}": mean(v) for (u, d), v in cells.items()}, "avg_non_matching": averages}


def iou_markdown(iou: dict) -> str:
    """IoU matrix with the random baseline of each pair, and each language against the base."""
    labels = iou["labels"]
    rows = []
    for i, a in enumerate(labels):
        line = [f"**{a}**"]
        for j, _ in enumerate(labels):
            line.append("1" if i == j else f"{100 * iou['matrix'][i][j]:.2f}")
        rows.append(line)
    text = markdown_table(["IoU (%)"] + labels, rows)
    text += f"\n\nRandom masks of these densities would overlap {100 * iou['random_baseline']:.2f}% (d/(2-d), d = {iou['density']:.3f})."
    return text


def write_report(
    study_dir: str | os.PathLike,
    rows: list[dict],
    ious: dict[float, dict],
    upstreams: list[str],
    downstreams: list[str],
    title: str,
    note: Optional[str] = None,
) -> Path:
    """REPORT.md with the transfer tables per sparsity, IoU matrices and pictures in figures/."""
    study_dir = Path(study_dir)
    figures = study_dir / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    sparsities = sorted({r["sparsity"] for r in rows} | set(ious))
    parts = [f"# {title}\n"]
    if note:
        parts.append(note + "\n")
    parts.append(
        "Test CER (%) of each upstream ticket fine-tuned on each downstream language. **Bold**: best in its column. "
        "†: upstream = downstream (the matched diagonal). Last column: mean over the non-matching languages.\n"
    )
    for s in sparsities:
        table, _ = cer_table(rows, s, upstreams, downstreams)
        parts.append(f"## Sparsity {s:.0%}\n\n{table}\n")
    if rows:
        plot_cer_curves(rows, figures / "cer_vs_sparsity.png")
        parts.append("![CER vs sparsity](figures/cer_vs_sparsity.png)\n")
    for s in sorted(ious):
        iou = ious[s]
        tag = f"{s:.2f}"
        plot_iou_heatmap(iou["labels"], iou["matrix"], iou["random_matrix"], f"Ticket IoU at {s:.0%} sparsity", figures / f"iou_heatmap_{tag}.png")
        pairs = [(a, "base") for a in iou["labels"] if a != "base"] if "base" in iou["labels"] else [(r["a"], r["b"]) for r in iou["pairs"]]
        plot_layer_iou(iou["layers"], pairs, f"Per-layer IoU at {s:.0%} sparsity", figures / f"iou_layers_{tag}.png")
        parts.append(f"## Mask overlap at {s:.0%} sparsity\n\n{iou_markdown(iou)}\n")
        parts.append(f"![IoU heatmap](figures/iou_heatmap_{tag}.png)\n\n![per-layer IoU](figures/iou_layers_{tag}.png)\n")
    path = study_dir / "REPORT.md"
    tmp = path.with_name(f".REPORT.md.tmp-{os.getpid()}")
    tmp.write_text("\n".join(parts), encoding="utf-8")
    os.replace(tmp, path)
    return path
