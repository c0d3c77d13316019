import json
import re

import pytest

from utils.runs import SIGNATURE_FILE, claim_output_dir, write_json_atomic


def test_claim_new_same_and_different(tmp_path):
    out = tmp_path / "run"
    signature = {"script": "run_finetune.py", "language": "en"}
    assert claim_output_dir(str(out), signature) is None
    assert json.loads((out / SIGNATURE_FILE).read_text()) == signature
    for step in (10, 20, 30, 40):
        (out / f"checkpoint-{step}").mkdir()
        (out / f"checkpoint-{step}" / "model.safetensors").write_bytes(b"weights")
    for step in (10, 20):
        (out / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (out / "checkpoint-30" / "trainer_state.json").write_text('{"global_st')  # torn: killed while writing it
    # checkpoint-40 has no trainer_state.json: the Trainer writes it last, so the save never finished
    assert claim_output_dir(str(out), signature).endswith("checkpoint-20")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-20"]  # no reader takes them for complete
    with pytest.raises(FileExistsError, match=r"holds a different run \(language: 'en' there, 'de' now\)"):
        claim_output_dir(str(out), {"script": "run_finetune.py", "language": "de"})
    assert json.loads((out / SIGNATURE_FILE).read_text()) == signature


HOLD = """
import sys, time
sys.path.insert(0, sys.argv[1])
from utils.runs import lock_folder
lock_folder(sys.argv[2])
print("locked", flush=True)
time.sleep(120)
"""


def test_a_folder_in_use_is_refused_and_a_dead_holders_lock_taken_over(tmp_path, caplog):
    import logging
    import os
    import signal
    import subprocess
    import sys

    from tests.conftest import ROOT
    from utils.runs import lock_paths, release_locks

    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(ROOT), str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FileExistsError) as err:
            claim_output_dir(str(out), {"script": "x"})
        assert f"output_dir {str(out)!r} is in use by process {holder.pid} on " in str(err.value) and "wait for it to finish" in str(err.value)
        assert not out.exists()  # refused before anything was written
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    with caplog.at_level(logging.WARNING):
        assert claim_output_dir(str(out), {"script": "x"}) is None
    assert f"took over the lock of {out} left by process {holder.pid}" in caplog.text
    lock, owner = lock_paths(out)
    assert json.loads(owner.read_text())["pid"] == os.getpid()
    release_locks()
    assert lock.exists() and not owner.exists()  # released: the next run takes it without a message


def test_claim_refuses_foreign_directory(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        claim_output_dir(str(tmp_path), {"script": "x"})
    assert (tmp_path / "precious.txt").read_text() == "keep me"
    assert not (tmp_path / SIGNATURE_FILE).exists()


def test_write_json_atomic_leaves_no_temp(tmp_path):
    write_json_atomic(tmp_path / "a" / "r.json", {"b": 1})
    write_json_atomic(tmp_path / "a" / "r.json", {"b": 2})
    assert json.loads((tmp_path / "a" / "r.json").read_text()) == {"b": 2}
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["r.json"]


def test_signature_covers_every_result_changing_field_and_names_the_first_difference(tmp_path):
    from dataclasses import dataclass

    from utils.runs import RUNTIME_FIELDS, run_signature
    from utils.training import CTCTrainingArguments

    @dataclass
    class Extra:
        language: str = "en"
        output_dir: str = "x"  # runtime: not part of the identity

    args = CTCTrainingArguments(output_dir=str(tmp_path / "a"), learning_rate=1e-3, logging_steps=7, use_cpu=True, report_to="none")
    signature = run_signature("run_x.py", Extra(), args)
    assert signature["script"] == "run_x.py" and signature["language"] == "en" and signature["learning_rate"] == 1e-3
    assert signature["eval_strategy"] == "epoch" and signature["seed"] == 42 and signature["num_train_epochs"] == 3.0
    assert not RUNTIME_FIELDS & set(signature)
    assert json.loads(json.dumps(signature)) == signature  # plain JSON
    other = CTCTrainingArguments(output_dir=str(tmp_path / "b"), learning_rate=1e-3, logging_steps=50, use_cpu=True, report_to="none", disable_tqdm=True)
    assert run_signature("run_x.py", Extra(), other) == signature  # only runtime fields differ
    out = tmp_path / "run"
    claim_output_dir(str(out), signature)
    for change, message in (({"learning_rate": 2e-3}, "learning_rate: 0.001 there, 0.002 now"), ({"seed": 1}, "seed: 42 there, 1 now"),
                            ({"num_train_epochs": 5, "seed": 3}, "num_train_epochs: 3.0 there, 5 now and 1 other setting")):
        changed = CTCTrainingArguments(output_dir=str(out), use_cpu=True, report_to="none", **({"learning_rate": 1e-3} | change))
        with pytest.raises(FileExistsError, match=re.escape(message)):
            claim_output_dir(str(out), run_signature("run_x.py", Extra(), changed))
    assert json.loads((out / SIGNATURE_FILE).read_text()) == signature


def test_secret_flags_are_redacted_from_recorded_command_lines():
    from utils.runs import REDACTED, redact_argv

    argv = ["run_prune.py", "--hub_token", "hf_abc", "--seed", "1", "--hub_token=hf_def", "--hub_token_x", "kept"]
    assert redact_argv(argv) == ["run_prune.py", "--hub_token", REDACTED, "--seed", "1", f"--hub_token={REDACTED}", "--hub_token_x", "kept"]
