"""run_imp.py (iterative magnitude pruning with rewinding) end to end, in process, on the generated
corpus: nested masks, exact sparsities, bit-exact rewinds, round 1 equal to one-shot pruning, resume
at the first unfinished round, and bad input refused before anything is written."""

import hashlib
import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.conftest import FAST, run_in_process
from utils.iterative import imp_levels
from utils.layout import IMP_ROUND_FILE, MASK_FILE, imp_round_dir, rewind_dir
from utils.masks import Mask
from utils.pruning import prunable_names
from utils.records import ImpRound
from utils.structure import FAMILIES

SPARSITIES = ["0.5", "0.7"]
ROUNDS = 3


def imp_args(corpus_dir, out, *extra, rounds=ROUNDS):
    return ["--language", "en", "--data_dir", str(corpus_dir / "en"), "--output_dir", str(out), *FAST, "--num_train_epochs", "1",
            "--max_train_samples", "48", "--max_eval_samples", "8", "--max_test_samples", "8", "--warmup_steps", "2",
            "--sparsity", *SPARSITIES, "--rounds", str(rounds), *extra]


@pytest.fixture(scope="module")
def imp_run(corpus_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("imp") / "en"
    assert run_in_process("run_imp.py", imp_args(corpus_dir, out, "--rewind_step", "2")) == 0
    return out


def bools(path):
    mask = Mask.read(path)
    return {name: np.unpackbits(mask.packed(name), count=mask.sizes[name], bitorder="little").astype(bool) for name in mask.slices}


def test_the_schedule_hits_every_requested_sparsity():
    levels = imp_levels([0.7, 0.8, 0.9], 5)
    assert levels[2:] == [0.7, 0.8, 0.9]
    fraction = 1 - (1 - 0.7) ** (1 / 3)  # three equal rounds to 0.7
    assert levels[:2] == pytest.approx([fraction, 1 - (1 - fraction) ** 2])


def test_pruning_within_a_mask_against_numpy():
    """Large weights an earlier mask pruned stay pruned; the rest of the count is cut from the kept
    weights, smallest first, ties by position (numpy reference over the flattened weights)."""
    import torch

    from utils.pruning import compute_masks

    generator = torch.Generator().manual_seed(3)
    params = {"a": torch.randn(40, 30, generator=generator), "b": torch.randn(50, 20, generator=generator)}
    params["b"][:5] = 0.0  # exact ties
    old = {n: torch.rand(p.shape, generator=generator) > 0.4 for n, p in params.items()}
    new = compute_masks(params, [0.75], within=old)[0.75]
    flat_w = np.concatenate([p.numpy().reshape(-1) for p in params.values()])
    flat_old = np.concatenate([m.numpy().reshape(-1) for m in old.values()])
    count = round(0.75 * flat_w.size)
    score = np.where(flat_old, np.abs(flat_w), -1.0)
    order = np.lexsort((np.arange(flat_w.size), score))  # by score, then position
    expected = np.ones(flat_w.size, bool)
    expected[order[:count]] = False
    assert np.array_equal(np.concatenate([m.numpy().reshape(-1) for m in new.values()]), expected)
    assert not any((new[n] & ~old[n]).any() for n in new)


def test_each_round_prunes_within_the_last_and_hits_its_sparsity_exactly(imp_run):
    levels = imp_levels([0.5, 0.7], ROUNDS)
    previous = None
    for r in range(1, ROUNDS + 1):
        mask = bools(imp_round_dir(imp_run, r) / MASK_FILE)
        total = sum(m.size for m in mask.values())
        kept = sum(int(m.sum()) for m in mask.values())
        assert total - kept == round(levels[r - 1] * total)
        if previous is not None:
            assert all(not (mask[n] & ~previous[n]).any() for n in mask), f"round {r} keeps a weight round {r - 1} pruned"
        previous = mask
        record = ImpRound.read(imp_round_dir(imp_run, r) / IMP_ROUND_FILE)
        assert (record.round, record.kept, record.total) == (r, kept, total)
        assert 0 <= record.eval_cer <= 2 and record.steps == 6
    # Each requested sparsity is an ordinary ticket: the round's model, zeros where its mask prunes.
    for s, r in (("0.5", 2), ("0.7", 3)):
        ticket = imp_run / f"sparsity-{float(s):.2f}"
        assert Mask.read(ticket / MASK_FILE).metadata["sha256"] == Mask.read(imp_round_dir(imp_run, r) / MASK_FILE).metadata["sha256"]
        info = Mask.load(ticket).metadata
        assert (info["method"], info["rounds"], info["rewind_step"], info["sparsity"]) == ("imp", ROUNDS, 2, float(s))
        weights, mask = load_file(ticket / "model.safetensors"), bools(ticket / MASK_FILE)
        assert all((weights[n].reshape(-1)[~m] == 0).all() for n, m in mask.items())


def test_every_round_starts_from_the_rewind_point_bit_for_bit(imp_run):
    rewind = load_file(rewind_dir(imp_run) / "model.safetensors")
    names = prunable_names(FAMILIES["wav2vec2"], rewind)
    for r in range(1, ROUNDS + 1):
        mask = bools(imp_round_dir(imp_run, r) / MASK_FILE)
        digest = hashlib.sha256()
        for name in names:
            digest.update(np.where(mask[name].reshape(rewind[name].shape), rewind[name], np.float32(0)).tobytes())
        assert ImpRound.read(imp_round_dir(imp_run, r) / IMP_ROUND_FILE).start_weights_sha256 == digest.hexdigest()
    # The rewind point is the weights after step 2, not the starting ones round 0 began from.
    start = hashlib.sha256(b"".join(rewind[n].tobytes() for n in names)).hexdigest()
    assert ImpRound.read(imp_round_dir(imp_run, 0) / IMP_ROUND_FILE).start_weights_sha256 != start


def test_round_one_is_one_shot_pruning_of_the_dense_model(imp_run, tmp_path):
    level = imp_levels([0.5, 0.7], ROUNDS)[0]
    out = tmp_path / "oneshot"
    assert run_in_process("run_prune.py", ["--model_name_or_path", str(imp_round_dir(imp_run, 0)), "--language", "en", "--sparsity", repr(level),
                                           "--output_dir", str(out)]) == 0
    assert Mask.read(out / MASK_FILE).metadata["sha256"] == Mask.read(imp_round_dir(imp_run, 1) / MASK_FILE).metadata["sha256"]


def test_a_run_killed_after_round_two_resumes_at_round_three(imp_run, corpus_dir, tmp_path):
    resumed = tmp_path / "en"
    shutil.copytree(imp_run, resumed)
    shutil.rmtree(imp_round_dir(resumed, 3))  # what a kill between rounds 2 and 3 leaves
    shutil.rmtree(resumed / "sparsity-0.70")
    (imp_round_dir(resumed, 1) / "checkpoint-6").mkdir()  # a run killed after recording round 1, before removing its checkpoints
    before = {r: (imp_round_dir(resumed, r) / IMP_ROUND_FILE).stat().st_mtime_ns for r in range(3)}
    assert run_in_process("run_imp.py", imp_args(corpus_dir, resumed, "--rewind_step", "2")) == 0
    assert before == {r: (imp_round_dir(resumed, r) / IMP_ROUND_FILE).stat().st_mtime_ns for r in range(3)}  # not run again
    assert not (imp_round_dir(resumed, 1) / "checkpoint-6").exists()
    for r in (3,):
        assert Mask.read(imp_round_dir(resumed, r) / MASK_FILE).metadata["sha256"] == Mask.read(imp_round_dir(imp_run, r) / MASK_FILE).metadata["sha256"]
        ours, theirs = (json.loads((imp_round_dir(d, r) / IMP_ROUND_FILE).read_text()) for d in (resumed, imp_run))
        assert ours["start_weights_sha256"] == theirs["start_weights_sha256"] and ours["test_cer"] == theirs["test_cer"]
    assert (resumed / "sparsity-0.70" / "model.safetensors").read_bytes() == (imp_run / "sparsity-0.70" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("extra, rounds, expected", [
    (["--rewind_step", "500"], ROUNDS, "--rewind_step 500 is beyond the first round, which takes 6 optimizer steps: expected 0 to 6"),
    ([], 1, "--rounds 1 cannot reach the 2 sparsities [0.5, 0.7]"),
    (["--prune_scope", "everything"], ROUNDS, "unknown --prune_scope 'everything'"),
])
def test_bad_input_is_one_line_and_writes_nothing(extra, rounds, expected, corpus_dir, tmp_path, capsys):
    out = tmp_path / "imp"
    assert run_in_process("run_imp.py", imp_args(corpus_dir, out, *extra, rounds=rounds)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert expected in err[-1] and err[-1].startswith("error: ")
    assert not out.exists()
