#!/usr/bin/env python
"""Intersection-over-Union of language tickets: how much their kept weights overlap.

    python run_iou.py --masks en=tickets/en/sparsity-0.90 de=tickets/de/sparsity-0.90 \
        es=me/xls-r-300m-masks:masks/es/sparsity-0.90.safetensors \
        --base tickets/base/sparsity-0.90 --output_dir iou/sparsity-0.90

Each mask is a ticket directory, a mask file or a Hub reference (see utils/hub.py). Computes the
IoU of every pair (and of each language against ``--base``, the pretrained model pruned the same
way), overall, per encoder layer and per module type (q/k/v/out/ffn_in/ffn_out), each beside the
IoU two random masks of the same densities would have and the chance-corrected overlap
(IoU - random) / (1 - random). Works on the packed bits. Writes
``iou.csv`` (pairs), ``iou_layers.csv`` (per layer and module), ``iou.json``,
``iou_heatmap.png`` and ``iou_layers.png``.
"""

import logging
import time
from pathlib import Path
from typing import Optional

# Masks are compared with numpy and safetensors alone: neither torch nor transformers' models load.
from utils import __version__
from utils.arguments import parse_arguments
from utils.errors import UsageError
from utils.iou import iou_matrix, iou_tables, random_iou
from utils.layout import IOU_FILE
from utils.masks import Mask
from utils.records import IoUSummary
from utils.runs import claim_output_dir, run_cli, setup_logging

logger = logging.getLogger(__name__)
PAIR_COLUMNS = ["a", "b", "iou", "random_iou", "chance_corrected", "intersection", "union", "kept_a", "kept_b", "weights"]



def parse_masks(items: list[str], base: Optional[str]) -> dict[str, str]:
    masks = {}
    for item in items:
        label, sep, reference = item.partition("=")
        if not sep or not label or not reference:
            raise UsageError(f"--masks item {item!r} is not LABEL=MASK: expected e.g. en=tickets/en/sparsity-0.90")
        if label in masks or label == "base" and base:
            raise UsageError(f"--masks label {label!r} is given twice: expected one mask per label")
        masks[label] = reference
    if base:
        masks["base"] = base
    if len(masks) < 2:
        raise UsageError(f"got {len(masks)} mask(s): expected at least two to compare")
    return masks


def main():
    # 1. Arguments: labelled masks, optional base, output dir (new or holding this same comparison).
    (args,) = parse_arguments("run_iou.py", __doc__)
    setup_logging(True)
    references = parse_masks(args.masks, args.base)
    claim_output_dir(args.output_dir, {"script": "run_iou.py", "masks": references})

    # 2. Load every mask once as packed words (checksums verified); refuse incomparable ones.
    start = time.perf_counter()
    masks = [Mask.load(ref, label) for label, ref in references.items()]
    overall, detail = iou_tables(masks)
    labels = [m.label for m in masks]
    logger.info("IoU of %d masks (%d pairs) in %.2f s", len(masks), len(overall), time.perf_counter() - start)

    # 3. Tables: pairs, per layer / module type, and one JSON holding everything.
    from utils.report import plot_iou_heatmap, plot_layer_iou, write_csv_atomic  # matplotlib, once there is something to draw

    out = Path(args.output_dir)
    write_csv_atomic(out / "iou.csv", overall, PAIR_COLUMNS)
    write_csv_atomic(out / "iou_layers.csv", detail, ["a", "b", "group_kind", "group"] + PAIR_COLUMNS[2:])
    density = masks[0].density
    matrix, random_matrix = iou_matrix(labels, overall), iou_matrix(labels, overall, key="random_iou")
    summary = IoUSummary(
        labels=labels,
        references=references,
        sparsity=masks[0].metadata["sparsity"],
        scope=masks[0].metadata["scope"],
        density=density,
        random_baseline=random_iou(density, density),
        matrix=matrix,
        random_matrix=random_matrix,
        vs_base={r["a"]: r["iou"] for r in overall if r["b"] == "base"},
        pairs=overall,
        layers=detail,
        suite_version=__version__,
    )

    # 4. Pictures: the heatmap, and IoU per layer (against the base when there is one).
    sparsity = summary.sparsity
    plot_iou_heatmap(labels, matrix, random_matrix, f"Ticket IoU at {sparsity:.0%} sparsity", out / "iou_heatmap.png")
    pairs = [(label, "base") for label in labels if label != "base"] if args.base else [(r["a"], r["b"]) for r in overall]
    plot_layer_iou(detail, pairs, f"Per-layer IoU at {sparsity:.0%} sparsity", out / "iou_layers.png")

    # 5. iou.json last: the file that marks the comparison done (a killed run re-runs whole).
    summary.write(out / IOU_FILE)
    for row in overall:
        print(f"{row['a']:>6} vs {row['b']:<6} IoU {row['iou']:.4f} (random {row['random_iou']:.4f})")
    print(f"-> {out}")


if __name__ == "__main__":
    run_cli(main)
