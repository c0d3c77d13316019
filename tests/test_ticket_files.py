"""Pruning from a checkpoint's safetensors files writes the ticket that pruning the loaded model
writes: every file byte for byte (mask, config, processor, card, signature) and every weight bit
for bit, for every family; sharded sources and sharded tickets too; other checkpoints take the
model path and say why."""

import logging
import os

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoFeatureExtractor, AutoModelForCTC

from tests.conftest import ROOT
from tests.hub_cache import add_offline_repo
from utils import ticket_files
from utils.masks import Mask
from utils.pruning import compute_masks, prunable_parameters
from utils.tickets import PruneSpec, build_tickets

FAMILIES = ["wav2vec2", "hubert", "wavlm", "data2vec-audio", "w2v-bert"]
WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def make_source(folder, family="wav2vec2", seed=0, **save):
    torch.manual_seed(seed)
    model = AutoModelForCTC.from_config(AutoConfig.from_pretrained(ROOT / "configs" / f"tiny-{family}"))
    model.save_pretrained(folder, **save)
    AutoFeatureExtractor.from_pretrained(ROOT / "configs" / f"tiny-{family}").save_pretrained(folder)
    return model


def tensors(folder) -> dict[str, torch.Tensor]:
    """Every weight of a ticket, whatever its sharding."""
    out = {}
    for file in sorted(folder.glob("model*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out |= {name: f.get_tensor(name) for name in f.keys()}
    return out


def same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.int32), b[k].view(torch.int32)) for k in a)


def other_files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and not p.name.startswith("model")}


def assert_same_ticket(a, b):
    assert other_files(a) == other_files(b)  # mask, config, processor, card, signature: byte for byte
    assert same_bits(tensors(a), tensors(b))


@pytest.mark.parametrize("family", FAMILIES)
def test_ticket_from_files_equals_ticket_from_model(family, tmp_path, caplog):
    source = tmp_path / "source"
    original = make_source(source, family)
    scope = "encoder_and_projection" if family == "w2v-bert" else "encoder_projection_conv"  # the widest: every ordering rule of the table
    controls = (("random", False), ("magnitude", True)) if family == "wav2vec2" else ()  # the controls share the code path: one family
    for method, layerwise in (("magnitude", False), *controls):
        spec = PruneSpec(scope=scope, method=method, layerwise=layerwise, seed=3)
        files = {s: tmp_path / f"{method}-{layerwise}" / "files" / f"{s}" for s in (0.5, 0.9)}
        model = {s: tmp_path / f"{method}-{layerwise}" / "model" / f"{s}" for s in (0.5, 0.9)}
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="utils.tickets"):
            build_tickets(str(source), "main", files, spec, "en")
        assert "from the files of" in caplog.text and "by loading the model" not in caplog.text
        build_tickets(str(source), "main", model, spec, "en", from_files=False)
        for s in files:
            assert_same_ticket(files[s], model[s])
        # and both are the ticket an independent computation on the original model gives
        params = prunable_parameters(original, scope)
        expected = compute_masks(params, [0.9], method=method, layerwise=layerwise, seed=3)[0.9]
        assert all(torch.equal(expected[n], m) for n, m in Mask.load(files[0.9]).bools().items())
        loaded = AutoModelForCTC.from_pretrained(files[0.9])  # plain transformers
        for name, p in loaded.named_parameters():
            want = original.state_dict()[name] * expected[name] if name in expected else original.state_dict()[name]
            assert torch.equal(p.detach(), want), name


def test_sharded_source_and_sharded_ticket(tmp_path, monkeypatch):
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    make_source(whole)
    make_source(sharded, max_shard_size="300KB")
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("model-*.safetensors"))) >= 2
    spec = PruneSpec()
    build_tickets(str(whole), "main", {0.8: tmp_path / "from-whole"}, spec, "en")
    build_tickets(str(sharded), "main", {0.8: tmp_path / "from-sharded"}, spec, "en")
    assert (tmp_path / "from-whole" / "model.safetensors").is_file()  # a tiny ticket fits one shard
    assert same_bits(tensors(tmp_path / "from-whole"), tensors(tmp_path / "from-sharded"))
    a, b = Mask.load(tmp_path / "from-whole"), Mask.load(tmp_path / "from-sharded")
    assert a.metadata | {"source_model": ""} == b.metadata | {"source_model": ""} and (a.words == b.words).all()
    # a ticket bigger than a shard is written in shards with an index, and loads as the whole one
    monkeypatch.setattr(ticket_files, "SHARD_BYTES", 200_000)
    build_tickets(str(whole), "main", {0.8: tmp_path / "in-shards"}, spec, "en")
    written = sorted(p.name for p in (tmp_path / "in-shards").glob("model*"))
    assert "model.safetensors.index.json" in written and len(written) >= 3, written
    assert same_bits(tensors(tmp_path / "in-shards"), tensors(tmp_path / "from-whole"))
    one, many = (AutoModelForCTC.from_pretrained(tmp_path / d).state_dict() for d in ("from-whole", "in-shards"))
    assert same_bits(one, many)


@pytest.mark.parametrize("kind", ["pytorch_model.bin", "base model", "float16"])
def test_other_checkpoints_take_the_model_path_and_say_why(kind, tmp_path, caplog):
    source = tmp_path / "source"
    model = make_source(source)
    reason = {"pytorch_model.bin": "holds no safetensors weights", "base model": "is not a CTC checkpoint", "float16": "stores F16 tensors"}[kind]
    if kind == "pytorch_model.bin":
        torch.save(model.state_dict(), source / "pytorch_model.bin")
        os.remove(source / "model.safetensors")
    elif kind == "base model":
        model.wav2vec2.save_pretrained(source)  # no CTC head: building the model gives it a seeded new one
    else:
        model.half().save_pretrained(source)
    with caplog.at_level(logging.INFO, logger="utils.tickets"):
        build_tickets(str(source), "main", {0.8: tmp_path / "ticket"}, PruneSpec(), "en")
    assert f"pruning {source} by loading the model: it {reason}" in caplog.text
    build_tickets(str(source), "main", {0.8: tmp_path / "by-model"}, PruneSpec(), "en", from_files=False)
    assert_same_ticket(tmp_path / "ticket", tmp_path / "by-model")


def test_a_hub_checkpoint_is_pruned_from_its_cached_files(tmp_path, monkeypatch, caplog):
    local = tmp_path / "local"
    make_source(local)
    cache = tmp_path / "hub-cache"
    sha = add_offline_repo(cache, "org/tiny-ctc", "model", {p.name: p.read_bytes() for p in local.iterdir()})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    with caplog.at_level(logging.INFO, logger="utils.tickets"):
        build_tickets("org/tiny-ctc", "main", {0.8: tmp_path / "hub"}, PruneSpec(), "en")
    assert "from the files of org/tiny-ctc" in caplog.text
    build_tickets("org/tiny-ctc", "main", {0.8: tmp_path / "hub-model"}, PruneSpec(), "en", from_files=False)
    assert_same_ticket(tmp_path / "hub", tmp_path / "hub-model")
    assert Mask.load(tmp_path / "hub").metadata["source_revision"] == sha
