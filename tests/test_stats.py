"""Intervals of CER: the per-run bootstrap against a numpy re-implementation drawn from the same seed,
and the study intervals (seeds and utterances) against a hand-written reference and against
simulated studies with a known truth: coverage, the family-wise rate of marks under a null, and the
adjustment for upstream quality with a planted confound.

The simulated studies come from ``tests/simulation.py`` (the generator ``bench/stats_calibration.py``
also uses for the table in docs/statistics.md)."""

import numpy as np
import pytest
from scipy import stats as scipy_stats

from tests.conftest import result_row
from tests.simulation import NOISE_LEVELS, simulate
from utils.bases import compare_bases
from utils.records import StudyResults
from utils.report import paired_table
from utils.stats import N_RESAMPLES, Rates, cell_interval, combination_interval, difference_interval, holm, mean_interval, rate_interval


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


def test_run_bootstrap_matches_numpy_and_shrinks_with_more_utterances():
    widths = []
    for n in (100, 400, 1600):
        rates = synthetic(n, 0.3, rng_seed=n)
        ci = rate_interval(rates)
        assert ci.low < ci.estimate < ci.high
        assert ci.estimate == pytest.approx(rates.edits.sum() / rates.lengths.sum())
        widths.append(ci.high - ci.low)
    assert widths[1] < 0.7 * widths[0] and widths[2] < 0.7 * widths[1]  # ~1/sqrt(n): halves per 4x
    rates = synthetic(200, 0.25)
    low, high = numpy_percentile_bootstrap([200], lambda idx: pooled(rates, idx[0]))
    assert (rate_interval(rates).low, rate_interval(rates).high) == pytest.approx((low, high), abs=1e-12)


def reference_interval(cells: list[tuple[float, Rates]], confidence: float = 0.95):
    """Written out for one test set: per-seed statistic, the delta-method variance of a ratio over
    utterances (Cochran 1977, 6.9: var(e - R l) / (n mean(l)^2)) of the seed-averaged statistic, t with k - 1 df."""
    k, n = cells[0][1].edits.shape
    per_seed = sum(w * r.edits.sum(1) / r.lengths.sum(1) for w, r in cells)
    residual = sum(w * np.mean([(r.edits[s] - r.edits[s].sum() / r.lengths[s].sum() * r.lengths[s]) / r.lengths[s].mean() for s in range(k)], axis=0)
                   for w, r in cells)
    variance = per_seed.var(ddof=1) / k + residual.var(ddof=1) / n if k > 1 else residual.var(ddof=1) / n
    half = scipy_stats.t.ppf((1 + confidence) / 2, k - 1 if k > 1 else n - 1) * np.sqrt(variance)
    return per_seed.mean(), per_seed.mean() - half, per_seed.mean() + half


def test_study_interval_against_a_written_out_reference():
    a, b = synthetic(150, 0.30, seeds=3, rng_seed=1), synthetic(150, 0.36, seeds=3, rng_seed=2)
    b = Rates(np.minimum(b.edits, a.lengths), a.lengths.copy())
    for seeds in (1, 3):
        ca, cb = Rates(a.edits[:seeds], a.lengths[:seeds]), Rates(b.edits[:seeds], b.lengths[:seeds])
        ci = cell_interval(ca)
        assert (ci.estimate, ci.low, ci.high) == pytest.approx(reference_interval([(1.0, ca)]), abs=1e-12)
        assert ci.estimate == pytest.approx(ca.rate())  # the same lengths in every seed: mean over seeds = pooled rate
        d = difference_interval({"ca": cb}, {"ca": ca})
        assert (d.estimate, d.low, d.high) == pytest.approx(reference_interval([(1.0, cb), (-1.0, ca)]), abs=1e-12)
        assert d.seeds == seeds and d.p_value == pytest.approx(2 * scipy_stats.t.sf(abs(d.estimate) / d.se, d.df))
    # Seeds pair by name: cells with seeds (0, 1, 2) and (2, 0) compare seeds 0 and 2 only, in that order.
    shuffled = Rates(b.edits[[2, 0]], b.lengths[[2, 0]], (2, 0))
    named = Rates(a.edits, a.lengths, (0, 1, 2))
    expected = difference_interval({"ca": Rates(b.edits[[0, 2]], b.lengths[[0, 2]])}, {"ca": Rates(a.edits[[0, 2]], a.lengths[[0, 2]])})
    assert difference_interval({"ca": shuffled}, {"ca": named}) == expected
    # A mean over two test sets adds their variances; like with like is enforced.
    en = synthetic(80, 0.5, seeds=3, rng_seed=3)
    two = mean_interval({"ca": a, "en": en})
    assert two.estimate == pytest.approx((a.rate() + en.rate()) / 2)
    with pytest.raises(ValueError, match=r"over test sets \['ca', 'en'\] and \['ca'\]: expected the same test sets"):
        difference_interval({"ca": a, "en": en}, {"ca": b})
    with pytest.raises(ValueError, match="cells scored on 150 and 80 ca test utterances"):
        combination_interval([(1.0, "ca", a), (-1.0, "ca", en)])


@pytest.mark.parametrize("seeds", [3, 5])
def test_intervals_cover_the_truth_with_and_without_training_noise(seeds):
    for tau in NOISE_LEVELS.values():
        rng = np.random.default_rng(100 * seeds + int(1000 * tau))
        covered = {"cell": 0, "difference": 0}
        studies = 500
        for _ in range(studies):
            cells = simulate(rng, seeds, 100, tau, {"a": 0.40, "b": 0.45})
            cell, diff = cell_interval(cells["a"]), difference_interval({"t": cells["a"]}, {"t": cells["b"]})
            covered["cell"] += cell.low <= 0.40 <= cell.high
            covered["difference"] += diff.low <= -0.05 <= diff.high
        for name, count in covered.items():
            assert count / studies >= 0.93, f"{name} coverage {count / studies:.3f} at k={seeds}, tau={tau}"


def test_holm_against_a_hand_computed_case():
    # p sorted: .001 <= .05/4 and .011 <= .05/3 are rejected; .03 > .05/2 stops, so .04 is kept although .04 <= .05.
    assert holm([0.03, 0.001, 0.04, 0.011]) == [False, True, False, True]
    assert holm([]) == []
    from statsmodels.stats.multitest import multipletests

    rng = np.random.default_rng(3)
    for _ in range(20):  # the reference implementation agrees on random families, ties included
        p = np.round(rng.uniform(0, 0.06, rng.integers(1, 12)) ** 2 * 10, 3)
        assert holm(list(p)) == list(multipletests(p, alpha=0.05, method="holm")[0])


def _rows(cells: dict[str, Rates], sparsity: float = 0.8) -> list[dict]:
    rows = []
    for name, rates in cells.items():
        up, down = name.split("->")
        for s in range(len(rates.seeds)):
            rows.append(result_row(up, down, sparsity, rates.edits[s].astype(int).tolist(), rates.lengths[s].astype(int).tolist(), seed=s))
    return rows


def test_no_true_difference_marks_at_most_five_percent_of_tables():
    rng = np.random.default_rng(7)
    tickets, downstream = ["en", "de", "es"], ["ca", "fr"]
    names = [f"{u}->{d}" for u in tickets for d in downstream]
    tables, any_mark = 500, 0
    for _ in range(tables):
        cells = simulate(rng, 3, 60, 0.03, {name: 0.45 for name in names}, {name: name.split("->")[1] for name in names})
        _, numbers = paired_table(_rows(cells), 0.8, tickets, downstream)
        any_mark += any(v["marked"] for v in numbers["family"].values())
    assert any_mark / tables <= 0.05
    # The same design with a large true difference is found: the marks are not switched off.
    cells = simulate(rng, 3, 60, 0.03, {name: 0.30 if name.startswith("de") else 0.55 for name in names}, {n: n.split("->")[1] for n in names})
    _, numbers = paired_table(_rows(cells), 0.8, tickets, downstream)
    assert numbers["family"]["en-de@avg"]["marked"] and numbers["family"]["en-de@avg"]["estimate"] > 0.15


def _base_study(rng, seeds: int, difficulty: dict[str, float], advantage: float, slope: float = 0.6) -> StudyResults:
    """Three tickets on ca and fr; the upstream models' own CER is the language's difficulty plus
    training noise, and each ticket's transfer CER follows its own upstream CER with ``slope``; the
    en ticket transfers ``advantage`` better than that predicts."""
    own_sets = {f"{u}->{u}": u for u in difficulty}
    own = simulate(rng, seeds, 150, 0.0, {f"{u}->{u}": difficulty[u] for u in difficulty}, own_sets)
    training = {u: rng.normal(0, 0.04, seeds) for u in difficulty}  # a worse fine-tune in one seed: a worse upstream model
    own_rows, rows = [], []
    for u in difficulty:
        rates = own[f"{u}->{u}"]
        shifted = np.clip(rates.edits + np.round(training[u][:, None] * rates.lengths), 0, rates.lengths)
        for s in range(seeds):
            own_rows.append(result_row(u, u, 0.0, shifted[s].astype(int).tolist(), rates.lengths[s].astype(int).tolist(), seed=s) | {"upstream": u})
    own_cer = {u: np.array([np.mean([r["test_cer"] for r in own_rows if r["upstream"] == u and r["seed"] == s]) for s in range(seeds)]) for u in difficulty}
    for d in ("ca", "fr"):
        lengths = rng.integers(20, 80, 150)
        hard = rng.normal(0, 0.08, 150)
        for u in difficulty:
            for s in range(seeds):
                p = 0.2 + slope * own_cer[u][s] - (advantage if u == "en" else 0.0) + hard + rng.normal(0, 0.05, 150)
                edits = rng.binomial(lengths, np.clip(p, 0.005, 0.995))
                rows.append(result_row(u, d, 0.8, edits.tolist(), lengths.tolist(), seed=s))
    return StudyResults(rows, {}, {}, own_rows)


def test_upstream_quality_adjustment_removes_a_planted_confound_and_keeps_a_planted_advantage():
    rng = np.random.default_rng(11)
    studies = 60
    confound = {"raw_negative": 0, "adjusted_has_zero": 0}
    planted = {"raw_has_truth": 0, "adjusted_has_truth": 0}
    for _ in range(studies):
        # English is harder to fine-tune (own CER 0.65 against 0.40/0.50), and its ticket is no better or worse than that predicts.
        _, numbers = compare_bases({"A": _base_study(rng, 5, {"en": 0.65, "de": 0.40, "es": 0.50}, 0.0)}, 0.8, ["en", "de", "es"], ["ca", "fr"], "en")
        confound["raw_negative"] += numbers["advantage"]["A"]["high"] < 0
        confound["adjusted_has_zero"] += numbers["adjusted"]["A"]["low"] <= 0 <= numbers["adjusted"]["A"]["high"]
        # English as hard as the others on average, and its ticket truly transfers 5 points better.
        _, numbers = compare_bases({"A": _base_study(rng, 5, {"en": 0.45, "de": 0.40, "es": 0.50}, 0.05)}, 0.8, ["en", "de", "es"], ["ca", "fr"], "en")
        planted["raw_has_truth"] += numbers["advantage"]["A"]["low"] <= 0.05 <= numbers["advantage"]["A"]["high"]
        planted["adjusted_has_truth"] += numbers["adjusted"]["A"]["low"] <= 0.05 <= numbers["adjusted"]["A"]["high"]
    assert confound["raw_negative"] / studies >= 0.8  # the confound alone shows as a "disadvantage" of English...
    assert confound["adjusted_has_zero"] / studies >= 0.9  # ...which the adjustment removes
    assert planted["raw_has_truth"] / studies >= 0.9 and planted["adjusted_has_truth"] / studies >= 0.9
