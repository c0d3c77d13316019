"""Intersection-over-Union of tickets' kept weights, computed on the packed mask bits.

Each mask is loaded once into one contiguous ``uint64`` buffer (tensors padded to whole words);
a pair costs one AND and one popcount (``numpy.bitwise_count``) per tensor, never an unpacked
bool or float copy. ``|A ∪ B| = |A| + |B| - |A ∩ B|`` needs no OR. Per-tensor intersections give
the per-layer and per-module figures for free.

Random baseline: two independent random masks of densities ``a`` and ``b`` have expected IoU
``ab / (a + b - ab)``, which is ``d / (2 - d)`` for equal densities ``d``.
"""

from __future__ import annotations

from itertools import combinations
from typing import Optional

import numpy as np

from .errors import UsageError
from .masks import Mask
from .structure import group_of


def check_comparable(masks: list[Mask]) -> None:
    """Masks of other shapes, scopes or sparsities cannot be compared: one clear error."""
    first = masks[0]
    for other in masks[1:]:
        if first.metadata["shapes"] != other.metadata["shapes"]:
            a, b = first.metadata["shapes"], other.metadata["shapes"]
            name = next((n for n in sorted(set(a) | set(b)) if a.get(n) != b.get(n)))
            raise UsageError(
                f"masks {first.label!r} and {other.label!r} cover different tensors or shapes ({name}: {a.get(name)} vs {b.get(name)}): "
                "expected tickets of the same architecture"
            )
        for key in ("scope", "sparsity"):
            if first.metadata.get(key) != other.metadata.get(key):
                raise UsageError(
                    f"masks {first.label!r} and {other.label!r} differ in {key} ({first.metadata.get(key)!r} vs {other.metadata.get(key)!r}): "
                    f"expected the same {key}"
                )


def intersections(a: Mask, b: Mask, scratch: Optional[np.ndarray] = None) -> dict[str, int]:
    """``|A ∩ B|`` per tensor: one AND and one popcount over the whole buffer (into ``scratch``,
    reused across pairs), then a sum per tensor slice."""
    if scratch is None or scratch.shape != a.words.shape:
        scratch = np.empty_like(a.words)
    np.bitwise_and(a.words, b.words, out=scratch)
    np.bitwise_count(scratch, out=scratch)
    names = list(a.slices)
    sums = np.add.reduceat(scratch, [a.slices[n].start for n in names])
    return {name: int(total) for name, total in zip(names, sums)}


def random_iou(density_a: float, density_b: float) -> float:
    """Expected IoU of two independent random masks with these densities."""
    both = density_a * density_b
    return both / (density_a + density_b - both) if density_a + density_b > 0 else 0.0


def chance_corrected(iou: float, random: float) -> float:
    """(IoU - random) / (1 - random): 0 for masks no closer than random ones, 1 for identical masks."""
    return (iou - random) / (1 - random) if random < 1 else float("nan")


def pair_rows(a: Mask, b: Mask, scratch: Optional[np.ndarray] = None) -> tuple[dict, list[dict]]:
    """The overall row and the per-layer / per-module rows of one pair."""
    inter = intersections(a, b, scratch)
    groups: dict[tuple[str, str], list[str]] = {}
    for name in inter:
        layer, module = group_of(name)
        groups.setdefault(("layer", str(layer) if layer is not None else "other"), []).append(name)
        groups.setdefault(("module", module), []).append(name)

    def row(names: list[str]) -> dict:
        i = sum(inter[n] for n in names)
        ka, kb = sum(a.kept[n] for n in names), sum(b.kept[n] for n in names)
        size = sum(a.sizes[n] for n in names)
        union = ka + kb - i
        iou, rnd = (i / union if union else 1.0), random_iou(ka / size, kb / size)
        return {
            "iou": iou,
            "random_iou": rnd,
            "chance_corrected": chance_corrected(iou, rnd),
            "intersection": i,
            "union": union,
            "kept_a": ka,
            "kept_b": kb,
            "weights": size,
        }

    overall = {"a": a.label, "b": b.label, **row(list(inter))}
    detail = [{"a": a.label, "b": b.label, "group_kind": kind, "group": group, **row(names)} for (kind, group), names in groups.items()]
    detail.sort(key=lambda r: (r["group_kind"], int(r["group"]) if r["group"].isdigit() else 10**6, r["group"]))
    return overall, detail


def iou_tables(masks: list[Mask]) -> tuple[list[dict], list[dict]]:
    """Every unordered pair's overall row and per-group rows."""
    check_comparable(masks)
    overall, detail = [], []
    scratch = np.empty_like(masks[0].words)
    for a, b in combinations(masks, 2):
        row, rows = pair_rows(a, b, scratch)
        overall.append(row)
        detail += rows
    return overall, detail


def iou_matrix(labels: list[str], overall: list[dict], key: str = "iou") -> list[list[float]]:
    """Square matrix (1.0 on the diagonal for ``iou``) from the pair rows."""
    index = {label: i for i, label in enumerate(labels)}
    matrix = [[1.0 if i == j else float("nan") for j in range(len(labels))] for i in range(len(labels))]
    for row in overall:
        i, j = index[row["a"]], index[row["b"]]
        matrix[i][j] = matrix[j][i] = row[key]
    if key != "iou":
        for i in range(len(labels)):
            matrix[i][i] = float("nan")
    return matrix
