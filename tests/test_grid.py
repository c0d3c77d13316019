"""The grid: config validation, resuming a killed study without redoing finished steps, and the
report rendered from a small results set."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.conftest import ROOT, TINY_CONFIG
from utils.grid import load_config, plan
from utils.report import cer_table, write_report

TRAIN = {"per_device_train_batch_size": 8, "learning_rate": 2.0e-3, "freeze_feature_encoder": False, "use_cpu": True, "disable_tqdm": True}


def study(tmp_path, corpus_dir, **overrides):
    config = {
        "name": "test study",
        "output_dir": str(tmp_path / "study"),
        "model": str(TINY_CONFIG),
        "upstream": ["en"],
        "downstream": ["ca"],
        "sparsities": [0.5, 0.8],
        "seeds": [0],
        "data": {"data_dir": "UNUSED"},
        "finetune": {"num_train_epochs": 1, "max_train_samples": 48, **TRAIN},
        "transfer": {"freeze_epochs": 1, "train_epochs": 1, "max_train_samples": 24, **TRAIN},
    } | overrides
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_config_errors_come_before_any_work(tmp_path, corpus_dir):
    cases = [
        ({"upstream": ["en", "xx"]}, "unknown language 'xx'"),
        ({"sparsities": [0.5, 1.0]}, "sparsity 1.0 is outside"),
        ({"data": {"dataset_name": "generated"}, "downstream": ["ast"]}, "no voice for ast"),
        ({"colour": "blue"}, "unknown key(s) ['colour']"),
        ({"transfer": {"train_epoch": 3}}, "section 'transfer' has unknown flag(s) ['train_epoch']"),
        ({"pretrain": {"mixture": {"en": 1.0}}}, "'pretrain' needs data.dataset_name: generated"),
    ]
    for overrides, message in cases:
        path = study(tmp_path, corpus_dir, **overrides)
        result = subprocess.run([sys.executable, str(ROOT / "run_grid.py"), "--config", str(path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, result.stderr[-2000:]
        assert message in result.stderr.strip().splitlines()[-1], result.stderr.strip().splitlines()[-1]
        assert not (tmp_path / "study").exists()


def test_plan_covers_the_study(tmp_path, corpus_dir):
    config = load_config(str(study(tmp_path, corpus_dir, upstream=["en", "de"], downstream=["ca", "en"], transfer_base=True)))
    kinds = [step.kind for step in plan(config)]
    # init base, 2 fine-tunes, 3 prunes (base + 2), (2 + base) x 2 downstream x 2 sparsities, 2 IoU
    assert kinds == ["init"] + ["finetune"] * 2 + ["prune"] * 3 + ["transfer"] * 12 + ["iou"] * 2
    demo = plan(load_config(str(ROOT / "configs" / "demo.yaml")))
    assert [s.kind for s in demo[:4]] == ["corpus", "init", "pretrain", "finetune"]
    assert demo[3].settings["model_name_or_path"] == demo[2].settings["output_dir"]  # upstream models start from the pretrained base
    assert load_config(str(ROOT / "configs" / "paper.yaml")).downstream == ["ca", "ast", "xh", "en", "de", "fr", "es", "pl"]
    assert len(plan(load_config(str(ROOT / "configs" / "paper.yaml")))) == 5 + 6 + 6 * 8 * 3 + 3


def test_killed_grid_resumes_without_redoing_steps(tmp_path, corpus_dir):
    path = study(tmp_path, corpus_dir, data={"data_dir": str(corpus_dir / "{language}")})
    # data_dir holds a {language} placeholder: each script gets its own language's folder.
    command = [sys.executable, str(ROOT / "run_grid.py"), "--config", str(path)]
    dry = subprocess.run([*command, "--dry_run"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0 and dry.stdout.strip().endswith("# 8 of 8 steps to run")
    assert f"--data_dir {corpus_dir / 'en'}" in dry.stdout and f"--data_dir {corpus_dir / 'ca'}" in dry.stdout
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    steps_dir = tmp_path / "study" / "steps"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        records = [json.loads(p.read_text()) for p in steps_dir.glob("*.json")] if steps_dir.is_dir() else []
        if sum(r["status"] == "done" for r in records) >= 4:  # base, fine-tune and both prunes finished
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {p.name for p in steps_dir.glob("*.json") if json.loads(p.read_text())["status"] == "done"}
    assert len(done_before) >= 4
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ran, skipped = map(int, re.search(r"ran (\d+) step\(s\), skipped (\d+)", result.stdout).groups())
    assert skipped == len(done_before) and ran == 8 - skipped
    for name in done_before:  # finished steps were not run again
        assert f"{name.removesuffix('.json').replace('__', '/')}: done already" in result.stdout
    records = {p.name: json.loads(p.read_text()) for p in steps_dir.glob("*.json")}
    assert len(records) == 8 and all(r["status"] == "done" and r["command"] and r["settings"] for r in records.values())
    report = (tmp_path / "study" / "REPORT.md").read_text()
    rows = [json.loads(p.read_text()) for p in (tmp_path / "study").glob("seed-0/transfer/*/*/results.json")]
    assert len(rows) == 2
    for row in rows:
        assert f"{100 * row['test_cer']:.2f}" in report
    assert (tmp_path / "study" / "figures" / "iou_heatmap_0.80.png").is_file()
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert "ran 0 step(s), skipped 8" in again.stdout


def _row(up, down, s, cer, seed=0):
    return {"upstream": up, "downstream": down, "sparsity": s, "test_cer": cer, "seed": seed}


def test_report_numbers_match_the_inputs(tmp_path):
    rows = [
        _row("en", "ca", 0.9, 0.30), _row("en", "en", 0.9, 0.10), _row("en", "de", 0.9, 0.40),
        _row("de", "ca", 0.9, 0.35), _row("de", "en", 0.9, 0.50), _row("de", "de", 0.9, 0.20),
        _row("en", "ca", 0.9, 0.32, seed=1),  # a second seed: its cell is the mean, 31.00 ± 1.00
    ]
    table, numbers = cer_table(rows, 0.9, ["en", "de"], ["ca", "en", "de"])
    lines = table.splitlines()
    assert lines[0] == "| upstream ticket \\ downstream | ca | en | de | avg non-matching |"
    assert lines[2] == "| **en** | **31.00 ± 1.00** | **10.00** † | 40.00 | 35.50 |"
    assert lines[3] == "| **de** | 35.00 | 50.00 | **20.00** † | 42.50 |"
    assert numbers["avg_non_matching"]["en"] == pytest.approx((0.31 + 0.40) / 2)
    iou = {
        "labels": ["en", "de", "base"], "matrix": [[1, 0.8, 0.7], [0.8, 1, 0.6], [0.7, 0.6, 1]],
        "random_matrix": [[float("nan"), 0.05, 0.05], [0.05, float("nan"), 0.05], [0.05, 0.05, float("nan")]],
        "random_baseline": 0.0526, "density": 0.1, "pairs": [], "layers": [
            {"a": "en", "b": "base", "group_kind": "layer", "group": "0", "iou": 0.7, "random_iou": 0.05},
            {"a": "de", "b": "base", "group_kind": "layer", "group": "0", "iou": 0.6, "random_iou": 0.05},
        ],
    }
    path = write_report(tmp_path, rows, {0.9: iou}, ["en", "de"], ["ca", "en", "de"], "Test study")
    text = path.read_text()
    assert "## Sparsity 90%" in text and lines[2] in text
    assert "| **en** | 1 | 80.00 | 70.00 |" in text and "5.26%" in text
    for png in ("cer_vs_sparsity.png", "iou_heatmap_0.90.png", "iou_layers_0.90.png"):
        assert (tmp_path / "figures" / png).read_bytes()[:4] == b"\x89PNG"
