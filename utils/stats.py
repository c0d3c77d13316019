"""Uncertainty of error rates, counting both sources of noise a study is exposed to.

A CER is a ratio of sums over utterances, ``sum(edits) / sum(reference characters)``; the unit of
test-set sampling is the utterance (its edits and its length together), never the character.

**One run** (``rate_interval``, the per-run interval of ``results.csv``): percentile bootstrap over
test utterances (Bisani & Ney, 2004) through ``scipy.stats.bootstrap``. It covers test-set sampling
only.

**Everything a report compares** (``combination_interval`` and its shorthands) is a weighted sum of
cell CERs, ``T = sum_j w_j CER_j``: one cell, a mean over downstream languages, a paired difference,
a dominant advantage, a difference between two bases. With ``k`` seeds of every cell (seed ``s`` of
each cell tested on the same utterances, in the same order) the estimate is the mean over seeds of
the per-seed statistic ``T_s`` and its variance has two components:

- **training noise**: ``var_s(T_s) / k``, the between-seed variance of the statistic itself (so a
  paired difference keeps what the two tickets' seeds share), ``k - 1`` degrees of freedom;
- **test-set sampling**: the delta-method variance of the seed-averaged statistic over utterances,
  per test set ``d`` with ``n_d`` utterances ``var_i(z_d[i]) / n_d``, where ``z_d[i]`` is utterance
  ``i``'s linearised contribution, ``w_j (e_ji - CER_j l_i) / mean(l)``, averaged over seeds and
  summed over the terms on ``d``; ``n_d - 1`` degrees of freedom.

The interval is ``T -+ t(k - 1) * sqrt(V)``, ``V`` the sum of the components: a Student t over
seeds whose standard error also carries the test-set variance. ``V`` is the variance of a grand
mean in a crossed seeds x utterances random-effects design (Cornfield & Tukey, 1956), counting the
seed-by-utterance interaction in both components (slightly conservative); adding the two sources
follows Bouthillier et al. (2021, "Accounting for variance in machine learning benchmarks", MLSys).
The seeds' ``k - 1`` degrees of freedom are used rather than Welch-Satterthwaite's estimate
(Satterthwaite, 1946), whose df grows exactly when the seed variance is underestimated: in the
calibration (docs/statistics/calibration.md) it covered 87-90% at k = 2 and 93-94% at k = 3 with large training noise. A
bootstrap over seeds is not used: with three seeds it has only ten distinct resamples and its
intervals are far too narrow. With one seed the training component is unknown: the interval covers
test-set sampling only (Welch-Satterthwaite over the test sets), and reports say so and print no
significance marks.

Calibration (``tests/test_stats.py``; the table is docs/statistics/calibration.md): simulated studies
with per-utterance difficulty, per-seed training offsets and per-utterance-and-seed noise, and a
known truth. **Significance marks** are Holm-Bonferroni over the comparisons of one table
(``holm``); **detectable differences** are ``(t(1 - alpha/2) + t(power)) * se`` at the same
degrees of freedom (Bloom, 1995, "Minimum detectable effects").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
from scipy.special import stdtr, stdtrit
from scipy.stats import bootstrap

from .errors import UsageError

N_RESAMPLES = 2000
CONFIDENCE = 0.95
ALPHA = 1 - CONFIDENCE
POWER = 0.8
SEED = 0


@dataclass(frozen=True)
class Rates:
    """Edit counts of one cell: ``edits[s, i]`` and ``lengths[s, i]`` for seed ``s``, utterance
    ``i`` (the same utterances, in the same order, for every seed). ``seeds`` names the rows
    (0, 1, ... when not given): statistics over several cells pair their runs by seed."""

    edits: np.ndarray
    lengths: np.ndarray
    seeds: tuple[int, ...] = field(default=())

    def __post_init__(self):
        if self.edits.shape != self.lengths.shape or self.edits.ndim != 2:
            raise ValueError(f"edits {self.edits.shape} and lengths {self.lengths.shape}: expected equal (seeds, utterances) shapes")
        if not self.seeds:
            object.__setattr__(self, "seeds", tuple(range(self.edits.shape[0])))
        if len(self.seeds) != self.edits.shape[0]:
            raise ValueError(f"seeds {self.seeds} for {self.edits.shape[0]} rows of edits: expected one seed per row")

    @classmethod
    def from_seeds(cls, seeds: list[tuple[list[int], list[int]]], names: Sequence[int] = ()) -> "Rates":
        """From ``[(edits, lengths) of seed 1, ...]``, the seeds named by ``names``."""
        return cls(np.array([e for e, _ in seeds], dtype=np.float64), np.array([n for _, n in seeds], dtype=np.float64), tuple(names))

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

    def of_seed(self, seed: int) -> float:
        """The CER of one seed's run."""
        row = self.seeds.index(seed)
        return float(self.edits[row].sum() / self.lengths[row].sum())

    def only(self, seeds: Sequence[int]) -> "Rates":
        """The rows of these seeds, in this order."""
        rows = [self.seeds.index(s) for s in seeds]
        return Rates(self.edits[rows], self.lengths[rows], tuple(seeds))

    def contributions(self) -> np.ndarray:
        """Each utterance's linearised contribution to each seed's CER, (seeds, n): row means are
        the per-seed CERs, and the variance over utterances is the delta-method variance of a ratio."""
        per_seed = self.per_seed()[:, None]
        return per_seed + (self.edits - per_seed * self.lengths) / self.lengths.mean(axis=1, keepdims=True)


@dataclass(frozen=True)
class Interval:
    """An estimate with its interval; ``se`` and ``df`` give its t distribution (``seeds``: how
    many seeds it pools; with one, only test-set sampling is counted)."""

    estimate: float
    low: float
    high: float
    se: float = float("nan")
    df: float = float("nan")
    seeds: int = 1

    @property
    def p_value(self) -> float:
        """Two-sided p-value of "the true value is 0"."""
        if not self.se > 0:
            return 1.0 if self.estimate == 0 else 0.0
        return float(2 * stdtr(self.df, -abs(self.estimate) / self.se))

    def numbers(self, marked: bool) -> dict:
        """What a report's numbers file keeps of it."""
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "p": self.p_value, "marked": marked}

    def detectable(self, alpha: float = ALPHA, power: float = POWER) -> float:
        """The smallest true difference a two-sided test at ``alpha`` would find with ``power``,
        given this design's standard error and degrees of freedom."""
        return float((stdtrit(self.df, 1 - alpha / 2) + stdtrit(self.df, power)) * self.se)


# ---------------------------------------------------------------------------------------------
# One run: percentile bootstrap over utterances


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


def rate_interval(rates: Rates, **kwargs) -> Interval:
    """Bootstrap CI of one run's (or one cell's seed-pooled) rate over test utterances only."""
    return bootstrap_interval({"test": rates.utterances}, lambda idx: rates.rate(idx["test"]), **kwargs)


# ---------------------------------------------------------------------------------------------
# Statistics of a study: seeds and utterances

Term = tuple[float, str, Rates]  # (weight, test set, cell)


def common_seeds(cells: Iterable[Rates]) -> list[int]:
    """The seeds every cell has, in order: statistics over several cells pair runs by seed."""
    cells = list(cells)
    shared = set(cells[0].seeds).intersection(*(c.seeds for c in cells[1:]))
    return [s for s in cells[0].seeds if s in shared]


def combination_interval(terms: Sequence[Term], extra: Sequence[tuple[float, float]] = (), confidence: float = CONFIDENCE) -> Interval:
    """Interval of ``sum_j w_j CER_j`` over the seeds all terms share (see the module docstring).

    ``terms``: (weight, test set, cell); the cells on one test set must have been scored on the
    same utterances. ``extra``: further independent variance components as (variance, degrees of
    freedom), e.g. the uncertainty of an estimated adjustment."""
    seeds = common_seeds(rates for _, _, rates in terms)
    if not seeds:
        raise UsageError("cells with no seed in common: expected runs of the same seeds to compare")
    k = len(seeds)
    per_seed = np.zeros(k)
    by_test_set: dict[str, np.ndarray] = {}
    for weight, test_set, rates in terms:
        rates = rates.only(seeds)
        per_seed += weight * rates.per_seed()
        z = weight * rates.contributions().mean(axis=0)
        if test_set in by_test_set and by_test_set[test_set].shape != z.shape:
            raise UsageError(f"cells scored on {by_test_set[test_set].size} and {z.size} {test_set} test utterances: expected the same test set")
        by_test_set[test_set] = by_test_set.get(test_set, 0) + z
    components = [(float(np.var(per_seed, ddof=1)) / k, k - 1)] if k > 1 else []
    components += [(float(np.var(z, ddof=1)) / z.size, z.size - 1) for z in by_test_set.values() if z.size > 1]
    components += [c for c in extra if c[0] > 0]
    estimate = float(per_seed.mean())
    variance = sum(v for v, _ in components)
    if not variance > 0:
        return Interval(estimate, estimate, estimate, 0.0, float("inf"), k)
    # With seeds, the seeds' k - 1 degrees of freedom (conservative: Welch-Satterthwaite's estimated
    # df rises exactly when the seed variance is underestimated, and covered 87-90% at k = 2).
    df = k - 1 if k > 1 else variance**2 / sum(v**2 / d for v, d in components if v > 0)
    half = float(stdtrit(df, (1 + confidence) / 2)) * variance**0.5
    return Interval(estimate, estimate - half, estimate + half, variance**0.5, float(df), k)


def cell_interval(rates: Rates, test_set: str = "test", **kwargs) -> Interval:
    """One cell's CER over its seeds."""
    return combination_interval([(1.0, test_set, rates)], **kwargs)


def mean_interval(cells: dict[str, Rates], **kwargs) -> Interval:
    """The mean CER over several test sets (e.g. downstream languages), one cell each."""
    return combination_interval([(1 / len(cells), name, rates) for name, rates in cells.items()], **kwargs)


def difference_interval(a: dict[str, Rates], b: dict[str, Rates], **kwargs) -> Interval:
    """``mean CER of a - mean CER of b`` over the same test sets (like with like), paired by
    utterance and by seed."""
    if set(a) != set(b):
        raise UsageError(f"a difference over test sets {sorted(a)} and {sorted(b)}: expected the same test sets on both sides")
    terms = [(1 / len(a), name, rates) for name, rates in a.items()] + [(-1 / len(b), name, rates) for name, rates in b.items()]
    return combination_interval(terms, **kwargs)


def holm(p_values: Sequence[float], alpha: float = ALPHA) -> list[bool]:
    """Which hypotheses Holm's step-down procedure (Holm, 1979) rejects at family-wise level
    ``alpha``: the ``j``-th smallest p-value is compared with ``alpha / (m - j)`` until one fails.
    (statsmodels' ``multipletests(method="holm")`` gives the same answer, checked in the tests, but
    runs a full ``gc.collect()`` on every call: 0.45 s per table once torch is loaded.)"""
    order = np.argsort(p_values, kind="stable")
    reject = [False] * len(p_values)
    for j, i in enumerate(order):
        if p_values[i] > alpha / (len(p_values) - j):
            break
        reject[i] = True
    return reject


def holm_marks(intervals: Sequence[Interval], alpha: float = ALPHA) -> list[bool]:
    """The marks of a table's intervals: Holm over their p-values, none when any counts one seed
    only (its interval misses training noise)."""
    if not intervals or min(ci.seeds for ci in intervals) < 2:
        return [False] * len(intervals)
    return holm([ci.p_value for ci in intervals], alpha)


def detectable_line(intervals: Sequence[Interval], alpha: float = ALPHA, power: float = POWER) -> str:
    """One sentence: the smallest true difference the table's design would detect with ``power``,
    at Holm's strictest level (``alpha / m``: what a lone true difference among ``m`` comparisons
    must pass to be marked) and, for reference, at ``alpha`` for a single comparison."""
    usable = [ci for ci in intervals if ci.se > 0]
    if not usable:
        return ""
    m = len(intervals)
    corrected = float(np.median([100 * ci.detectable(alpha / m, power) for ci in usable]))
    single = float(np.median([100 * ci.detectable(alpha, power) for ci in usable]))
    seeds = usable[0].seeds
    if seeds < 2:
        return (f"Detectable difference (median over the {len(usable)} comparisons), counting test sampling only since there is one seed: "
                f"**{corrected:.2f} pp** at Holm's level {alpha:g}/{m} ({single:.2f} pp for one comparison alone at {alpha:g}), with "
                f"{power:.0%} power. Training noise would raise it; with one seed it is unknown, and nothing is marked.")
    return (f"Detectable difference (median over the {len(usable)} comparisons): a true difference of **{corrected:.2f} pp** or more would be "
            f"marked with {power:.0%} power at Holm's level {alpha:g}/{m} ({single:.2f} pp for one comparison alone at {alpha:g}); "
            f"{seeds} seeds: the observed seed spread and test sampling. An unmarked difference is no evidence against a difference smaller than that.")
