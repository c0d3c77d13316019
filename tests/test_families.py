"""Every supported family through the structure table: scopes against an independent count of its
weights, frame arithmetic against the model itself, and fine-tune -> prune -> transfer -> IoU end
to end on the tiny configs under configs/ (no download)."""

import csv
import json
import math

import numpy as np
import pytest
import torch
import transformers as T
from safetensors.torch import load_file

from tests.conftest import ROOT, run_in_process
from utils.errors import UsageError
from utils.masks import Mask
from utils.pruning import check_mask_fits, compute_masks, prunable_parameters
from utils.structure import FAMILIES, check_feature_extractor, family_of, frames_for_samples, receptive_field

TINY = {"wav2vec2": "tiny-wav2vec2", "hubert": "tiny-hubert", "wavlm": "tiny-wavlm", "data2vec-audio": "tiny-data2vec-audio",
        "wav2vec2-bert": "tiny-w2v-bert"}


def tiny(model_type: str, **overrides) -> T.PreTrainedModel:
    torch.manual_seed(0)
    config = T.AutoConfig.from_pretrained(ROOT / "configs" / TINY[model_type])
    config.update(overrides)
    return T.AutoModelForCTC.from_config(config)


def expected_scope(config) -> tuple[int, int]:
    """(tensors, weights) of the default scope, from the config's sizes alone: per layer 4 h x h
    attention matrices and 2 h x i feed-forward matrices; a conformer layer has two feed-forward
    blocks and a convolution module (pointwise 2h x h, depthwise h x k, pointwise h x h)."""
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    if config.model_type == "wav2vec2-bert":
        return 11 * layers, layers * (4 * h * h + 4 * h * i + 2 * h * h + h * config.conv_depthwise_kernel_size + h * h)
    return 6 * layers, layers * (4 * h * h + 2 * h * i)


def test_every_family_has_a_shipped_tiny_config():
    assert set(TINY) == set(FAMILIES)


@pytest.mark.parametrize("model_type", list(TINY))
def test_default_scope_matches_an_independent_count(model_type):
    model = tiny(model_type)
    params = prunable_parameters(model)
    assert (len(params), sum(p.numel() for p in params.values())) == expected_scope(model.config)
    family = family_of(model)
    assert all(name.startswith(family.prefix) and ".layers." in name for name in params)
    with_projection = prunable_parameters(model, "encoder_and_projection")
    assert set(with_projection) - set(params) == {f"{family.base}.feature_projection.projection.weight"}
    if family.feature_encoder is None:
        with pytest.raises(UsageError, match="needs a conv feature encoder, which a w2v-bert-2.0 model has none of"):
            prunable_parameters(model, "encoder_projection_conv")
    else:
        conv = set(prunable_parameters(model, "encoder_projection_conv")) - set(with_projection)
        assert len(conv) == len(model.config.conv_kernel)


def test_adapters_are_never_in_the_default_scope():
    """MMS-style language adapters (wav2vec2 adapter_attn_dim) and w2v-BERT's adapter stay unpruned."""
    for model_type, extra in (("wav2vec2", {"adapter_attn_dim": 16}), ("wav2vec2-bert", {"add_adapter": True, "num_adapter_layers": 1})):
        plain, adapted = tiny(model_type), tiny(model_type, **extra)
        assert any("adapter" in n for n, _ in adapted.named_parameters())
        assert list(prunable_parameters(adapted)) == list(prunable_parameters(plain))


@pytest.mark.parametrize("model_type,overrides", [(t, {}) for t in TINY] + [("wav2vec2", {"add_adapter": True, "num_adapter_layers": 2, "output_hidden_size": 128}),
                                                 ("wav2vec2-bert", {"add_adapter": True, "num_adapter_layers": 2, "output_hidden_size": 128})])
def test_frames_match_the_model_forward(model_type, overrides):
    model = tiny(model_type, **overrides).eval()
    extractor = T.AutoFeatureExtractor.from_pretrained(ROOT / "configs" / TINY[model_type])
    rng = np.random.default_rng(0)
    shortest = receptive_field(model.config)
    for n in (shortest, shortest + 1, 719, 720, 1000, 16000, 33333):
        features = extractor(rng.standard_normal(n).astype(np.float32), sampling_rate=16000, return_tensors="pt")
        with torch.no_grad():
            frames = model(**features).logits.shape[1]
        assert frames_for_samples(model.config, n) == frames, n
    if family_of(model).feature_encoder:
        assert frames_for_samples(model.config, shortest - 1) == 0
    else:  # one log-mel window is a frame, but normalising each mel bin over one frame gives NaN
        single = extractor(rng.standard_normal(shortest - 1).astype(np.float32), sampling_rate=16000, return_tensors="pt")
        assert torch.isnan(single["input_features"][0, 0, : extractor.feature_size]).all()


def test_bad_family_input_is_one_clear_line():
    with pytest.raises(UsageError, match=r"model type 'whisper' is not a supported family: expected one of wav2vec2, hubert, wavlm, data2vec-audio, wav2vec2-bert \(w2v-bert-2.0\)"):
        family_of(T.WhisperConfig())
    hubert_mask = compute_masks(prunable_parameters(tiny("hubert")), [0.5])[0.5]
    with pytest.raises(UsageError, match="the mask was made for a hubert model but this model is wav2vec2"):
        check_mask_fits(tiny("wav2vec2"), hubert_mask)
    with pytest.raises(UsageError, match="produces 'input_values', but a w2v-bert-2.0 model takes 'input_features'"):
        check_feature_extractor(tiny("wav2vec2-bert").config, T.Wav2Vec2FeatureExtractor())


def test_w2v_bert_with_raw_waveform_settings_is_refused_by_the_script(corpus_dir, tmp_path, capsys):
    model_dir = tmp_path / "w2v-bert-raw"
    T.AutoConfig.from_pretrained(ROOT / "configs" / "tiny-w2v-bert").save_pretrained(model_dir)
    T.Wav2Vec2FeatureExtractor().save_pretrained(model_dir)
    code = run_in_process("run_finetune.py", ["--language", "en", "--data_dir", str(corpus_dir / "en"), "--model_name_or_path", str(model_dir),
                                              "--output_dir", str(tmp_path / "out"), "--use_cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: the feature extractor Wav2Vec2FeatureExtractor produces 'input_values'")


TRAIN = ["--use_cpu", "--per_device_train_batch_size", "8", "--learning_rate", "2e-3", "--warmup_steps", "2", "--disable_tqdm", "True",
         "--max_train_samples", "48", "--max_eval_samples", "8", "--max_test_samples", "8", "--seed", "5", "--report_to", "none"]


@pytest.mark.parametrize("model_type", list(TINY))
def test_finetune_prune_transfer_iou_end_to_end(model_type, corpus_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("datasets.config.HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    family = FAMILIES[model_type]
    config_dir = ROOT / "configs" / TINY[model_type]
    assert run_in_process("run_finetune.py", ["--language", "en", "--data_dir", str(corpus_dir / "en"), "--model_name_or_path", str(config_dir),
                                              "--output_dir", str(tmp_path / "ft"), "--num_train_epochs", "1", *TRAIN]) == 0
    ticket, random = tmp_path / "ticket-en", tmp_path / "random"
    assert run_in_process("run_prune.py", ["--model_name_or_path", str(tmp_path / "ft"), "--sparsity", "0.5", "--output_dir", str(ticket)]) == 0
    assert run_in_process("run_prune.py", ["--model_name_or_path", str(tmp_path / "ft"), "--sparsity", "0.5", "--method", "random",
                                           "--output_dir", str(random)]) == 0
    out = tmp_path / "en-ca"
    assert run_in_process("run_transfer.py", ["--upstream", "en", "--downstream", "ca", "--sparsity", "0.5", "--ticket", str(ticket),
                                              "--data_dir", str(corpus_dir / "ca"), "--output_dir", str(out), "--freeze_epochs", "1",
                                              "--train_epochs", "1", "--save_total_limit", "3", *TRAIN]) == 0

    # The mask is held, the encoder trained after the frozen epoch, the feature encoder never.
    mask, start, final = Mask.load(ticket).bools(), load_file(ticket / "model.safetensors"), load_file(out / "model.safetensors")
    assert Mask.load(ticket).metadata["model_type"] == model_type
    assert len(mask) == expected_scope(T.AutoConfig.from_pretrained(config_dir))[0]
    for name, keep in mask.items():
        assert torch.all(final[name][~keep] == 0), name
    assert any(not torch.equal(final[name], start[name]) for name in mask)
    front = [k for k in start if family.feature_encoder and k.startswith(f"{family.base}.{family.feature_encoder}.")]
    assert bool(front) == (family.feature_encoder is not None)
    assert all(torch.equal(final[k], start[k]) for k in front)
    results = json.loads((out / "results.json").read_text())
    assert results["frozen_in_epochs"] == [1] and results["mask_held"] is True and math.isfinite(results["test_cer"])

    # IoU grouped by the family's layers and module types, against the bits computed here.
    assert run_in_process("run_iou.py", ["--masks", f"en={ticket}", f"random={random}", "--output_dir", str(tmp_path / "iou")]) == 0
    other = Mask.load(random).bools()
    rows = list(csv.DictReader(open(tmp_path / "iou" / "iou_layers.csv")))
    assert {r["group"] for r in rows if r["group_kind"] == "module"} == set(family.modules.values())
    assert {r["group"] for r in rows if r["group_kind"] == "layer"} == {str(i) for i in range(T.AutoConfig.from_pretrained(config_dir).num_hidden_layers)}
    for row in rows:
        names = [n for n in mask if family.module_of(n)[row["group_kind"] == "module"] == (row["group"] if row["group_kind"] == "module" else int(row["group"]))]
        inter = sum(int((mask[n] & other[n]).sum()) for n in names)
        union = sum(int((mask[n] | other[n]).sum()) for n in names)
        assert float(row["iou"]) == pytest.approx(inter / union, abs=1e-12), row
