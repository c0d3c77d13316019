"""Masks against an independent numpy reference: rank all scores with np.lexsort (score, then
global position) and prune the first round(s*N)."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from transformers import AutoConfig, Wav2Vec2ForCTC

from tests.conftest import TINY_CONFIG
from utils.masks import Mask, resolve_mask
from utils.pruning import apply_mask, check_sparsity, compute_masks, cut_mask, find_thresholds, prunable_parameters, score_fn, sparsity_of


def tiny_model(seed: int = 0) -> Wav2Vec2ForCTC:
    torch.manual_seed(seed)
    return Wav2Vec2ForCTC(AutoConfig.from_pretrained(TINY_CONFIG))


def reference_masks(params: dict, sparsity: float, scores: list[np.ndarray]) -> dict[str, np.ndarray]:
    flat = np.concatenate([s.reshape(-1) for s in scores])
    k = round(sparsity * flat.size)
    order = np.lexsort((np.arange(flat.size), flat))  # by score, ties by global position
    keep = np.ones(flat.size, dtype=bool)
    keep[order[:k]] = False
    out, start = {}, 0
    for name, p in params.items():
        out[name] = keep[start : start + p.numel()].reshape(p.shape)
        start += p.numel()
    return out


def test_default_scope_is_every_encoder_linear_weight():
    params = prunable_parameters(tiny_model())
    expected = [
        f"wav2vec2.encoder.layers.{i}.{m}.weight"
        for i in range(2)
        for m in ("attention.k_proj", "attention.v_proj", "attention.q_proj", "attention.out_proj", "feed_forward.intermediate_dense", "feed_forward.output_dense")
    ]
    assert sorted(params) == sorted(expected)
    assert sum(p.numel() for p in params.values()) == 2 * (4 * 128 * 128 + 2 * 128 * 256)


def test_wider_scopes_and_refusals():
    model = tiny_model()
    wide = prunable_parameters(model, "encoder_projection_conv")
    assert "wav2vec2.feature_projection.projection.weight" in wide
    assert "wav2vec2.feature_extractor.conv_layers.0.conv.weight" in wide
    assert not any("lm_head" in n or "pos_conv" in n or "bias" in n or "norm" in n for n in wide)
    assert len(prunable_parameters(model, "encoder_and_projection")) == 13
    with pytest.raises(ValueError, match="unknown prune scope 'everything'"):
        prunable_parameters(model, "everything")
    with pytest.raises(ValueError, match="model type None is not a supported family: expected one of wav2vec2, hubert, wavlm"):
        prunable_parameters(torch.nn.Sequential(torch.nn.Linear(3, 3)))


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.2, float("nan")])
def test_sparsity_must_be_inside_zero_one(bad):
    with pytest.raises(ValueError, match="outside \\(0, 1\\)"):
        check_sparsity(bad)


def test_global_magnitude_matches_numpy_reference_exactly():
    params = prunable_parameters(tiny_model())
    sparsities = [0.3, 0.7, 0.8, 0.9]
    masks = compute_masks(params, sparsities)
    scores = [p.detach().abs().numpy() for p in params.values()]
    n = sum(p.numel() for p in params.values())
    for s in sparsities:
        expected = reference_masks(params, s, scores)
        for name in params:
            assert np.array_equal(masks[s][name].numpy(), expected[name]), (s, name)
        assert sum(int((~m).sum()) for m in masks[s].values()) == round(s * n)
        kept = torch.cat([p.detach().abs().reshape(-1)[m.reshape(-1)] for p, m in zip(params.values(), masks[s].values())])
        pruned = torch.cat([p.detach().abs().reshape(-1)[~m.reshape(-1)] for p, m in zip(params.values(), masks[s].values())])
        assert pruned.max() <= kept.min()  # one global threshold
    for lo, hi in zip(sparsities, sparsities[1:]):  # nested: more sparsity prunes a superset
        assert all(torch.all(masks[hi][n] <= masks[lo][n]) for n in params)


def test_ties_follow_the_documented_rule():
    model = tiny_model(1)
    params = prunable_parameters(model)
    with torch.no_grad():
        for p in params.values():
            p.copy_(torch.round(p * 50) / 50)  # few distinct magnitudes: huge tie groups
    scores = [p.detach().abs().numpy() for p in params.values()]
    for s in (0.5, 0.8):
        masks = compute_masks(params, [s])[s]
        expected = reference_masks(params, s, scores)
        assert all(np.array_equal(masks[n].numpy(), expected[n]) for n in params)


def test_threshold_search_widens_a_missed_bracket():
    torch.manual_seed(0)
    weights = [torch.randn(300, 200), torch.randn(1000)]
    scores = score_fn("magnitude")
    counts = [1, 17, 30000, 60999]
    thresholds = find_thresholds(weights, counts, scores, sample_size=8)  # a tiny sample misses often
    flat = torch.cat([w.abs().reshape(-1) for w in weights]).sort().values
    for count, cuts in zip(counts, thresholds):
        assert all(cut.value == flat[count - 1].item() for cut in cuts)
        kept = sum(int(cut_mask(scores(i, w), cut).sum()) for i, (w, cut) in enumerate(zip(weights, cuts)))
        assert kept == flat.numel() - count


def test_random_and_layerwise_controls():
    params = prunable_parameters(tiny_model())
    n = sum(p.numel() for p in params.values())
    rand = compute_masks(params, [0.8], method="random", seed=3)[0.8]
    assert sum(int((~m).sum()) for m in rand.values()) == round(0.8 * n)
    again = compute_masks(params, [0.8], method="random", seed=3)[0.8]
    assert all(torch.equal(rand[k], again[k]) for k in params)
    magnitude = compute_masks(params, [0.8])[0.8]
    overlap = sum(int((rand[k] & magnitude[k]).sum()) for k in params) / sum(int(magnitude[k].sum()) for k in params)
    assert overlap < 0.4  # independent of magnitude: about 0.2 expected
    scores = [score_fn("random", 3)(i, p).numpy() for i, p in enumerate(params.values())]
    expected = reference_masks(params, 0.8, scores)
    assert all(np.array_equal(rand[k].numpy(), expected[k]) for k in params)

    layerwise = compute_masks(params, [0.75], layerwise=True)[0.75]
    for name, p in params.items():
        assert int((~layerwise[name]).sum()) == round(0.75 * p.numel())
        expected = reference_masks({name: p}, 0.75, [p.detach().abs().numpy()])[name]
        assert np.array_equal(layerwise[name].numpy(), expected)


def test_apply_mask_zeros_exactly_and_checks_fit():
    model = tiny_model()
    params = prunable_parameters(model)
    before = {k: v.detach().clone() for k, v in params.items()}
    mask = compute_masks(params, [0.6])[0.6]
    apply_mask(model, mask)
    for name, p in params.items():
        assert torch.all(p[~mask[name]] == 0)
        assert torch.equal(p[mask[name]], before[name][mask[name]])
    assert sparsity_of(mask) == pytest.approx(0.6, abs=1e-5)
    name = next(iter(mask))
    with pytest.raises(ValueError, match="does not fit"):
        apply_mask(model, {name: torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="lacks, e.g. 'no.such.weight'"):
        apply_mask(model, {"no.such.weight": torch.ones(3, dtype=torch.bool)})


@pytest.mark.parametrize("compress", [True, False])
def test_mask_file_round_trip_is_bit_exact(tmp_path, compress):
    params = prunable_parameters(tiny_model())
    mask = compute_masks(params, [0.9])[0.9]
    meta = Mask.save(tmp_path / "m.safetensors", mask, {"sparsity": 0.9, "language": "en"}, compress=compress)
    loaded = Mask.load(tmp_path / "m.safetensors").bools()
    assert list(loaded) == sorted(mask)  # every tensor back, in name order (the file's)
    assert all(torch.equal(loaded[k], mask[k]) and loaded[k].dtype == torch.bool for k in mask)
    read = Mask.load(tmp_path / "m.safetensors", "m")
    packed, metadata = {name: read.packed(name) for name in read.slices}, read.metadata
    assert metadata == meta and read.label == "m" and read.density == metadata["kept_total"] / metadata["total"]
    assert all(np.array_equal(packed[k], np.packbits(mask[k].numpy().reshape(-1), bitorder="little")) for k in mask)  # the packed view, by numpy
    assert metadata["kept_total"] == sum(int(m.sum()) for m in mask.values())
    assert metadata["kept"][next(iter(mask))] == int(mask[next(iter(mask))].sum())
    assert set(metadata["encodings"].values()) == ({"zstd"} if compress else {"packbits"})
    raw_bits = sum(math.ceil(m.numel() / 8) for m in mask.values())
    assert sum(p.nbytes for p in packed.values()) == raw_bits
    size = (tmp_path / "m.safetensors").stat().st_size
    assert size < (0.75 if compress else 1.1) * raw_bits + 8192  # 1 bit/weight; zstd pays at 90%


def test_corrupted_truncated_and_foreign_files_are_refused(tmp_path):
    mask = compute_masks(prunable_parameters(tiny_model()), [0.8], )[0.8]
    path = tmp_path / "m.safetensors"
    Mask.save(path, mask, {"sparsity": 0.8}, compress=False)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # flip bits inside the last tensor
    (tmp_path / "flipped.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="fails its checksum"):
        Mask.load(tmp_path / "flipped.safetensors").bools()
    (tmp_path / "short.safetensors").write_bytes(path.read_bytes()[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable mask file"):
        Mask.load(tmp_path / "short.safetensors").bools()
    save_file({"w": np.zeros(3, np.float32)}, str(tmp_path / "weights.safetensors"))
    with pytest.raises(ValueError, match="not a mask of ours"):
        Mask.load(tmp_path / "weights.safetensors").bools()
    with pytest.raises(FileNotFoundError, match="holds no mask.safetensors"):
        resolve_mask(tmp_path)


def _forge(path, tensors: dict, metadata: dict) -> None:
    from safetensors.numpy import save_file as save_numpy

    save_numpy(tensors, str(path), metadata={"mask": json.dumps(metadata)})


def test_hostile_mask_files_are_refused_from_the_header_before_allocating(tmp_path):
    import time
    import tracemalloc

    import zstandard

    good = {"format": "language-tickets-mask", "format_version": 1, "kept": {"w": 0}, "sha256": "0" * 64}
    bits = np.zeros(16, np.uint8)
    frame = np.frombuffer(zstandard.ZstdCompressor().compress(bytes(16)), np.uint8)
    lying = np.frombuffer(zstandard.ZstdCompressor().compress(bytes(16)), np.uint8).copy()
    cases = [
        ({"w": bits}, {"shapes": {"w": [10**12]}, "encodings": {"w": "packbits"}}, "claims shape [1000000000000] (1,000,000,000,000 weights) but stores 16 packbits bytes"),
        ({"w": frame}, {"shapes": {"w": [10**12]}, "encodings": {"w": "zstd"}}, "refused before allocating anything"),
        ({"w": bits.astype(np.float32)}, {"shapes": {"w": [128]}, "encodings": {"w": "packbits"}}, "is float32 with 1 dimension(s): expected 1-D uint8"),
        ({"w": bits.reshape(4, 4)}, {"shapes": {"w": [128]}, "encodings": {"w": "packbits"}}, "is uint8 with 2 dimension(s)"),
        ({"w": bits, "x": bits}, {"shapes": {"w": [128]}, "encodings": {"w": "packbits"}}, "disagree on ['x']"),
        ({"w": bits}, {"shapes": {"w": [128], "y": [8]}, "encodings": {"w": "packbits", "y": "packbits"}}, "disagree on ['y']"),
        ({"w": bits}, {"shapes": {"w": [128]}, "encodings": {"w": "lz4"}}, "encoding 'lz4': expected packbits or zstd"),
        ({"w": bits}, {"shapes": {"w": [-8]}, "encodings": {"w": "packbits"}}, "has shape [-8]: expected a list of non-negative integers"),
        ({"w": bits}, {"shapes": "junk", "encodings": {}}, "lacks a valid shapes"),
        ({"w": bits}, {"shapes": {"w": [128]}, "encodings": {"w": "zstd"}}, "is not a zstd frame"),
        ({"w": lying}, {"shapes": {"w": [256]}, "encodings": {"w": "zstd"}}, "stores"),  # the frame declares 16 bytes, the shape needs 32
    ]
    for i, (tensors, meta, message) in enumerate(cases):
        path = tmp_path / f"m{i}.safetensors"
        _forge(path, tensors, good | meta)
        tracemalloc.start()
        start = time.perf_counter()
        with pytest.raises(ValueError) as err:
            Mask.load(path)
        seconds, (_, peak) = time.perf_counter() - start, tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert message in str(err.value), (i, str(err.value))
        assert seconds < 1 and peak < 8 * 2**20, (i, seconds, peak)  # refused in under a second, a few MB at most
    from safetensors.numpy import save_file as save_numpy

    save_numpy({"w": bits}, str(tmp_path / "json.safetensors"), metadata={"mask": "{not json"})
    with pytest.raises(ValueError, match="is not a readable mask file"):
        Mask.load(tmp_path / "json.safetensors")
