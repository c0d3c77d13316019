"""Typological distances between languages (URIEL+, read offline from the ``urielplus`` package)
and the permutation test that says whether a study's numbers follow them.

The question (the paper's "Next checks"): do languages that are close in phonology or inventory
share more of their tickets, and transfer better to each other? With a handful of languages a
correlation rests on few pairs, and its pairs are not independent (every pair sharing a language
shares its errors), so the p-value comes from permuting the languages themselves (Mantel, 1967):
all orderings when there are few, a seeded sample otherwise. The smallest p-value a design can
reach is ``1 / n!`` for ``n`` permuted languages, which the report prints beside it.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np

from .errors import UsageError

DISTANCES = ("phonological", "inventory", "genetic", "syntactic", "geographic")  # URIEL+'s distance types the report uses
EXACT_UP_TO = 40_320  # 8!: enumerate every permutation up to this many, else sample


def iso639_3(code: str) -> str:
    """URIEL+ names languages by ISO 639-3 (``en`` -> ``eng``)."""
    import langcodes

    try:
        return langcodes.Language.get(code).to_alpha3()
    except (LookupError, ValueError):
        raise UsageError(f"language {code!r} has no ISO 639-3 code: expected a language code such as en or ast") from None


@lru_cache(maxsize=1)
def _database():
    from urielplus import urielplus

    return urielplus.URIELPlus()


def distance_matrix(codes: Sequence[str], kind: str) -> np.ndarray:
    """URIEL+'s ``kind`` distance between every pair of ``codes`` (NaN where the database has no
    shared features for a pair). A language the database lacks is one line naming it."""
    if kind not in DISTANCES:
        raise UsageError(f"unknown distance {kind!r}: expected one of {', '.join(DISTANCES)}")
    iso = [iso639_3(code) for code in codes]
    previous = logging.root.manager.disable
    logging.disable(logging.INFO)  # URIEL+ logs every query's timing on the root logger
    try:
        database = _database()
        known = set(database.langs[0])
        for code, three in zip(codes, iso):
            if three not in known:
                raise UsageError(f"language {code!r} (ISO 639-3 {three!r}) is not in the URIEL+ database: no typological distance for it")
        values = database.new_distance(kind, iso)  # two codes give a number, more a matrix
    finally:
        logging.disable(previous)
    matrix = np.asarray([[0.0, values], [values, 0.0]] if len(iso) == 2 else values, dtype=np.float64)
    matrix[matrix < 0] = np.nan  # -1: no features both languages have
    np.fill_diagonal(matrix, 0.0)
    return matrix


@dataclass(frozen=True)
class Correlation:
    """Pearson r over ``pairs`` cells, and its permutation p-value (two-sided)."""

    r: float
    p: float
    pairs: int
    permutations: int
    exact: bool
    smallest_p: float  # the least p the permutations can give

    def to_dict(self) -> dict:
        return {"r": self.r, "p": self.p, "pairs": self.pairs, "permutations": self.permutations, "exact": self.exact, "smallest_p": self.smallest_p}


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    scale = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / scale) if scale > 0 else float("nan")


def permutation_correlation(values: np.ndarray, distances: np.ndarray, cells: Sequence[tuple[int, int]], permuted: Sequence[int], both: bool,
                            permutations: int = 9_999, seed: int = 0) -> Correlation:
    """Correlation of ``values[i, j]`` with ``distances[i, j]`` (square, over all languages) over
    ``cells``. The null shuffles the languages ``permuted`` (indices) among themselves on the row
    side of ``distances`` (``both``: rows and columns together, the Mantel test of two square
    matrices over the same languages). Cells where either is NaN are left out."""
    cells = [(i, j) for i, j in cells if np.isfinite(values[i, j]) and np.isfinite(distances[i, j])]
    if len(cells) < 3:
        raise UsageError(f"{len(cells)} language pair(s) with both numbers: expected at least 3 to correlate")
    rows, cols = np.array([c[0] for c in cells]), np.array([c[1] for c in cells])
    x = values[rows, cols]
    observed = _pearson(x, distances[rows, cols])
    permuted = np.asarray(permuted)
    exact = math.factorial(len(permuted)) <= EXACT_UP_TO
    if exact:
        shuffles = (np.array(p) for p in itertools.permutations(permuted))
    else:
        rng = np.random.default_rng(seed)
        shuffles = itertools.chain([permuted], (rng.permutation(permuted) for _ in range(permutations)))
    extreme = total = 0
    for shuffle in shuffles:
        order = np.arange(distances.shape[0])
        order[permuted] = shuffle
        y = distances[order[rows], order[cols] if both else cols]
        ok = np.isfinite(y)
        r = _pearson(x[ok], y[ok])
        total += 1
        extreme += bool(np.isfinite(r) and abs(r) >= abs(observed) - 1e-12)
    return Correlation(observed, extreme / total, len(cells), total, exact, 1 / total)


def language_pairs(labels: Sequence[str]) -> list[tuple[int, int]]:
    """Every unordered pair of different languages (the upper triangle)."""
    return [(i, j) for i in range(len(labels)) for j in range(i + 1, len(labels))]


def transfer_cells(languages: Sequence[str], upstream: Sequence[str], downstream: Sequence[str]) -> list[tuple[int, int]]:
    """(row, column) into ``languages`` of every transfer between different languages: a
    same-language transfer has no distance to speak of."""
    return [(languages.index(u), languages.index(d)) for u in upstream for d in downstream if u != d]

