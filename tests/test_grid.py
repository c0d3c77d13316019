"""The grid: config validation, resuming a killed study without redoing finished steps, the
seed-to-seed IoU of a two-seed study, stale steps after a config edit, and the report rendered
from hand-made results."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import ROOT, files_containing, grid, result_row, study_config, write_study
from tests.faults import KILLED, faulty, last_line
from utils.grid import load_config, plan
from utils.masks import Mask
from utils.metrics import read_predictions
from utils.records import StudyResults
from utils.report import cer_table, paired_table, write_report
from utils.stats import Rates, cell_interval, difference_interval, rate_interval

GRID_SECRET = "hf_grid_secret_token"


def test_config_errors_come_before_any_work(tmp_path):
    from run_grid import check_flags

    cases = [
        ({"upstream": ["en", "xx"]}, "unknown language 'xx'"),
        ({"sparsities": [0.5, 1.0]}, "sparsity 1.0 is outside"),
        ({"data": {"dataset_name": "generated"}, "downstream": ["ast"]}, "no voice for ast"),
        ({"colour": "blue"}, "unknown key(s) ['colour']"),
        ({"transfer": {"train_epoch": 3}}, "section 'transfer' has unknown flag(s) ['train_epoch']"),
        ({"ctc_pretrain": {"mixture": {"en": 1.0}}}, "'ctc_pretrain' needs data.dataset_name: generated"),
        ({"seeds": [0, 1, 0]}, "give seed(s) [0] more than once"),
        # wrong types, nested junk and templates with other fields
        ({"upstream": "en"}, "grid config upstream is a string 'en': expected a list of strings"),
        ({"upstream": [False]}, "upstream[0] is a boolean False: expected a string (quote it"),
        ({"sparsities": 0.8}, "grid config sparsities is a number 0.8: expected a list of numbers"),
        ({"seeds": ["0"]}, "grid config seeds[0] is a string '0': expected an integer"),
        ({"data": [1, 2]}, "grid config data is a list: expected a mapping"),
        ({"prune_base": "yes"}, "grid config prune_base is a string 'yes': expected a boolean"),
        ({"finetune": {"learning_rate": {"value": 1e-3}}}, "grid config finetune.learning_rate is a mapping: expected a flag value"),
        ({"transfer": {"train_epochs": [[1]]}}, "grid config transfer.train_epochs is a list: expected a flag value"),
        ({"transfer": {"train_epochs": None}}, "grid config transfer.train_epochs is empty None: expected a flag value"),
        ({"bases": {"a": ["en"]}}, "grid config bases.a is a list: expected a mapping"),
        ({"resources": {"prune": {"cpus": "two"}}}, "resources.prune.cpus 'two': expected a positive integer"),
        ({"slurm": "gpu"}, "grid config slurm is a string 'gpu': expected a mapping"),
        ({"data": {"data_dir": "/corpora/{lang}"}}, "data.data_dir '/corpora/{lang}' uses the template field {lang}: only {language} is filled in"),
        ({"data": {"data_dir": "/corpora/{language}/{0}"}}, "uses the template field {0}"),
        ({"data": {"data_dir": "/corpora/{language"}}, "data.data_dir '/corpora/{language' is not a valid template"),
    ]
    for overrides, message in cases:
        with pytest.raises(ValueError) as err:
            check_flags(load_config(str(write_study(tmp_path, **overrides))))
        assert message in str(err.value)
    # the command line: one error line, exit code 2, nothing written
    result = grid(write_study(tmp_path, seeds=[3, 3]), timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("error: grid config seeds [3, 3] give seed(s) [3] more than once")
    assert not (tmp_path / "study").exists()


junk = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
SECTIONS = ["upstream", "downstream", "sparsities", "seeds", "data", "finetune", "prune", "transfer", "resources", "slurm", "bases",
            "ctc_pretrain", "ssl_pretrain", "dominant", "prune_base", "launcher", "note", "model"]


@settings(max_examples=150, deadline=None, derandomize=True)  # the same examples on every run
@given(section=st.sampled_from(SECTIONS), inner=st.booleans(), value=junk)
def test_junk_anywhere_in_a_config_is_one_usage_error(tmp_path_factory, section, inner, value):
    """Any value of any type at any top-level key or inside any section: the config loads and
    plans, or is refused with a one-line UsageError; never another exception."""
    from run_grid import check_flags
    from utils.errors import UsageError

    tmp_path = tmp_path_factory.mktemp("junk")
    config = study_config(tmp_path)
    if inner and isinstance(config.get(section), dict):
        config[section] = dict(config[section], junk_key=value)
    else:
        config[section] = value
    path = tmp_path / "junk.yaml"
    path.write_text(yaml.safe_dump(config))
    try:
        loaded = load_config(str(path))
        check_flags(loaded)
        plan(loaded)
    except UsageError as err:
        assert "\n" not in str(err) and str(err)


def test_plan_covers_the_study_and_identities_follow_dependencies(tmp_path):
    config = load_config(str(write_study(tmp_path, upstream=["en", "de"], downstream=["ca", "en"], sparsities=[0.5, 0.8], seeds=[0], transfer_base=True)))
    steps = plan(config)
    # init base, 2 fine-tunes, (base + 2) x 2 sparsities prunes, (2 + base) x 2 downstream x 2 sparsities, 2 IoU
    assert [s.kind for s in steps] == ["init"] + ["finetune"] * 2 + ["prune"] * 6 + ["transfer"] * 12 + ["iou"] * 2
    position = {s.id: i for i, s in enumerate(steps)}
    assert all(position[n] < position[s.id] for s in steps for n in s.needs)  # dependency order
    demo = plan(load_config(str(ROOT / "configs" / "demo.yaml")))
    assert [s.kind for s in demo[:4]] == ["corpus", "init", "pretrain", "finetune"]
    assert demo[3].settings["model_name_or_path"] == demo[2].settings["output_dir"]  # upstream models start from the pretrained base
    assert load_config(str(ROOT / "configs" / "paper.yaml")).downstream == ["ca", "ast", "xh", "en", "de", "fr", "es", "pl"]
    assert len(plan(load_config(str(ROOT / "configs" / "paper.yaml")))) == 5 + 6 * 3 + 6 * 8 * 3 + 3
    # Three published bases: per base and seed 5 fine-tunes, 6 prunes, 5 x 3 transfers, 1 IoU; per base 1 seed-to-seed IoU.
    models = plan(load_config(str(ROOT / "configs" / "models.yaml")))
    assert len(models) == 3 * (3 * (5 + 6 + 15 + 1) + 1) and not any(s.kind in ("init", "pretrain") for s in models)
    # Two seeds add the seed-to-seed IoU of every ticket, per sparsity.
    seeds = plan(load_config(str(write_study(tmp_path, "two.yaml"))))
    across = [s for s in seeds if s.id.startswith("iou-seeds/")]
    assert [s.id for s in across] == ["iou-seeds/sparsity-0.80"]
    assert [m.split("=")[0] for m in across[0].settings["masks"]] == ["en@0", "en@1", "base@0", "base@1"]

    def digests(**overrides):
        return {s.id: s.digest for s in plan(load_config(str(write_study(tmp_path, "edit.yaml", **overrides))))}

    before = digests()
    same = digests(note="a note", finetune=study_config(tmp_path)["finetune"] | {"logging_steps": 5, "disable_tqdm": False})
    assert same == before  # runtime-only flags and notes change nothing
    kept = plan(load_config(str(write_study(tmp_path, "keep.yaml", keep_checkpoints=True))))
    assert {s.id: s.digest for s in kept} == before  # keeping checkpoints changes no result
    assert {s.kind for s in kept if s.argv[-2:] == ["--keep_checkpoints", "True"]} == {"finetune", "transfer"}  # the training steps, no other
    assert not any("--keep_checkpoints" in s.argv for s in plan(load_config(str(write_study(tmp_path, "default.yaml")))))
    lr = digests(transfer=study_config(tmp_path)["transfer"] | {"learning_rate": 1e-3})
    assert {k for k in before if lr[k] != before[k]} == {"seed-0/transfer/en-ca/sparsity-0.80", "seed-1/transfer/en-ca/sparsity-0.80"}
    ft = digests(finetune=study_config(tmp_path)["finetune"] | {"num_train_epochs": 2})
    assert {k for k in before if ft[k] != before[k]} == {f"seed-{s}/{x}" for s in (0, 1) for x in (
        "finetune/en", "prune/en/sparsity-0.80", "transfer/en-ca/sparsity-0.80", "iou/sparsity-0.80")} | {"iou-seeds/sparsity-0.80"}


def test_a_shared_base_is_made_once_and_its_identity_says_so(tmp_path):
    demo = ROOT / "configs" / "demo-seeds.yaml"
    steps = plan(load_config(str(demo)))
    by_id = {s.id: s for s in steps}
    shared = [s for s in steps if s.kind in ("init", "pretrain")]
    assert [s.id for s in shared] == ["shared-base/base-model", "shared-base/pretrain"]
    assert all(s.identity["shared"] == "every seed" and s.settings["seed"] == 0 for s in shared)  # made with the first seed
    for seed in (0, 1, 2):
        assert by_id[f"seed-{seed}/finetune/en"].needs == ["shared-base/pretrain"] and by_id[f"seed-{seed}/finetune/en"].settings["seed"] == seed
        assert by_id[f"seed-{seed}/prune/base/sparsity-0.70"].settings["model_name_or_path"] == by_id["shared-base/pretrain"].settings["output_dir"]
    # Seed 0 of the shared-base study runs exactly make demo's steps (same settings, same base).
    single = {s.id: s for s in plan(load_config(str(ROOT / "configs" / "demo.yaml")))}
    for shared_id, own_id in (("shared-base/base-model", "seed-0/base-model"), ("shared-base/pretrain", "seed-0/pretrain")):
        paths = ("model_name_or_path",)  # where the base it starts from lives
        assert {k: v for k, v in by_id[shared_id].identity["settings"].items() if k not in paths} == {
            k: v for k, v in single[own_id].identity["settings"].items() if k not in paths}
    config = yaml.safe_load(demo.read_text())

    def digests(**overrides):
        edited = tmp_path / "edited.yaml"
        edited.write_text(yaml.safe_dump(config | {"extends": str(demo.parent / "demo.yaml")} | overrides))
        return {s.id: s.digest for s in plan(load_config(str(edited)))}

    before = digests()
    more = digests(seeds=[0, 1, 2, 3])  # another seed: the shared base and every seed's steps stay done; only the across-seed IoU grows
    assert {k for k, v in before.items() if more[k] != v} == {"iou-seeds/sparsity-0.70", "iou-seeds/sparsity-0.90"}
    lr = digests(ctc_pretrain=load_config(str(demo)).ctc_pretrain | {"mixture": {"en": 0.5, "de": 0.25, "es": 0.25}, "learning_rate": 1e-3})
    changed = {k for k in before if lr[k] != before[k]}
    assert "shared-base/pretrain" in changed and "shared-base/base-model" not in changed
    assert {k for k in before if k.startswith(("seed-", "iou-seeds"))} <= changed  # everything after the base


@pytest.fixture(scope="module")
def finished_study(corpus_dir, tmp_path_factory):
    """A two-seed study killed mid-way and resumed; returns (config path, first-run info)."""
    tmp_path = tmp_path_factory.mktemp("grid")
    path = write_study(tmp_path, data={"data_dir": str(corpus_dir / "{language}")}, prune_base=False)
    config = yaml.safe_load(path.read_text())  # a Hub token in a section: it must reach no command line, record, log or output
    config["finetune"]["hub_token"] = config["transfer"]["hub_token"] = GRID_SECRET
    path.write_text(yaml.safe_dump(config))
    # data_dir holds a {language} placeholder: each script gets its own language's folder.
    dry = grid(path, "--dry_run", timeout=120)
    assert dry.returncode == 0 and dry.stdout.strip().endswith("# 9 of 9 steps to run (0 of them stale)")
    assert f"--data_dir {corpus_dir / 'en'}" in dry.stdout and f"--data_dir {corpus_dir / 'ca'}" in dry.stdout
    assert "# seed-0/transfer/en-ca/sparsity-0.80 (after seed-0/prune/en/sparsity-0.80)" in dry.stdout
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "run_grid.py"), "--config", str(path)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    steps_dir = tmp_path / "study" / "steps"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        records = [json.loads(p.read_text()) for p in steps_dir.glob("*.json")] if steps_dir.is_dir() else []
        if sum(r["status"] == "done" for r in records) >= 3:  # base, fine-tune and prune of seed 0 finished
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {p.name for p in steps_dir.glob("*.json") if json.loads(p.read_text())["status"] == "done"}
    result = grid(path)
    assert result.returncode == 0, result.stderr[-3000:]
    return path, done_before, result.stdout


def test_killed_grid_resumes_without_redoing_steps(finished_study):
    path, done_before, stdout = finished_study
    study = path.parent / "study"
    assert len(done_before) >= 3
    ran, skipped = map(int, re.search(r"ran (\d+) step\(s\), skipped (\d+)", stdout).groups())
    assert skipped == len(done_before) and ran == 9 - skipped
    for name in done_before:  # finished steps were not run again
        assert f"{name.removesuffix('.json').replace('__', '/')}: done already" in stdout
    records = {p.name: json.loads(p.read_text()) for p in (study / "steps").glob("*.json")}
    assert len(records) == 9 and all(r["status"] == "done" and r["command"] and r["identity"] for r in records.values())
    assert (study / "figures" / "iou_noise_floor_0.80.png").is_file()
    again = grid(path, timeout=120)
    assert "ran 0 step(s), skipped 9" in again.stdout
    assert files_containing(study, GRID_SECRET) == [] and GRID_SECRET not in again.stdout + again.stderr


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_finished_steps_leave_no_checkpoints_and_the_dry_run_footprint_matches_them(finished_study):
    """Every training step of the killed-and-resumed study removed its checkpoints once it had
    succeeded; the footprint --dry_run prints is within 10% of what the finished study holds, per
    kind of step that writes weights and in total."""
    path, _, _ = finished_study
    study = path.parent / "study"
    assert not list(study.rglob("checkpoint-*"))
    dry = grid(path, "--dry_run", timeout=120)
    assert dry.returncode == 0, dry.stderr[-2000:]
    printed = dict(re.findall(r"^#   (\w+) .* (\d[\d.]* [kMG]?B)$", dry.stdout, re.M))
    scale = {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}
    estimate = {kind: float(text.split()[0]) * scale[text.split()[1]] for kind, text in printed.items()}
    steps = plan(load_config(str(path)))
    measured = {kind: sum(du(s.output) for s in steps if s.kind == kind) for kind in ("init", "finetune", "prune", "transfer")}
    assert set(estimate) == set(measured) | {"total"}, printed
    for kind, size in measured.items():
        assert abs(estimate[kind] - size) <= 0.1 * size, (kind, estimate[kind], size)
    assert abs(estimate["total"] - du(study)) <= 0.1 * du(study), (estimate["total"], du(study))


def test_footprint_sums_each_base_at_its_own_size():
    """configs/models.yaml: three published bases of different sizes, 3 seeds each (5 fine-tunes,
    6 prunes, 15 transfers per seed): every kind's total is each base's count times its own size,
    by hand, and the largest is the largest base's."""
    from utils.footprint import ModelSize, footprint_lines, study_footprint

    config = load_config(str(ROOT / "configs" / "models.yaml"))
    gb = {"facebook/wav2vec2-xls-r-300m": 1, "facebook/wav2vec2-xls-r-1b": 2, "facebook/w2v-bert-2.0": 3}
    rows = {r.kind: r for r in study_footprint(config, plan(config), lambda ref: ModelSize(gb[ref] * 10**9, 0, 8 * 10**6))}
    assert set(rows) == {"finetune", "prune", "transfer"}
    assert (rows["finetune"].steps, rows["finetune"].kept, rows["finetune"].largest) == (45, 15 * 6 * 10**9, 3 * 10**9)
    assert (rows["prune"].steps, rows["prune"].kept) == (54, 18 * 6 * 10**9 + 54 * 10**6)  # each ticket: its model and a bit per prunable weight
    assert rows["transfer"].kept == 45 * 6 * 10**9 and rows["transfer"].checkpoints == 2 * 3 * rows["transfer"].kept  # 2 kept, 3x the weights each
    assert rows["transfer"].running == 3 * 3 * 3 * 10**9  # the largest base's: 2 kept and 1 being saved
    lines = footprint_lines(list(rows.values()), keep_checkpoints=False)
    assert lines[-2].split()[-2:] == ["468", "GB"]  # 90 + 108.054 + 270 GB


def report_files(study: Path) -> dict[str, bytes]:
    """Every file the report step writes (and any temporary left beside them)."""
    files = [study / "REPORT.md", study / "results.csv", *study.glob(".*.tmp-*"), *(study / "figures").iterdir()]
    return {str(p.relative_to(study)): p.read_bytes() for p in files if p.is_file()}


def test_the_report_survives_a_kill_and_a_full_disk(finished_study):
    """The grid's last step, killed while writing a figure and then out of disk while writing
    results.csv: the previous report stays whole, no half file is left, and the same command
    writes it again byte for byte."""
    path, _, _ = finished_study
    study = path.parent / "study"
    before = report_files(study)
    assert {"REPORT.md", "results.csv", "figures/cer_vs_sparsity.png", "figures/iou_noise_floor_0.80.png"} <= set(before) and not [k for k in before if ".tmp-" in k]
    command = ["--config", str(path), "--report_only"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    killed = faulty("matplotlib.figure:Figure.savefig#2", "kill-after", "run_grid.py", command, env)  # its data written, not yet renamed
    assert killed.returncode == KILLED, killed.stderr[-2000:]
    left = report_files(study)
    temps = [k for k in left if ".tmp-" in k]
    assert len(temps) == 1 and {k: v for k, v in left.items() if k not in temps} == before  # the old report, whole
    full = faulty("utils.report:write_csv_atomic", "fsize=64", "run_grid.py", command, env)
    assert full.returncode == 1, full.stderr[-2000:]
    assert last_line(full).startswith("error: out of disk space") and "re-run the same command" in last_line(full), last_line(full)
    assert "took over the lock" in full.stdout + full.stderr  # the killed run's lock
    assert report_files(study) == left  # its own temporary removed, nothing else touched
    again = grid(path, "--report_only", timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert report_files(study) == before  # the killed run's temporary removed when its figure was written again


def test_results_intervals_and_noise_floor_recompute_from_the_files(finished_study):
    path, _, _ = finished_study
    study = path.parent / "study"
    csv_rows = {(r["seed"]): r for r in __import__("csv").DictReader(open(study / "results.csv"))}
    per_seed = []
    for seed in (0, 1):
        out = study / f"seed-{seed}" / "transfer" / "en-ca" / "sparsity-0.80"
        result = json.loads((out / "results.json").read_text())
        rows = read_predictions(out / "predictions_test.jsonl", result["test_cer"], result["test_samples"])
        per_seed.append(([r.char_edits for r in rows], [r.ref_chars for r in rows]))
        ci = rate_interval(Rates.from_seeds([per_seed[-1]]))
        assert float(csv_rows[str(seed)]["test_cer_low"]) == pytest.approx(ci.low) and float(csv_rows[str(seed)]["test_cer_high"]) == pytest.approx(ci.high)
        assert ci.low <= result["test_cer"] <= ci.high
    report = (study / "REPORT.md").read_text()
    pooled = cell_interval(Rates.from_seeds(per_seed, [0, 1]), "ca")  # training noise (2 seeds) and test sampling
    seed_cers = Rates.from_seeds(per_seed).per_seed()
    assert f"{100 * pooled.estimate:.2f} ± {100 * np.std(seed_cers, ddof=1):.2f} [{100 * pooled.low:.2f}, {100 * pooled.high:.2f}]" in report
    # The seed-to-seed IoU: the en tickets of seeds 0 and 1, against a numpy reference on the masks.
    seeds_iou = json.loads((study / "iou-seeds" / "sparsity-0.80" / "iou.json").read_text())
    pair = next(r for r in seeds_iou["pairs"] if {r["a"], r["b"]} == {"en@0", "en@1"})
    a, b = (Mask.load(study / f"seed-{s}" / "tickets" / "en" / "sparsity-0.80").bools() for s in (0, 1))
    inter = sum(int((a[n] & b[n]).sum()) for n in a)
    union = sum(int((a[n] | b[n]).sum()) for n in a)
    assert pair["iou"] == pytest.approx(inter / union, abs=1e-12)
    assert pair["chance_corrected"] == pytest.approx((pair["iou"] - pair["random_iou"]) / (1 - pair["random_iou"]))
    assert "Noise floor at 80%" in report and f"| **en** | {100 * pair['iou']:.2f} |" in report
    assert (study / "figures" / "iou_noise_floor_0.80.png").read_bytes()[:4] == b"\x89PNG"


def _learning_rate(results: Path) -> float | None:
    """The learning rate a results file records, or None while the grid has it moved aside (it can go between any two calls)."""
    try:
        return json.loads(results.read_text())["learning_rate"]
    except FileNotFoundError:
        return None


def test_edited_settings_make_exactly_their_steps_stale_and_rerun_resumes(finished_study, tmp_path):
    path, _, _ = finished_study
    study = path.parent / "study"
    config = yaml.safe_load(path.read_text())
    edited = path.parent / "edited.yaml"
    # A finished study with a fine-tuning setting changed: the fine-tunes and everything downstream are stale.
    edited.write_text(yaml.safe_dump(config | {"finetune": config["finetune"] | {"learning_rate": 1e-3}}))
    dry = grid(edited, "--dry_run", timeout=120)
    stale = set(re.findall(r"^# stale: (\S+)", dry.stdout, re.M))
    assert stale == {f"seed-{s}/{x}" for s in (0, 1) for x in ("finetune/en", "prune/en/sparsity-0.80", "transfer/en-ca/sparsity-0.80")} | {"iou-seeds/sparsity-0.80"}
    assert "# stale: seed-0/finetune/en (learning_rate: 0.002 when it ran, 0.001 now)" in dry.stdout
    status = grid(edited, "--status", timeout=120)
    states = dict(re.findall(r"^(\S+)\s+(done|stale|pending|failed|running|queued)\b", status.stdout, re.M))
    assert {k for k, v in states.items() if v == "stale"} == stale and states["seed-0/base-model"] == "done"
    # A transfer setting changed: a normal run stops before any work, naming them.
    edited.write_text(yaml.safe_dump(config | {"transfer": config["transfer"] | {"learning_rate": 1e-3}, "note": "edited"}))
    before = {p: p.read_bytes() for p in study.glob("seed-*/transfer/*/*/results.json")}
    result = grid(edited, timeout=120)
    assert result.returncode == 2
    assert "2 finished step(s) are stale: seed-0/transfer/en-ca/sparsity-0.80 (learning_rate: 0.002 when it ran, 0.001 now)" in result.stderr.strip().splitlines()[-1]
    assert {p: p.read_bytes() for p in before} == before
    # --rerun_stale, killed after the first re-run finished, then completed by a plain re-run.
    proc = subprocess.Popen([sys.executable, str(ROOT / "run_grid.py"), "--config", str(edited), "--rerun_stale"], cwd=ROOT,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    first = study / "seed-0" / "transfer" / "en-ca" / "sparsity-0.80" / "results.json"
    deadline = time.time() + 300
    while _learning_rate(first) != 1e-3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)  # the old result is moved aside first, then the re-run writes the new one
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _learning_rate(first) == 1e-3
    moved = list((study / "stale").glob("*/seed-*__transfer__en-ca__sparsity-0.80/results.json"))
    assert {m.read_bytes() for m in moved} == set(before.values())  # the old results moved aside, not lost
    result = grid(edited)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"ran 1 step\(s\), skipped 8", result.stdout), result.stdout[-2000:]
    for p in before:
        assert json.loads(p.read_text())["learning_rate"] == 1e-3
    nothing = grid(edited, "--rerun_stale", timeout=120)
    assert nothing.returncode == 0 and "no step is stale" in nothing.stdout and "ran 0 step(s), skipped 9" in nothing.stdout


def test_report_numbers_match_the_inputs(tmp_path):
    n = [10, 20, 10, 20]
    rows = [
        result_row("en", "ca", 0.9, [3, 6, 3, 6], n), result_row("en", "en", 0.9, [1, 2, 1, 2], n), result_row("en", "de", 0.9, [4, 8, 4, 8], n),
        result_row("de", "ca", 0.9, [3, 7, 4, 7], n), result_row("de", "en", 0.9, [5, 10, 5, 10], n), result_row("de", "de", 0.9, [2, 4, 2, 4], n),
        result_row("en", "ca", 0.9, [3, 7, 3, 7], n, seed=1), result_row("de", "ca", 0.9, [4, 7, 4, 7], n, seed=1),
    ]
    table, numbers = cer_table(rows, 0.9, ["en", "de"], ["ca", "en", "de"])
    lines = table.splitlines()
    assert lines[0] == "| upstream ticket \\ downstream | upstream model's own CER | ca | en | de | avg non-matching |"
    en_ca = Rates.from_seeds([([3, 6, 3, 6], n), ([3, 7, 3, 7], n)], [0, 1])  # 30% and 33.33%: pooled 31.67, sd 2.36
    ci = cell_interval(en_ca, "ca")
    assert lines[2].startswith(f"| **en** | – | **31.67 ± 2.36 [{100 * ci.low:.2f}, {100 * ci.high:.2f}]** | **10.00 [")
    assert numbers["cells"]["en->ca"] == pytest.approx(19 / 60)
    # A mean over languages pairs runs by seed: over the seeds all its cells have (seed 0 here, en->de and de->en ran once).
    assert numbers["avg_non_matching"]["en"] == pytest.approx((18 / 60 + 0.4) / 2)
    assert numbers["avg_non_matching"]["de"] == pytest.approx((21 / 60 + 0.5) / 2)
    paired, diffs = paired_table(rows, 0.9, ["en", "de"], ["ca", "en", "de"])
    de_ca = Rates.from_seeds([([3, 7, 4, 7], n), ([4, 7, 4, 7], n)], [0, 1])
    expected = difference_interval({"ca": de_ca}, {"ca": en_ca})
    assert diffs["de-en@ca"] == {"estimate": pytest.approx(expected.estimate), "low": expected.low, "high": expected.high, "p": expected.p_value, "marked": False}
    assert f"{100 * expected.estimate:+.2f} [{100 * expected.low:+.2f}, {100 * expected.high:+.2f}]" in paired
    # Like with like: the averages of en (over ca, de) and de (over ca, en) are compared over ca alone, the one language neither owns.
    assert {k: diffs["de-en@avg"][k] for k in ("estimate", "low", "high")} == {k: diffs["de-en@ca"][k] for k in ("estimate", "low", "high")}
    iou = {
        "labels": ["en", "de", "base"], "matrix": [[1, 0.8, 0.7], [0.8, 1, 0.6], [0.7, 0.6, 1]],
        "random_matrix": [[float("nan"), 0.05, 0.05], [0.05, float("nan"), 0.05], [0.05, 0.05, float("nan")]],
        "random_baseline": 0.05, "density": 0.1, "pairs": [], "layers": [
            {"a": "en", "b": "base", "group_kind": "layer", "group": "0", "iou": 0.7, "random_iou": 0.05},
            {"a": "de", "b": "base", "group_kind": "layer", "group": "0", "iou": 0.6, "random_iou": 0.05},
        ],
    }
    seeds = {"pairs": [
        {"a": "en@0", "b": "en@1", "iou": 0.5, "random_iou": 0.05}, {"a": "en@0", "b": "de@0", "iou": 0.4, "random_iou": 0.05},
        {"a": "en@1", "b": "de@1", "iou": 0.44, "random_iou": 0.05}, {"a": "de@0", "b": "de@1", "iou": 0.6, "random_iou": 0.05},
        {"a": "en@0", "b": "de@1", "iou": 0.3, "random_iou": 0.05},
    ], "layers": []}
    path = write_report(tmp_path, StudyResults(rows, {0.9: iou}, {0.9: seeds}, []), ["en", "de"], ["ca", "en", "de"], "Test study")
    text = path.read_text()
    assert "## Sparsity 90%" in text and lines[2] in text
    # diagonal 100; chance-corrected (0.8 - 0.05) / 0.95 = 78.95
    assert "| **en** | 100 | 80.00 (78.95) | 70.00 (68.42) |" in text and "5.00%" in text
    # noise floor: en across seeds 50, chance-corrected 47.37; en vs de within a seed: mean 42 over [40, 44]
    # en vs de of another seed: 30, chance-corrected (0.3 - 0.05) / 0.95 = 26.32
    assert "| **en** | 50.00 | 47.37 | 30.00 | 26.32 | 42.00 [40.00, 44.00] | 38.95 [36.84, 41.05] |" in text
    for png in ("cer_vs_sparsity.png", "iou_heatmap_0.90.png", "iou_layers_0.90.png"):
        assert (tmp_path / "figures" / png).read_bytes()[:4] == b"\x89PNG"


def test_report_refuses_runs_on_different_test_sets(tmp_path):
    rows = [result_row("en", "ca", 0.9, [3, 6], [10, 20]), result_row("de", "ca", 0.9, [3, 6, 1], [10, 20, 5])]
    with pytest.raises(ValueError, match="en->ca seed 0 was tested on other utterances than de->ca seed 0: expected the same ca test set"):
        cer_table(rows, 0.9, ["en", "de"], ["ca"])


def test_local_executor_runs_in_parallel_and_a_failure_stops_only_its_dependents(finished_study, corpus_dir, tmp_path):
    path, _, _ = finished_study
    data = tmp_path / "data"
    data.mkdir()
    for code in ("en", "ca"):
        (data / code).symlink_to(corpus_dir / code)  # no de/: the German fine-tune fails
    config = write_study(tmp_path, "parallel.yaml", upstream=["en", "de"], seeds=[0], data={"data_dir": str(data / "{language}")})
    study = tmp_path / "study"
    result = grid(config, "--slots", "2")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "1 step(s) failed and 3 step(s) that need them did not run" in result.stderr
    assert f"seed-0/finetune/de: exit 2, log {study / 'logs' / 'seed-0__finetune__de.log'}" in result.stderr
    for blocked in ("seed-0/prune/de/sparsity-0.80", "seed-0/transfer/de-ca/sparsity-0.80", "seed-0/iou/sparsity-0.80"):
        assert re.search(rf"{re.escape(blocked)} not run: it needs seed-0/finetune/de, which failed", result.stdout), result.stdout
    records = {r["id"]: r for r in (json.loads(p.read_text()) for p in (study / "steps").glob("*.json"))}
    done = {k: r for k, r in records.items() if r["status"] == "done"}
    assert set(done) == {"seed-0/base-model", "seed-0/finetune/en", "seed-0/prune/base/sparsity-0.80", "seed-0/prune/en/sparsity-0.80",
                         "seed-0/transfer/en-ca/sparsity-0.80"}
    for record in done.values():  # nothing started before the steps it needs had finished
        assert all(record["started"] >= records[n]["finished"] for n in record["needs"]), record["id"]
    spans = sorted((r["started"], r["finished"]) for r in records.values() if "finished" in r)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:])), spans  # two slots: independent steps overlapped
    status = grid(config, "--status", timeout=120)
    states = dict(re.findall(r"^(seed-0/\S+)\s+(\w+)", status.stdout, re.M))
    assert states["seed-0/finetune/de"] == "failed" and states["seed-0/transfer/en-ca/sparsity-0.80"] == "done"
    assert states["seed-0/iou/sparsity-0.80"] == "blocked" and "5 done, 1 failed, 3 blocked" in status.stdout
    assert re.search(r"^seed-0/iou/sparsity-0.80\s+blocked\s.*\(seed-0/finetune/de failed\)$", status.stdout, re.M), status.stdout
    report = (study / "REPORT.md").read_text()  # written although steps failed, naming what is missing
    assert "- `seed-0/transfer/de-ca/sparsity-0.80`: not run: it depends on seed-0/finetune/de, which failed" in report
    # Same settings, same numbers as the sequential run of the first study (seed 0, en -> ca).
    first = path.parent / "study"  # its en -> ca run with these settings (the stale test may have moved it aside)
    candidates = [first / "seed-0" / "transfer" / "en-ca" / "sparsity-0.80", *first.glob("stale/*/seed-0__transfer__en-ca__sparsity-0.80")]
    sequential = next(c for c in candidates if json.loads((c / "results.json").read_text())["learning_rate"] == 2e-3)
    parallel = study / "seed-0" / "transfer" / "en-ca" / "sparsity-0.80"
    assert (parallel / "predictions_test.jsonl").read_bytes() == (sequential / "predictions_test.jsonl").read_bytes()
    assert json.loads((parallel / "results.json").read_text())["test_cer"] == json.loads((sequential / "results.json").read_text())["test_cer"]
    # With German data, a re-run resubmits only what failed or never ran.
    (data / "de").symlink_to(corpus_dir / "en")
    result = grid(config, "--slots", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ran 4 step(s), skipped 5" in result.stdout and (study / "REPORT.md").is_file()


FAKE_SBATCH = """#!/bin/sh
# Stand-in for Slurm's sbatch: keeps the script, answers as sbatch does, runs nothing.
n=$(cat "$FAKE_SLURM_COUNTER" 2>/dev/null || echo 1000); n=$((n+1)); echo $n > "$FAKE_SLURM_COUNTER"
echo "Submitted batch job $n"
"""


def test_slurm_submission_writes_the_resources_and_dependencies(tmp_path, corpus_dir):
    """GPU, cluster-name and multi-node options, which the single-node Slurm of tests/test_slurm.py
    cannot take: checked on the scripts a stand-in sbatch keeps."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    resources = {"finetune": {"gpus": 4, "cpus": 16, "mem_gb": 64, "time_min": 600}, "transfer": {"gpus": 2, "cpus": 8, "mem_gb": 32, "time_min": 120, "nodes": 2},
                 "prune": {"cpus": 4, "mem_gb": 16, "time_min": 30}}
    slurm = {"partition": "gpu", "account": "speech", "qos": "normal", "constraint": "a100", "additional": {"mail-type": "FAIL"}}
    config = write_study(tmp_path, seeds=[0], launcher="accelerate launch", resources=resources, slurm=slurm, data={"data_dir": str(corpus_dir / "{language}")})
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_SLURM_COUNTER=str(tmp_path / "counter"), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, str(ROOT / "run_grid.py"), "--config", str(config), "--executor", "slurm"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = plan(load_config(str(config)))
    job_of = dict(re.findall(r"^  (\S+): job (\d+)", result.stdout, re.M))
    assert list(job_of) == [s.id for s in steps]
    study = tmp_path / "study"

    def sbatch(job):
        lines = (study / "submitit" / job / f"{job}_submission.sh").read_text().splitlines()
        return {k: v for k, _, v in (line.removeprefix("#SBATCH --").partition("=") for line in lines if line.startswith("#SBATCH --"))}  # --requeue: ""

    for step in steps:
        options = sbatch(job_of[step.id])
        expected_after = sorted(job_of[n] for n in step.needs)
        assert sorted(options.get("dependency", "afterok:").removeprefix("afterok:").split(":")) == sorted(expected_after or [""]), step.id
        assert (options["partition"], options["account"], options["qos"], options["constraint"], options["mail-type"]) == ("gpu", "speech", "normal", "a100", "FAIL")
        want = resources.get(step.kind, {})
        assert options.get("gpus-per-node") == (str(want["gpus"]) if want.get("gpus") else None), step.id
        assert options["cpus-per-task"] == str(want.get("cpus", 1)) and options["mem"] == f"{want.get('mem_gb', 16)}GB" and options["time"] == str(want.get("time_min", 120))
        assert options["nodes"] == str(want.get("nodes", 1)) and options["ntasks-per-node"] == "1"
        assert (options["signal"], options["kill-on-invalid-dep"], "requeue" in options) == ("USR1@120", "yes", True)
    transfer = next(s for s in steps if s.kind == "transfer")
    assert transfer.argv[:7] == ["accelerate", "launch", "--num_processes", "4", "--num_machines", "2", "--multi_gpu"]
    report = re.search(r"and the report \(job (\d+), after them", result.stdout).group(1)
    assert sorted(sbatch(report)["dependency"].removeprefix("afterany:").split(":")) == sorted(job_of.values())  # whatever happened
    status = subprocess.run([sys.executable, str(ROOT / "run_grid.py"), "--config", str(config), "--status"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert "seed-0/finetune/en" in status.stdout and re.search(rf"seed-0/finetune/en\s+queued\s+{job_of['seed-0/finetune/en']}", status.stdout)
    # Without sbatch: refused before anything is written.
    (tmp_path / "empty").mkdir()
    plain = dict(env, PATH=str(tmp_path / "empty"))  # no sbatch on it (this machine may have Slurm in /usr/bin)
    other = write_study(tmp_path, "other.yaml", output_dir=str(tmp_path / "other"))
    result = subprocess.run([sys.executable, str(ROOT / "run_grid.py"), "--config", str(other), "--executor", "slurm"], cwd=ROOT, env=plain,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "needs Slurm's sbatch" in result.stderr.strip().splitlines()[-1] and not (tmp_path / "other").exists()


def test_a_failed_job_raises_and_its_command_starts_with_sigusr1_ignored(tmp_path):
    """A step's job ends with its outcome (a scheduler must see a failure); the command inherits
    SIGUSR1 ignored, so a launcher survives the time-limit signal its training processes act on."""
    from utils.executors import JobFailed, JobSpec, run_job
    from utils.records import StepRecord

    probe = "import signal, sys; print(signal.getsignal(signal.SIGUSR1)); sys.exit(int(sys.argv[1]))"

    def spec(code: int) -> JobSpec:
        base = StepRecord(id=f"probe-{code}", kind="iou", command="", settings={}, identity={}, needs=[])
        return JobSpec(id=base.id, argv=[sys.executable, "-c", probe, str(code)], launch_len=1, done=str(tmp_path / "done"),
                       record=str(tmp_path / f"{code}.json"), log=str(tmp_path / f"{code}.log"), record_base=base)

    (tmp_path / "done").touch()
    assert run_job(spec(0)).status == "done"
    assert (tmp_path / "0.log").read_text().strip() == str(int(signal.SIG_IGN))  # signal.getsignal gives SIG_IGN, printed as 1
    with pytest.raises(JobFailed, match=r"step probe-3: failed \(exit 3\)"):
        run_job(spec(3))
    assert json.loads((tmp_path / "3.json").read_text())["status"] == "failed"


def test_multinode_command_and_bad_resources(tmp_path):
    from utils.executors import Resources, launch_command, parse_resources

    launch = launch_command("accelerate launch", Resources(gpus=4, nodes=2))
    assert launch == ["accelerate", "launch", "--num_processes", "8", "--num_machines", "2", "--multi_gpu"]
    probe = ("import json, submitit; from utils.executors import node_command; "
             "print(json.dumps(node_command(['accelerate', 'launch', '--num_processes', '8', 'run_transfer.py', '--x'], 4, submitit.JobEnvironment())))")
    env = dict(os.environ, PYTHONPATH=str(ROOT), SUBMITIT_EXECUTOR="slurm", SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu[07-08]", SLURM_NODEID="1",
               SLURM_PROCID="1", SLURM_NTASKS="2", SLURM_JOB_NUM_NODES="2", SLURM_LOCALID="0")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert json.loads(out.stdout) == ["accelerate", "launch", "--num_processes", "8", "--machine_rank", "1", "--main_process_ip", "gpu07",
                                      "--main_process_port", str(29500 + 4242), "run_transfer.py", "--x"], out.stderr
    cases = [({"finetune": {"gpus": -1}}, "resources.finetune.gpus -1: expected a non-negative integer"),
             ({"finetune": {"gpus": 1.5}}, "resources.finetune.gpus 1.5: expected a non-negative integer"),
             ({"transfer": {"cpus": 0}}, "resources.transfer.cpus 0: expected a positive integer"),
             ({"prune": {"gpus": 2}}, "resources.prune: several GPUs or nodes only help training steps"),
             ({"decode": {"gpus": 1}}, "resources.decode: unknown step kind"),
             ({"finetune": {"gpu": 1}}, "resources.finetune has unknown key(s) ['gpu']")]
    for resources, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            parse_resources(resources)
    with pytest.raises(ValueError, match="need launcher: accelerate launch"):
        load_config(str(write_study(tmp_path, resources={"finetune": {"gpus": 2}})))
    env = dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    for flags, config, message in ((["--executor", "pbs"], write_study(tmp_path), "invalid choice: 'pbs'"),
                                   ([], write_study(tmp_path, "gpu.yaml", resources={"finetune": {"gpus": 1}}), "asks for 1 GPU(s) on 1 node(s) but this machine has 0 GPU(s)"),
                                   (["--slots", "0"], write_study(tmp_path), "--slots 0: expected a positive number")):
        result = subprocess.run([sys.executable, str(ROOT / "run_grid.py"), "--config", str(config), *flags], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and message in result.stderr.strip().splitlines()[-1], result.stderr[-1000:]
    assert not (tmp_path / "study").exists()
