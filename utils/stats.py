"""Uncertainty of error rates: percentile bootstrap over test utterances (Bisani & Ney, 2004),
through ``scipy.stats.bootstrap``.

A CER is a ratio of sums over utterances, ``sum(edits) / sum(reference characters)``, so the unit
that is resampled is the utterance (its edits and its length together), never the character.

- One run (one test set): resample its utterances with replacement, recompute the CER.
- Several seeds of the same cell: the seeds were tested on the same utterances, so an utterance is
  resampled with all its seeds' edits; the statistic is the pooled CER (equal to the mean over
  seeds, since every seed has the same reference lengths). The spread *between* seeds is reported
  beside it as a standard deviation.
- A mean over several languages (the paper's "average over non-matching languages"): each
  language's utterances are resampled independently (a stratified bootstrap), then the per-language
  CERs are averaged.
- A paired difference of two tickets: both are scored on the same resampled utterances, so the
  difficulty of an utterance cancels out; the interval excludes 0 when the difference is larger than
  what resampling the test set explains.

``Rates`` holds a cell's numbers; ``bootstrap_interval`` evaluates any of the statistics above on
one shared set of resamples (seeded: the same inputs give the same interval).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
from scipy.stats import bootstrap

from .errors import UsageError

N_RESAMPLES = 2000
CONFIDENCE = 0.95
SEED = 0


@dataclass(frozen=True)
class Rates:
    """Edit counts of one cell: ``edits[s, i]`` and ``lengths[s, i]`` for seed ``s``, utterance
    ``i`` (the same utterances, in the same order, for every seed)."""

    edits: np.ndarray
    lengths: np.ndarray

    def __post_init__(self):
        if self.edits.shape != self.lengths.shape or self.edits.ndim != 2:
            raise ValueError(f"edits {self.edits.shape} and lengths {self.lengths.shape}: expected equal (seeds, utterances) shapes")

    @classmethod
    def from_seeds(cls, seeds: list[tuple[list[int], list[int]]]) -> "Rates":
        """From ``[(edits, lengths) of seed 1, ...]``."""
        return cls(np.array([e for e, _ in seeds], dtype=np.float64), np.array([n for _, n in seeds], dtype=np.float64))

    @property
    def utterances(self) -> int:
        return self.edits.shape[1]

    def rate(self, index: Optional[np.ndarray] = None) -> np.ndarray:
        """Pooled rate over seeds and utterances; ``index`` (..., n) picks resampled utterances."""
        if index is None:
            return self.edits.sum() / self.lengths.sum()
        return self.edits[:, index].sum(axis=(0, -1)) / self.lengths[:, index].sum(axis=(0, -1))

    def per_seed(self) -> np.ndarray:
        return self.edits.sum(axis=1) / self.lengths.sum(axis=1)


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


Statistic = Callable[[dict[str, np.ndarray]], np.ndarray]


def bootstrap_interval(
    strata: dict[str, int], statistic: Statistic, n_resamples: int = N_RESAMPLES, confidence: float = CONFIDENCE, seed: int = SEED
) -> Interval:
    """Percentile interval of ``statistic`` under resampling of each stratum's utterances.

    ``strata`` maps a stratum (a test set, e.g. a downstream language) to its number of utterances;
    ``statistic`` receives ``{stratum: index array}`` (shape (n,) for the data itself, (B, n) for B
    resamples) and returns the statistic per resample. Strata are resampled independently."""
    names = list(strata)
    samples = [np.arange(strata[name]) for name in names]

    def on_indices(*indices: np.ndarray, axis: int = -1) -> np.ndarray:
        return statistic(dict(zip(names, (np.asarray(i, dtype=np.intp) for i in indices))))

    estimate = float(on_indices(*samples))
    result = bootstrap(
        tuple(samples), on_indices, n_resamples=n_resamples, vectorized=True, paired=False,
        confidence_level=confidence, method="percentile", rng=np.random.default_rng(seed),
    )
    return Interval(estimate, float(result.confidence_interval.low), float(result.confidence_interval.high))


def _check_same_test_set(cells: dict[str, Rates]) -> None:
    sizes = {name: rates.utterances for name, rates in cells.items()}
    if len(set(sizes.values())) > 1:
        raise UsageError(f"cells scored on different numbers of test utterances {sizes}: expected the same test set")


def rate_interval(rates: Rates, **kwargs) -> Interval:
    """CI of one cell's (seed-pooled) rate."""
    return bootstrap_interval({"test": rates.utterances}, lambda idx: rates.rate(idx["test"]), **kwargs)


def mean_rate_interval(cells: dict[str, Rates], **kwargs) -> Interval:
    """CI of the mean rate over several test sets (e.g. downstream languages), each resampled independently."""
    return bootstrap_interval(
        {name: rates.utterances for name, rates in cells.items()},
        lambda idx: np.mean([cells[name].rate(idx[name]) for name in cells], axis=0),
        **kwargs,
    )


def paired_difference_interval(a: dict[str, Rates], b: dict[str, Rates], **kwargs) -> Interval:
    """CI of ``mean rate of a - mean rate of b``, both on the same resampled utterances of each
    test set. ``a`` and ``b`` map test sets to rates; each side averages over its own test sets
    (they may differ, e.g. each ticket's non-matching languages); shared test sets are resampled
    once for both sides."""
    for name in set(a) & set(b):
        _check_same_test_set({"a": a[name], "b": b[name]})
    strata = {name: (a.get(name) or b.get(name)).utterances for name in list(a) + [n for n in b if n not in a]}

    def difference(idx):
        return np.mean([a[n].rate(idx[n]) for n in a], axis=0) - np.mean([b[n].rate(idx[n]) for n in b], axis=0)

    return bootstrap_interval(strata, difference, **kwargs)
