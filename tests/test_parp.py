"""run_finetune.py --parp_sparsity (PARP: prune, fine-tune with regrowth, re-prune), in process, on
the generated corpus: re-prunes at exactly the configured steps, pruned weights that move between
them, an exact final sparsity, the one-re-prune case, and a start model without weights refused."""

import json
import logging
import re

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.conftest import FAST, TINY_CONFIG, run_in_process
from utils.masks import Mask
from utils.pruning import compute_masks, prunable_names
from utils.structure import FAMILIES

SPARSITY = 0.8


def parp(corpus_dir, source, out, reprune_steps, caplog, *extra):
    args = ["--language", "en", "--data_dir", str(corpus_dir / "en"), "--output_dir", str(out), *FAST, "--model_name_or_path", str(source),
            "--num_train_epochs", "2", "--max_train_samples", "48", "--max_eval_samples", "8", "--max_test_samples", "8", "--warmup_steps", "2",
            "--parp_sparsity", str(SPARSITY), "--reprune_steps", str(reprune_steps), "--keep_checkpoints", "True", *extra]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="utils.training"):
        code = run_in_process("run_finetune.py", args)
    reprunes = [(int(m.group(1)), m.group(2) is not None, int(m.group(3))) for m in
                (re.search(r"PARP re-prune at step (\d+)( \(at the end\))?: (\d+) pruned weights had moved", r.getMessage()) for r in caplog.records) if m]
    return code, reprunes


def in_scope(path):
    weights = load_file(path)
    return {n: weights[n] for n in prunable_names(FAMILIES["wav2vec2"], weights)}


def test_parp_reprunes_at_the_configured_steps_and_ends_exact(corpus_dir, source, tmp_path, caplog):
    out = tmp_path / "parp"
    code, reprunes = parp(corpus_dir, source, out, 4, caplog)
    assert code == 0
    assert [(step, end) for step, end, _ in reprunes] == [(4, False), (8, False), (12, False), (12, True)]  # 12 steps: 2 epochs of 6
    assert all(moved > 0 for step, end, moved in reprunes if not end), reprunes  # pruned weights regrow between re-prunes
    # Between re-prunes the pruned weights are trainable: the epoch-1 checkpoint (step 6) holds fewer zeros than the sparsity asks.
    weights = in_scope(out / "checkpoint-6" / "model.safetensors")
    total = sum(w.size for w in weights.values())
    assert sum(int((w == 0).sum()) for w in weights.values()) < round(SPARSITY * total)
    # The final model and mask: exactly round(s * N) pruned, zeros in the model where the mask prunes.
    mask = Mask.load(out)
    assert mask.metadata["method"] == "parp" and mask.metadata["reprune_steps"] == 4
    assert mask.metadata["total"] - mask.metadata["kept_total"] == round(SPARSITY * mask.metadata["total"])
    final = in_scope(out / "model.safetensors")
    bits = {n: np.unpackbits(mask.packed(n), count=mask.sizes[n], bitorder="little").astype(bool) for n in mask.slices}
    assert all((final[n].reshape(-1)[~bits[n]] == 0).all() for n in bits)
    assert json.loads((out / "all_results.json").read_text())["test_samples"] == 8


def test_reprune_steps_beyond_the_run_prune_once_at_the_end(corpus_dir, source, tmp_path, caplog):
    import torch

    out = tmp_path / "parp-once"
    code, reprunes = parp(corpus_dir, source, out, 1000, caplog)
    assert code == 0
    assert [(step, end) for step, end, _ in reprunes] == [(12, True)]
    # The one re-prune is magnitude pruning of the kept (lowest eval loss) checkpoint, as trained with regrowth.
    best = json.loads((out / "trainer_state.json").read_text())["best_model_checkpoint"]
    weights = {n: torch.from_numpy(w) for n, w in in_scope(f"{best}/model.safetensors").items()}
    expected = compute_masks(weights, [SPARSITY])[SPARSITY]
    assert Mask.load(out).bools().keys() == expected.keys()
    assert all(torch.equal(Mask.load(out).bools()[n], expected[n]) for n in expected)


def test_parp_from_a_config_without_weights_is_one_line(corpus_dir, tmp_path, caplog, capsys):
    out = tmp_path / "parp-config"
    code, _ = parp(corpus_dir, TINY_CONFIG, out, 4, caplog)
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "PARP prunes the start model's trained weights" in err[0] and "holds only a config" in err[0]
    assert not out.exists()


@pytest.mark.parametrize("flags, expected", [(["--reprune_steps", "0"], "--reprune_steps 0: expected"), (["--parp_scope", "all"], "unknown --parp_scope 'all'")])
def test_bad_parp_flags_are_one_line(flags, expected, corpus_dir, source, tmp_path, caplog, capsys):
    out = tmp_path / "bad"
    code, _ = parp(corpus_dir, source, out, 4, caplog, *flags)
    assert code == 2 and expected in capsys.readouterr().err and not out.exists()
