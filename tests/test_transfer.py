"""run_transfer.py: the mask holds, the encoder freezes for exactly the first epoch, results.json
is complete, two processes agree, and a killed run resumes."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, TINY_CONFIG, files_containing, run_in_process
from utils.masks import Mask
from utils.metrics import read_predictions

TRAIN = ["--use_cpu", "--per_device_train_batch_size", "8", "--learning_rate", "2e-3", "--adam_beta2", "0.98", "--warmup_steps", "5",
         "--freeze_feature_encoder", "False", "--disable_tqdm", "True", "--seed", "3"]


def run(script, args, env=None, **kw):
    env = env or dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, **kw)


@pytest.fixture(scope="module")
def tickets(corpus_dir, tmp_path_factory):
    """An 'en' model fine-tuned one epoch on the test corpus, pruned at 0.5 and 0.8."""
    root = tmp_path_factory.mktemp("transfer")
    model = root / "ft-en"
    result = run("run_finetune.py", ["--language", "en", "--data_dir", str(corpus_dir / "en"), "--output_dir", str(model),
                                     "--model_name_or_path", str(TINY_CONFIG), "--num_train_epochs", "1", *TRAIN])
    assert result.returncode == 0, result.stderr[-3000:]
    result = run("run_prune.py", ["--model_name_or_path", str(model), "--sparsity", "0.5", "0.8", "--output_dir", str(root / "tickets" / "en")])
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def checkpoints(out):
    return sorted((p for p in out.glob("checkpoint-*")), key=lambda p: int(p.name.split("-")[1]))


def test_cross_language_freezes_first_epoch_and_holds_mask(tickets, corpus_dir, tmp_path):
    out = tmp_path / "en-ca"
    ticket = tickets / "tickets" / "en" / "sparsity-0.80"
    result = run("run_transfer.py", ["--upstream", "en", "--downstream", "ca", "--sparsity", "0.8", "--tickets_dir", str(tickets / "tickets"),
                                     "--data_dir", str(corpus_dir / "ca"), "--output_dir", str(out), "--freeze_epochs", "1", "--train_epochs", "1",
                                     "--gradient_accumulation_steps", "2", "--bf16", "--save_total_limit", "5", "--keep_checkpoints", "True", *TRAIN])
    assert result.returncode == 0, result.stderr[-3000:]
    mask = Mask.load(ticket).bools()  # read independently of the training run
    start = load_file(ticket / "model.safetensors")
    epoch1, epoch2 = checkpoints(out)
    after1, after2 = load_file(epoch1 / "model.safetensors"), load_file(epoch2 / "model.safetensors")
    encoder = [k for k in start if k.startswith("wav2vec2.")]
    assert all(torch.equal(after1[k], start[k]) for k in encoder)  # frozen for exactly epoch 1 ...
    assert not torch.equal(after1["lm_head.weight"], start["lm_head.weight"])  # only the new head learned
    changed = [k for k in encoder if not torch.equal(after2[k], start[k])]
    assert any("encoder.layers" in k for k in changed)  # ... and trained in epoch 2
    final = load_file(out / "model.safetensors")
    for state in (after1, after2, final):
        for name, keep in mask.items():
            assert torch.all(state[name][~keep] == 0), name
    results = json.loads((out / "results.json").read_text())
    expected_keys = {"upstream", "downstream", "sparsity", "ticket", "test_cer", "test_wer", "eval_loss", "epochs", "steps", "seed", "wall_time_s", "measured_sparsity"}
    assert expected_keys <= set(results)
    assert (results["upstream"], results["downstream"], results["sparsity"], results["epochs"]) == ("en", "ca", 0.8, 2)
    assert results["frozen_in_epochs"] == [1] and results["new_head"] is True and results["mask_held"] is True
    assert results["ticket"] == str(ticket) and results["ticket_found"] == "local"
    total = sum(k.numel() for k in mask.values())
    pruned = sum(int((~k).sum()) for k in mask.values())
    nonzero_kept = sum(int(torch.count_nonzero(final[n][k])) for n, k in mask.items())
    assert results["measured_sparsity"] == pytest.approx(1 - nonzero_kept / total)
    assert results["measured_sparsity"] >= pruned / total
    assert results["steps"] == 30  # 240 clips / 8 / 2 accumulation * 2 epochs
    rows = read_predictions(out / "predictions_test.jsonl", expect_cer=results["test_cer"], expect_count=results["test_samples"])
    assert results["test_wer"] == sum(r.word_edits for r in rows) / sum(r.ref_words for r in rows)
    assert results["eval_loss"] == pytest.approx(json.loads((out / "trainer_state.json").read_text())["best_metric"])
    from huggingface_hub import ModelCard

    from utils import __version__

    assert results["suite_version"] == __version__
    card_text = (out / "README.md").read_text()
    card = ModelCard(card_text).data  # the card states the same test score, on the downstream test split
    scores = {r.metric_type: (r.metric_value, r.dataset_type, r.dataset_config, r.dataset_split) for r in card.eval_results}
    assert scores == {"cer": (round(100 * results["test_cer"], 2), "audiofolder", "ca", "test"), "wer": (round(100 * results["test_wer"], 2), "audiofolder", "ca", "test")}
    assert card.model_name == "en-ticket-sparsity-0.80-ca" and card.license == "apache-2.0"  # the ticket's, from its config-initialised source
    assert str(tmp_path) not in card_text and str(tickets) not in card_text


def test_same_language_skips_freezing_and_keeps_the_head(tickets, corpus_dir, tmp_path):
    out = tmp_path / "en-en"
    result = run("run_transfer.py", ["--upstream", "en", "--downstream", "en", "--sparsity", "0.5", "--tickets_dir", str(tickets / "tickets"),
                                     "--data_dir", str(corpus_dir / "en"), "--output_dir", str(out), "--train_epochs", "1", "--keep_checkpoints", "True", *TRAIN])
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["freeze_epochs"] == 0 and results["frozen_in_epochs"] == [] and results["new_head"] is False
    start = load_file(tickets / "tickets" / "en" / "sparsity-0.50" / "model.safetensors")
    after1 = load_file(checkpoints(out)[0] / "model.safetensors")
    assert not torch.equal(after1["wav2vec2.encoder.layers.0.attention.q_proj.weight"], start["wav2vec2.encoder.layers.0.attention.q_proj.weight"])


def test_dense_transfer_control_lets_pruned_weights_regrow(tickets, corpus_dir, tmp_path):
    out = tmp_path / "dense"
    result = run("run_transfer.py", ["--upstream", "en", "--downstream", "ca", "--sparsity", "0.8", "--tickets_dir", str(tickets / "tickets"),
                                     "--data_dir", str(corpus_dir / "ca"), "--output_dir", str(out), "--freeze_epochs", "0", "--train_epochs", "1",
                                     "--dense_transfer", "--hub_token", "hf_secret_transfer_token", *TRAIN])
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["dense_transfer"] is True and results["mask_held"] is False
    assert "--hub_token <redacted>" in results["command"] and files_containing(out, "hf_secret_transfer_token") == []  # training_args.bin included
    assert results["measured_sparsity"] < 0.1  # the pruned weights trained back to non-zero values


def test_prunes_on_the_spot_and_refuses_bad_input(tickets, corpus_dir, tmp_path, capsys):
    base = ["--downstream", "ca", "--data_dir", str(corpus_dir / "ca"), "--train_epochs", "1", "--freeze_epochs", "0", *TRAIN]
    out = tmp_path / "spot"
    result = run("run_transfer.py", ["--upstream", "en", "--sparsity", "0.9", "--tickets_dir", str(tmp_path / "tk"),
                                     "--upstream_model", str(tickets / "ft-en"), "--output_dir", str(out), *base])
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["ticket_found"] == "pruned now"
    assert (tmp_path / "tk" / "en" / "sparsity-0.90" / "mask.safetensors").is_file()
    before = (out / "results.json").read_bytes()
    cases = [
        (["--upstream", "xx", "--sparsity", "0.8"], "unknown language 'xx'"),
        (["--upstream", "en", "--sparsity", "0.9", "--tickets_dir", str(tickets / "tickets")], "no en ticket at sparsity 0.90 (en has sparsity-0.50, sparsity-0.80)"),
        (["--upstream", "de", "--sparsity", "0.8", "--tickets_dir", str(tickets / "tickets")], "looked in"),
        (["--upstream", "en", "--sparsity", "0.8", "--ticket", str(tickets / "tickets" / "en" / "sparsity-0.50")], "has sparsity 0.50, not the 0.80"),
        (["--upstream", "en", "--sparsity", "0.8", "--tickets_dir", str(tickets / "tickets"), "--model_name_or_path", str(ROOT / "tests" / "data" / "other-arch")],
         "does not match --model_name_or_path"),
        (["--upstream", "en", "--sparsity", "1.2"], "outside (0, 1)"),
    ]
    capsys.readouterr()
    for i, (extra, message) in enumerate(cases):  # in process: each is refused before any training
        code = run_in_process("run_transfer.py", [*extra, "--output_dir", str(tmp_path / f"bad{i}"), *base])
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert code == 2 and message in last, (extra, last)
    code = run_in_process("run_transfer.py", ["--upstream", "en", "--sparsity", "0.8", "--tickets_dir", str(tickets / "tickets"), "--output_dir", str(out), *base])
    assert code == 2 and "holds a different run" in capsys.readouterr().err.strip().splitlines()[-1]
    assert (out / "results.json").read_bytes() == before


def test_two_processes_agree_and_hold_the_mask(tickets, corpus_dir, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "run_transfer.py"),
           "--upstream", "en", "--downstream", "ca", "--sparsity", "0.8", "--tickets_dir", str(tickets / "tickets"),
           "--data_dir", str(corpus_dir / "ca"), "--output_dir", str(out), "--freeze_epochs", "1", "--train_epochs", "1", *TRAIN]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    # (the two ranks print at the same moment: their lines may share a line of the captured output)
    digests = dict(re.findall(r"(rank \d+/\d+): final in-scope weights sha256 ([0-9a-f]{64})", result.stdout))
    assert set(digests) == {"rank 0/2", "rank 1/2"}
    assert len(set(digests.values())) == 1  # both ranks end with identical weights
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2 and results["mask_held"] is True and results["frozen_in_epochs"] == [1]
    # rank 0 alone wrote the per-utterance rows, all of them, in dataset order
    rows = read_predictions(out / "predictions_test.jsonl", expect_cer=results["test_cer"], expect_count=results["test_samples"])
    assert [r.id for r in rows] == [f"{i:06d}.wav" for i in range(24)]
    final = load_file(out / "model.safetensors")
    assert all(torch.all(final[n][~k] == 0) for n, k in Mask.load(tickets / "tickets" / "en" / "sparsity-0.80").bools().items())


def test_resume_after_kill(tickets, corpus_dir, tmp_path):
    out = tmp_path / "resume"
    args = [sys.executable, str(ROOT / "run_transfer.py"), "--upstream", "en", "--downstream", "ca", "--sparsity", "0.8",
            "--tickets_dir", str(tickets / "tickets"), "--data_dir", str(corpus_dir / "ca"), "--output_dir", str(out),
            "--freeze_epochs", "1", "--train_epochs", "2", "--save_strategy", "steps", "--save_steps", "10",
            "--eval_strategy", "steps", "--eval_steps", "10", "--save_total_limit", "20", "--keep_checkpoints", "True", *TRAIN]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (out / "checkpoint-20" / "trainer_state.json").is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # mid epoch 1 (frozen): 30 steps per epoch
    proc.wait()
    assert not (out / "results.json").exists()
    result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = re.search(r"Resuming training from checkpoint with epoch (\d+) and global step (\d+)", result.stdout + result.stderr)
    assert resumed and resumed.group(1) == "0" and 20 <= int(resumed.group(2)) < 30, resumed
    results = json.loads((out / "results.json").read_text())
    assert results["mask_held"] is True and results["steps"] == 90 and results["frozen_in_epochs"][0] == 1
    mask = Mask.load(tickets / "tickets" / "en" / "sparsity-0.80").bools()
    start = load_file(tickets / "tickets" / "en" / "sparsity-0.80" / "model.safetensors")
    at30 = load_file(out / "checkpoint-30" / "model.safetensors")  # end of the frozen epoch, reached after resuming
    assert all(torch.equal(at30[k], start[k]) for k in start if k.startswith("wav2vec2."))
    for ckpt in checkpoints(out):
        state = load_file(ckpt / "model.safetensors")
        assert all(torch.all(state[n][~k] == 0) for n, k in mask.items()), ckpt.name
