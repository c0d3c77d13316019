"""Faults survived: each run is killed (SIGKILL) or runs out of disk (a file-size limit, as
``ulimit -f``) at a named point (``tests/faults.py``), then the same command is run again, and the
final files are compared with an uninterrupted run: bit-identical weights, predictions and masks."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import FAST, ROOT, run_in_process
from tests.faults import KILLED, faulty, last_line

FINETUNE = ["--language", "en", "--max_train_samples", "24", "--max_eval_samples", "8", "--max_test_samples", "8", "--max_steps", "9",
            "--save_strategy", "steps", "--save_steps", "3", "--eval_strategy", "steps", "--eval_steps", "3", "--save_total_limit", "5", *FAST]


def plain(script: str, args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def checkpoint_state(folder: Path) -> dict:
    return json.loads((folder / "trainer_state.json").read_text())


def same_tensors(a: Path, b: Path) -> bool:
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(x[k].dtype == y[k].dtype and bool((x[k] == y[k]).all()) for k in x)


def test_fine_tuning_survives_kills_torn_checkpoints_and_a_full_disk(corpus_dir, tmp_path, script_env):
    args = FINETUNE + ["--data_dir", str(corpus_dir / "en")]
    reference = tmp_path / "reference"
    assert run_in_process("run_finetune.py", args + ["--output_dir", str(reference)]) == 0

    out = tmp_path / "faulty"
    args += ["--output_dir", str(out)]
    # 1. Killed while the features are being computed and cached.
    assert faulty("utils.features:header_seconds#10", "kill", "run_finetune.py", args, script_env).returncode == KILLED
    assert not list(out.glob("checkpoint-*"))
    # 2. Killed in the middle of training (step 5 of 9; checkpoint-3 written); the next run takes over its lock.
    assert faulty("transformers.trainer:Trainer.training_step#5", "kill", "run_finetune.py", args, script_env).returncode == KILLED
    assert checkpoint_state(out / "checkpoint-3")["global_step"] == 3 and not (out / "checkpoint-6").exists()
    # 3. Killed while writing checkpoint-6's trainer_state.json (the file the Trainer writes last).
    torn = faulty("transformers.trainer_callback:TrainerState.save_to_json", "torn", "run_finetune.py", args, script_env)
    assert torn.returncode == KILLED and "took over the lock" in torn.stdout + torn.stderr
    with pytest.raises(ValueError):
        checkpoint_state(out / "checkpoint-6")
    # 4. The disk fills while checkpoint-6 is saved again: one line, exit 1, no half checkpoint left.
    full = faulty("transformers.trainer:Trainer._save_checkpoint", "fsize=4096", "run_finetune.py", args, script_env)
    assert full.returncode == 1, full.stderr[-3000:]
    assert last_line(full).startswith("error: out of disk space") and "re-run the same command" in last_line(full)
    assert "checkpoint-6 is incomplete" in full.stdout + full.stderr  # the torn one, removed on resuming
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"] and checkpoint_state(out / "checkpoint-3")["global_step"] == 3
    assert not (out / "all_results.json").exists()
    # 5. The same command again, held at its first training step while a second copy of it is refused by the
    #    lock; then it goes on, and ends as the uninterrupted run did.
    go = tmp_path / "go"
    final = subprocess.Popen([sys.executable, "-m", "tests.faults", "transformers.trainer:Trainer.training_step", f"wait={go}", "--",
                              "run_finetune.py", *args], cwd=ROOT, env=script_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    owner = out.parent / f".{out.name}.lock.json"
    deadline = time.time() + 120
    while not (owner.is_file() and json.loads(owner.read_text() or "{}").get("pid") == final.pid) and time.time() < deadline:
        time.sleep(0.05)
    second = plain("run_finetune.py", args, script_env)
    go.touch()
    assert second.returncode == 2 and f"is in use by process {final.pid}" in last_line(second), second.stderr[-2000:]
    stdout, stderr = final.communicate(timeout=600)
    assert final.returncode == 0, stderr[-3000:]
    assert same_tensors(out / "model.safetensors", reference / "model.safetensors")
    assert not list(out.glob("checkpoint-*"))  # kept through the kills and the full disk, removed once the run succeeded
    for name in ("predictions_validation.jsonl", "predictions_test.jsonl"):
        assert (out / name).read_bytes() == (reference / name).read_bytes()
    ours, theirs = (json.loads((d / "all_results.json").read_text()) for d in (out, reference))
    measures = lambda r: {k: v for k, v in r.items() if k.startswith(("eval_", "test_")) and not k.endswith(("runtime", "per_second"))}  # noqa: E731
    assert measures(ours) == measures(theirs) and len(measures(ours)) >= 8  # (train_loss averages the last session's steps only)
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    # 6. Asked to stop (a time limit's SIGUSR1) in the middle of the second epoch: the step ends, a checkpoint is saved there and
    #    the run exits 75 in one line without evaluating; the same command resumes inside that epoch and ends as the uninterrupted run.
    stopped = tmp_path / "stopped"
    args[-1] = str(stopped)
    result = faulty("transformers.trainer:Trainer.training_step#5", "signal=SIGUSR1", "run_finetune.py", args, script_env)
    assert result.returncode == 75 and last_line(result).startswith("interrupted: SIGUSR1 received: stopped at step 5 with a checkpoint in"), result.stderr[-3000:]
    assert sorted(p.name for p in stopped.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-5"] and checkpoint_state(stopped / "checkpoint-5")["global_step"] == 5
    assert [h["step"] for h in checkpoint_state(stopped / "checkpoint-5")["log_history"] if "eval_loss" in h] == [3]  # no evaluation at the stop
    assert not (stopped / "all_results.json").exists()
    resumed = plain("run_finetune.py", args, script_env)
    assert resumed.returncode == 0 and "resuming inside epoch 2" in resumed.stdout + resumed.stderr, resumed.stderr[-3000:]
    assert same_tensors(stopped / "model.safetensors", reference / "model.safetensors")
    assert not list(stopped.glob("checkpoint-*")) and "run finished: removed its" in resumed.stdout + resumed.stderr
    # 7. The same command once more: the run is finished and its checkpoints are gone, so there is nothing to resume, and
    #    training again would overwrite it: refused in one line, the run's files untouched.
    before = {p: p.read_bytes() for p in stopped.rglob("*") if p.is_file()}
    again = plain("run_finetune.py", args, script_env)
    assert again.returncode == 2 and "holds a finished run whose checkpoints were removed" in last_line(again), again.stderr[-2000:]
    assert {p: p.read_bytes() for p in stopped.rglob("*") if p.is_file()} == before
    assert (stopped / "predictions_test.jsonl").read_bytes() == (reference / "predictions_test.jsonl").read_bytes()


def test_pruning_survives_a_kill_mid_ticket_and_a_full_disk(corpus_dir, tmp_path, script_env):
    source = tmp_path / "source"
    assert run_in_process("run_finetune.py", FINETUNE[:8] + ["--max_steps", "1", "--save_strategy", "no", "--eval_strategy", "no",
                                                          "--load_best_model_at_end", "False", *FAST, "--data_dir", str(corpus_dir / "en"),
                                                          "--output_dir", str(source)]) == 0
    prune = lambda out: ["--model_name_or_path", str(source), "--sparsity", "0.5", "0.7", "0.9", "--output_dir", str(out)]  # noqa: E731
    reference = tmp_path / "reference"
    assert run_in_process("run_prune.py", prune(reference)) == 0
    out = tmp_path / "tickets"
    # Killed while the second ticket's mask is written: the first ticket is whole, the second only staged.
    assert faulty("utils.masks:Mask.save_packed#2", "kill", "run_prune.py", prune(out), script_env).returncode == KILLED
    assert (out / "sparsity-0.50" / "mask.safetensors").is_file() and not (out / "sparsity-0.70" / "mask.safetensors").exists()
    # The disk fills while the third ticket is written: one line, the first two whole, no staging folder left.
    full = faulty("utils.tickets:_stage#2", "fsize=4096", "run_prune.py", prune(out), script_env)
    assert full.returncode == 1 and last_line(full).startswith("error: out of disk space"), full.stderr[-2000:]
    assert not list(out.glob(".*.tmp")) and not (out / "sparsity-0.90" / "mask.safetensors").exists()
    assert plain("run_prune.py", prune(out), script_env).returncode == 0
    for ticket in ("sparsity-0.50", "sparsity-0.70", "sparsity-0.90"):
        ours, theirs = out / ticket, reference / ticket
        names = sorted(p.name for p in theirs.iterdir())
        assert sorted(p.name for p in ours.iterdir()) == names
        for name in ("mask.safetensors", "model.safetensors", "config.json", "README.md", "vocab.json"):  # byte for byte
            assert (ours / name).read_bytes() == (theirs / name).read_bytes(), (ticket, name)


def test_run_iou_killed_before_its_done_file_re_runs_whole(tmp_path, script_env):
    import torch

    from utils.masks import Mask

    masks = {}
    for i, label in enumerate(("en", "de", "base")):
        keep = {"wav2vec2.encoder.layers.0.attention.q_proj.weight": torch.from_numpy(__import__("numpy").random.default_rng(i).random((16, 16)) < 0.2)}
        masks[label] = tmp_path / f"{label}.safetensors"
        Mask.save(masks[label], keep, {"sparsity": 0.8, "scope": "encoder_linear", "method": "magnitude", "language": label})
    args = lambda out: ["--masks", f"en={masks['en']}", f"de={masks['de']}", "--base", str(masks["base"]), "--output_dir", str(out)]  # noqa: E731
    reference = tmp_path / "reference"
    assert run_in_process("run_iou.py", args(reference)) == 0
    out = tmp_path / "iou"
    assert faulty("utils.report:plot_layer_iou", "kill", "run_iou.py", args(out), script_env).returncode == KILLED
    assert (out / "iou.csv").is_file() and not (out / "iou.json").exists()  # not done: a grid would run it again
    assert plain("run_iou.py", args(out), script_env).returncode == 0
    for name in ("iou.csv", "iou_layers.csv", "iou.json", "iou_heatmap.png", "iou_layers.png"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name

