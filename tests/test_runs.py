import json
import re

import pytest

from utils.runs import SIGNATURE_FILE, claim_output_dir, write_json_atomic


def test_claim_new_same_and_different(tmp_path):
    out = tmp_path / "run"
    signature = {"script": "run_finetune.py", "language": "en"}
    assert claim_output_dir(str(out), signature) is None
    assert json.loads((out / SIGNATURE_FILE).read_text()) == signature
    (out / "checkpoint-10").mkdir()
    (out / "checkpoint-20").mkdir()
    assert claim_output_dir(str(out), signature).endswith("checkpoint-20")
    with pytest.raises(FileExistsError, match=r"holds a different run \(language: 'en' there, 'de' now\)"):
        claim_output_dir(str(out), {"script": "run_finetune.py", "language": "de"})
    assert json.loads((out / SIGNATURE_FILE).read_text()) == signature


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
