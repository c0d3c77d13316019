"""Properties that must hold for any input (hypothesis): mask bits round-trip for any shape, the
exact threshold prunes exactly round(s*N) weights by the tie rule, IoU is a symmetric similarity
in [0, 1] whose random baseline is right in expectation, and text normalisation is idempotent."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from utils.iou import iou_tables, random_iou
from utils.masks import Mask, pack, unpack
from utils.pruning import compute_masks
from utils.text import normalize_text

FAST = settings(max_examples=60, deadline=None, derandomize=True)  # the same examples on every run: CI never meets a new one by chance
shapes = st.lists(st.integers(1, 13), min_size=1, max_size=3).map(tuple)


@FAST
@given(shape=shapes, seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trips_any_shape(shape, seed):
    keep = torch.from_numpy(np.random.default_rng(seed).random(shape) < 0.5)
    packed = pack(keep)
    assert packed.dtype == np.uint8 and packed.size == math.ceil(keep.numel() / 8)
    assert torch.equal(unpack(packed, shape), keep)


@FAST
@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=4), sparsity=st.floats(0.01, 0.99), levels=st.integers(1, 5),
       seed=st.integers(0, 2**31 - 1))
def test_exact_threshold_prunes_round_s_n_with_the_tie_rule(sizes, sparsity, levels, seed):
    """Few distinct values force ties; the reference orders by |w|, then by global position."""
    rng = np.random.default_rng(seed)
    params = {f"t{i}": torch.from_numpy(rng.integers(-levels, levels + 1, n).astype(np.float32)) for i, n in enumerate(sizes)}
    mask = compute_masks(params, [sparsity])[sparsity]
    flat = np.concatenate([p.abs().numpy() for p in params.values()])
    count = round(sparsity * flat.size)
    pruned = np.zeros(flat.size, bool)
    pruned[np.lexsort((np.arange(flat.size), flat))[:count]] = True
    got = np.concatenate([~m.numpy() for m in mask.values()])
    assert got.sum() == count and np.array_equal(got, pruned)


@FAST
@given(n=st.integers(8, 300), da=st.floats(0.0, 1.0), db=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1))
def test_iou_is_symmetric_bounded_and_one_on_identical_masks(tmp_path_factory, n, da, db, seed):
    rng = np.random.default_rng(seed)
    folder = tmp_path_factory.mktemp("iou")
    masks = {}
    for label, density in (("a", da), ("b", db)):
        bools = {"wav2vec2.encoder.layers.0.attention.q_proj.weight": torch.from_numpy(rng.random(n) < density)}
        Mask.save(folder / f"{label}.safetensors", bools, {"sparsity": 0.5, "scope": "encoder_linear"})
        masks[label] = (Mask.load(folder / f"{label}.safetensors", label), bools)
    (ab,), _ = iou_tables([masks["a"][0], masks["b"][0]])
    (ba,), _ = iou_tables([masks["b"][0], masks["a"][0]])
    a, b = (next(iter(m[1].values())).numpy() for m in masks.values())
    union = (a | b).sum()
    assert ab["iou"] == ba["iou"] and 0.0 <= ab["iou"] <= 1.0
    assert ab["iou"] == ((a & b).sum() / union if union else 1.0)
    (same,), _ = iou_tables([masks["a"][0], Mask.load(folder / "a.safetensors", "a2")])
    assert same["iou"] == 1.0


def test_random_baseline_matches_simulation():
    """d/(2-d) for equal densities (ab/(a+b-ab) in general) against the mean IoU of random masks."""
    rng = np.random.default_rng(0)
    for da, db in ((0.2, 0.2), (0.1, 0.3), (0.5, 0.05)):
        a, b = rng.random((200, 20000)) < da, rng.random((200, 20000)) < db
        simulated = ((a & b).sum(1) / (a | b).sum(1)).mean()
        assert abs(simulated - random_iou(da, db)) < 0.003, (da, db, simulated)
    assert random_iou(0.2, 0.2) == pytest.approx(0.2 / 1.8, abs=1e-15)


@FAST
@given(text=st.text(max_size=60), language=st.sampled_from(["en", "tr", "ca", "de", "pl", "xh"]))
def test_text_normalisation_is_idempotent(text, language):
    once = normalize_text(text, language)
    assert normalize_text(once, language) == once
