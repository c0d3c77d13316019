import json

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
