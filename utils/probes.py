"""Linear probes on frozen representations (scikit-learn's ridge classifier on standardised
features: one least-squares fit per class, cheap enough for every layer of every model and
language; a logistic regression took 100-400x longer per fit on the demo's phone frames for about
8 points more accuracy, the same for every model, which is not what the comparisons need): how well a layer's states predict a
label (language identity per utterance, the phone at each frame), under repeated stratified k-fold
cross-validation, beside the same probe trained on shuffled labels (what chance looks like for this
data). Frame-level probes keep each utterance's frames in one fold (``groups``): frames of one
clip share its voice, so splitting them would let a probe recognise the voice instead of the phone.

The interval over probe seeds and folds uses Nadeau and Bengio's (2003) corrected resampled
t-test variance, ``(1/J + n_test/n_train) s^2`` over the J = seeds x folds accuracies: the folds
share training data, so the plain ``s^2 / J`` would be too narrow.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from scipy.special import stdtrit

from .errors import UsageError
from .stats import CONFIDENCE, Interval


def probe_accuracies(features: np.ndarray, labels: np.ndarray, seeds: int = 3, folds: int = 5, shuffled: bool = False,
                     groups: Optional[np.ndarray] = None) -> np.ndarray:
    """Held-out accuracy of a standardised ridge-classifier probe, one per (seed, fold); with
    ``shuffled`` the labels are permuted (per seed) first: the control that should give chance;
    with ``groups`` the examples of a group stay in one fold."""
    from sklearn.linear_model import RidgeClassifier
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels = np.asarray(labels)
    smallest = min(np.unique(labels, return_counts=True)[1]) if labels.size else 0
    if len(np.unique(labels)) < 2 or smallest < folds:
        raise UsageError(f"probe labels {sorted(set(labels.tolist()))} with {smallest} example(s) in the rarest: expected two classes or more, "
                         f"each with at least {folds} examples (one per fold)")
    scores = []
    for seed in range(seeds):
        target = np.random.default_rng(seed).permutation(labels) if shuffled else labels
        probe = make_pipeline(StandardScaler(), RidgeClassifier())
        splitter = (StratifiedKFold if groups is None else StratifiedGroupKFold)(folds, shuffle=True, random_state=seed)
        scores.append(cross_val_score(probe, features, target, groups=groups, cv=splitter))
    return np.concatenate(scores)


def accuracy_interval(accuracies: np.ndarray, folds: int, confidence: float = CONFIDENCE) -> Interval:
    """Mean accuracy over seeds and folds with the corrected resampled t interval."""
    j = accuracies.size
    variance = (1 / j + 1 / (folds - 1)) * float(np.var(accuracies, ddof=1)) if j > 1 else 0.0
    estimate = float(accuracies.mean())
    half = float(stdtrit(j - 1, (1 + confidence) / 2)) * variance**0.5 if j > 1 else 0.0
    return Interval(estimate, estimate - half, estimate + half, variance**0.5, float(j - 1))


def common_labels(labels: np.ndarray, least: int) -> np.ndarray:
    """Which examples carry a label seen at least ``least`` times (rarer classes cannot be cross-validated)."""
    values, counts = np.unique(labels, return_counts=True)
    return np.isin(labels, values[counts >= least])


def chance(labels: np.ndarray) -> float:
    """The accuracy of always answering the most frequent label."""
    return float(np.unique(np.asarray(labels), return_counts=True)[1].max() / len(labels))
