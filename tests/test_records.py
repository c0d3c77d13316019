"""Typed records shared by writer and reader, and the layout every step's output follows."""

import json
from dataclasses import fields

import pytest

from tests.conftest import write_study
from utils.errors import UsageError
from utils.grid import load_config, plan
from utils.layout import StudyLayout, sparsity_dirname
from utils.records import IoUSummary, StepRecord, TransferResult


def test_records_round_trip_and_refuse_missing_or_unknown_fields(tmp_path):
    values = {f.name: i for i, f in enumerate(fields(TransferResult))}  # any values: the record checks names, not types
    TransferResult(**values).write(tmp_path / "results.json")
    assert TransferResult.read(tmp_path / "results.json").to_dict() == values
    (tmp_path / "short.json").write_text(json.dumps({k: v for k, v in values.items() if k != "test_cer"}))
    with pytest.raises(UsageError, match=r"short.json is not a TransferResult: missing \['test_cer'\]"):
        TransferResult.read(tmp_path / "short.json")
    (tmp_path / "extra.json").write_text(json.dumps(values | {"colour": "blue"}))
    with pytest.raises(UsageError, match=r"extra.json is not a TransferResult: unknown \['colour'\]"):
        TransferResult.read(tmp_path / "extra.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(UsageError, match=r"holds a list: expected a JSON object \(IoUSummary\)"):
        IoUSummary.read(tmp_path / "list.json")
    base = {"id": "seed-0/finetune/en", "kind": "finetune", "command": "python run_finetune.py", "settings": {}, "identity": {}, "needs": []}
    (tmp_path / "step.json").write_text(json.dumps(base))  # what the runner writes before the job reports anything
    record = StepRecord.read(tmp_path / "step.json")
    assert record.status is None and record.returncode is None and record.id == base["id"]


def test_every_step_lives_where_the_layout_says(tmp_path):
    config = load_config(str(write_study(tmp_path, upstream=["en", "de"])))
    layout = StudyLayout(tmp_path / "study")
    for step in plan(config):
        if step.kind != "prune":  # prune steps are named after what they do; their output is the ticket folder
            assert layout.step_id(step.output) == step.id
    ids = {s.id: s for s in plan(config)}
    assert ids["seed-1/prune/de/sparsity-0.80"].output == layout.ticket(1, "de", 0.8) == tmp_path / "study" / "seed-1" / "tickets" / "de" / "sparsity-0.80"
    assert ids["iou-seeds/sparsity-0.80"].output == layout.seeds_iou(0.8) and sparsity_dirname(0.7) == "sparsity-0.70"
