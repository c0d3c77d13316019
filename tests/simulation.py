"""Simulated studies with a known truth, for the calibration of ``utils.stats`` (tests/test_stats.py
and bench/stats_calibration.py).

Utterance ``i`` of a test set has ``l_i`` reference characters (uniform 20-79) and a difficulty
``b_i ~ N(0, 0.10)`` shared by every run on that test set; each seed ``s`` has an offset
``g_s ~ N(0, tau/2)`` shared by every cell of the seed (its base) and each cell-and-seed an offset
``a_cs ~ N(0, tau)`` (training noise: tau = 0, 0.02 or 0.08 for absent, moderate, large); each
utterance-and-seed a noise ``e ~ N(0, 0.05)``. The error probability ``mu_c + g_s + a_cs + b_i +
e``, clipped to [0.005, 0.995], draws ``Binomial(l_i, p)`` edits. The true CER of a cell is
``mu_c`` (clipping is rare at the values used), so a difference of two cells is ``mu_a - mu_b``.
"""

from __future__ import annotations

import numpy as np

from utils.stats import Rates

NOISE_LEVELS = {"absent": 0.0, "moderate": 0.02, "large": 0.08}


def simulate(rng, seeds: int, n: int, tau: float, mus: dict[str, float], test_set: dict[str, str] | None = None) -> dict[str, Rates]:
    """One simulated study (see the module docstring): a cell per name in ``mus``, on the test set
    ``test_set[name]`` (all on one by default)."""
    test_set = test_set or {c: "test" for c in mus}
    sets = {}
    for name in sorted(set(test_set.values())):
        sets[name] = (rng.integers(20, 80, n), rng.normal(0, 0.10, n))
    base = rng.normal(0, tau / 2, seeds)
    cells = {}
    for c, mu in mus.items():
        lengths, difficulty = sets[test_set[c]]
        offset = rng.normal(0, tau, seeds)
        p = np.clip(mu + base[:, None] + offset[:, None] + difficulty[None, :] + rng.normal(0, 0.05, (seeds, n)), 0.005, 0.995)
        tiled = np.tile(lengths, (seeds, 1))
        cells[c] = Rates(rng.binomial(tiled, p).astype(float), tiled.astype(float))
    return cells
