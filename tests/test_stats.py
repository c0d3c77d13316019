"""Bootstrap intervals of CER against an independent numpy implementation drawn from the same seed."""

import numpy as np
import pytest

from utils.stats import N_RESAMPLES, Rates, mean_rate_interval, paired_difference_interval, rate_interval


def synthetic(n: int, p: float, seeds: int = 1, rng_seed: int = 0) -> Rates:
    """Utterances of 5-60 characters with edits ~ Binomial(length, p); the same lengths for every seed."""
    rng = np.random.default_rng(rng_seed)
    lengths = np.tile(rng.integers(5, 60, n), (seeds, 1)).astype(float)
    return Rates(rng.binomial(lengths.astype(int), p).astype(float), lengths)


def numpy_percentile_bootstrap(strata_sizes: list[int], statistic, seed: int = 0, n_resamples: int = N_RESAMPLES):
    """Loop-by-loop reference: one index draw of shape (B, n) per stratum, in order, then the
    2.5th and 97.5th percentiles (linear interpolation) of the statistic."""
    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, n, (n_resamples, n)) for n in strata_sizes]
    values = np.array([statistic([d[b] for d in draws]) for b in range(n_resamples)])
    return np.percentile(values, [2.5, 97.5])


def pooled(rates: Rates, idx) -> float:
    return sum(rates.edits[s][idx].sum() for s in range(len(rates.edits))) / sum(rates.lengths[s][idx].sum() for s in range(len(rates.edits)))


def test_interval_contains_estimate_and_shrinks_with_more_utterances():
    widths = []
    for n in (100, 400, 1600):
        rates = synthetic(n, 0.3, rng_seed=n)
        ci = rate_interval(rates)
        assert ci.low < ci.estimate < ci.high
        assert ci.estimate == pytest.approx(rates.edits.sum() / rates.lengths.sum())
        widths.append(ci.high - ci.low)
    assert widths[1] < 0.7 * widths[0] and widths[2] < 0.7 * widths[1]  # ~1/sqrt(n): halves per 4x


def test_seeds_are_pooled_on_shared_utterances():
    rates = synthetic(200, 0.25, seeds=3)
    assert rates.rate() == pytest.approx(rates.per_seed().mean())  # same lengths per seed: pooled = mean
    low, high = numpy_percentile_bootstrap([200], lambda idx: pooled(rates, idx[0]))
    ci = rate_interval(rates)
    assert (ci.low, ci.high) == pytest.approx((low, high), abs=1e-12)


def test_paired_difference_matches_numpy_reference():
    a, b = synthetic(300, 0.30, seeds=2, rng_seed=1), synthetic(300, 0.33, seeds=2, rng_seed=2)
    b = Rates(b.edits, a.lengths.copy())  # the same utterances: the same reference lengths
    b = Rates(np.minimum(b.edits, b.lengths), b.lengths)
    ci = paired_difference_interval({"ca": b}, {"ca": a})
    low, high = numpy_percentile_bootstrap([300], lambda idx: pooled(b, idx[0]) - pooled(a, idx[0]))
    assert ci.estimate == pytest.approx(b.rate() - a.rate())
    assert (ci.low, ci.high) == pytest.approx((low, high), abs=1e-12)
    assert ci.excludes_zero == (low > 0 or high < 0)


def test_averages_over_languages_resample_each_language_independently():
    ca_u, en_u, ca_v, en_v = synthetic(120, 0.3, rng_seed=3), synthetic(80, 0.4, rng_seed=4), synthetic(120, 0.2, rng_seed=5), synthetic(80, 0.5, rng_seed=6)
    ca_v, en_v = Rates(np.minimum(ca_v.edits, ca_u.lengths), ca_u.lengths), Rates(np.minimum(en_v.edits, en_u.lengths), en_u.lengths)
    ci = mean_rate_interval({"ca": ca_u, "en": en_u})
    low, high = numpy_percentile_bootstrap([120, 80], lambda idx: (pooled(ca_u, idx[0]) + pooled(en_u, idx[1])) / 2)
    assert (ci.low, ci.high) == pytest.approx((low, high), abs=1e-12)
    # Paired difference of two averages over different language sets: shared languages share draws.
    ci = paired_difference_interval({"ca": ca_u, "en": en_u}, {"ca": ca_v})
    low, high = numpy_percentile_bootstrap([120, 80], lambda idx: (pooled(ca_u, idx[0]) + pooled(en_u, idx[1])) / 2 - pooled(ca_v, idx[0]))
    assert (ci.low, ci.high) == pytest.approx((low, high), abs=1e-12)


def test_different_test_sets_are_refused():
    with pytest.raises(ValueError, match="different numbers of test utterances"):
        paired_difference_interval({"ca": synthetic(10, 0.3)}, {"ca": synthetic(11, 0.3)})
