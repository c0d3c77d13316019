"""The grid's ``methods`` axis: one-shot, IMP and PARP tickets of the same languages in one study,
planned with identities that make exactly a method's steps stale when its settings change, run end
to end, and reported with numbers checked against the results and IoU files."""

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import grid, study_config
from utils.errors import UsageError
from utils.grid import load_config, plan
from utils.masks import Mask

METHODS = ["oneshot", "imp", "parp"]


def methods_config(tmp_path, **overrides):
    return study_config(tmp_path, **({"seeds": [0], "methods": METHODS, "imp": {"rounds": 1}, "parp": {"reprune_steps": 3}} | overrides))


def write(tmp_path, name="study.yaml", **overrides):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(methods_config(tmp_path, **overrides), sort_keys=False))
    return path


def test_each_method_plans_its_tickets_transfers_and_the_methods_iou(tmp_path):
    steps = {st.id: st for st in plan(load_config(str(write(tmp_path))))}
    imp, parp = steps["seed-0/tickets-imp/en"], steps["seed-0/tickets-parp/en/sparsity-0.80"]
    assert (imp.kind, imp.method, parp.kind, parp.method) == ("imp", "imp", "parp", "parp")
    assert imp.argv[1].endswith("run_imp.py") and imp.settings["sparsity"] == [0.8] and imp.settings["rounds"] == 1
    assert parp.argv[1].endswith("run_finetune.py") and parp.settings["parp_sparsity"] == 0.8 and parp.settings["reprune_steps"] == 3
    assert imp.settings["num_train_epochs"] == parp.settings["num_train_epochs"] == steps["seed-0/finetune/en"].settings["num_train_epochs"]
    assert steps["seed-0/transfer-imp/en-ca/sparsity-0.80"].needs == [imp.id]
    assert steps["seed-0/transfer-parp/en-ca/sparsity-0.80"].needs == [parp.id]
    assert steps["seed-0/transfer-imp/en-ca/sparsity-0.80"].settings["tickets_dir"].endswith("seed-0/tickets-imp")
    masks = steps["seed-0/iou-methods/sparsity-0.80"].settings["masks"]
    assert [m.split("=")[0] for m in masks] == ["oneshot:en", "imp:en", "parp:en"]
    # The one-shot steps are those of a study without the axis, identity for identity.
    plain = {st.id: st.digest for st in plan(load_config(str(write(tmp_path, "plain.yaml", methods=["oneshot"]))))}
    assert all(steps[i].digest == d for i, d in plain.items())


def test_a_method_setting_makes_exactly_its_steps_stale(tmp_path):
    before = {st.id: st.digest for st in plan(load_config(str(write(tmp_path))))}
    after = {st.id: st.digest for st in plan(load_config(str(write(tmp_path, "edited.yaml", imp={"rounds": 2}))))}
    changed = sorted(i for i in before if before[i] != after[i])
    assert changed == ["seed-0/iou-methods/sparsity-0.80", "seed-0/tickets-imp/en", "seed-0/transfer-imp/en-ca/sparsity-0.80"]
    after = {st.id: st.digest for st in plan(load_config(str(write(tmp_path, "edited2.yaml", parp={"reprune_steps": 4}))))}
    assert sorted(i for i in before if before[i] != after[i]) == [
        "seed-0/iou-methods/sparsity-0.80", "seed-0/tickets-parp/en/sparsity-0.80", "seed-0/transfer-parp/en-ca/sparsity-0.80"]


@pytest.mark.parametrize("overrides, expected", [
    ({"methods": ["oneshot", "lottery"]}, "grid config methods has unknown method 'lottery': expected some of oneshot, imp, parp"),
    ({"methods": ["imp", "parp"]}, "expected each method once, oneshot among them"),
    ({"imp": {"rounds": 1, "sparsity": [0.5]}}, "grid config imp.sparsity: the study's sparsities are every method's"),
    ({"imp": {"rounds": 1, "rewind": 3}}, "grid config section 'imp' has unknown flag(s) ['rewind']"),
])
def test_bad_methods_config_is_one_line_before_any_work(overrides, expected, tmp_path):
    path = write(tmp_path, **overrides)
    result = grid(path, "--dry_run", timeout=120)
    assert result.returncode == 2 and expected in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert not Path(methods_config(tmp_path)["output_dir"]).exists()
    if "lottery" in expected:
        with pytest.raises(UsageError):
            load_config(str(path))


@pytest.fixture(scope="module")
def methods_study(corpus_dir, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("methods")
    path = write(tmp_path, data={"data_dir": str(corpus_dir / "{language}")})
    result = grid(path, "--slots", "2", timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return path, Path(methods_config(tmp_path)["output_dir"])


def test_every_method_makes_a_ticket_that_transfers(methods_study):
    _, out = methods_study
    for method, ticket in (("oneshot", "tickets"), ("imp", "tickets-imp"), ("parp", "tickets-parp")):
        info = Mask.load(out / f"seed-0/{ticket}/en/sparsity-0.80").metadata
        assert info["method"] == {"oneshot": "magnitude"}.get(method, method)
        assert info["total"] - info["kept_total"] == round(0.8 * info["total"])
        result = json.loads((out / f"seed-0/{ticket.replace('tickets', 'transfer')}/en-ca/sparsity-0.80/results.json").read_text())
        assert result["ticket_mask_sha256"] == info["sha256"] and result["mask_held"] and result["prune_method"] == info["method"]


def test_the_methods_report_matches_the_files(methods_study):
    from utils.grid import collect
    from utils.report import methods_iou_tables, methods_transfer_table

    path, out = methods_study
    config = load_config(str(path))
    results = collect(config, plan(config))
    _, numbers = methods_transfer_table(results.method_rows, 0.8, ["en"], ["ca"])
    for method, folder in (("oneshot", "transfer"), ("imp", "transfer-imp"), ("parp", "transfer-parp")):
        rows = [json.loads(line) for line in (out / f"seed-0/{folder}/en-ca/sparsity-0.80/predictions_test.jsonl").read_text().splitlines()]
        cer = sum(r["char_edits"] for r in rows) / sum(r["ref_chars"] for r in rows)
        assert numbers["cer"][method]["en->ca"] == pytest.approx(cer)
        if method != "oneshot":
            assert numbers["family"][f"{method}-oneshot:en->ca"]["estimate"] == pytest.approx(cer - numbers["cer"]["oneshot"]["en->ca"])
    report = (out / "REPORT.md").read_text()
    assert "## Ticket-finding methods at 80% sparsity" in report
    assert f"{100 * numbers['cer']['imp']['en->ca']:.2f}" in report
    # Every method's runs in results.csv, and IMP's rounds from their records.
    import csv

    with open(out / "results.csv", encoding="utf-8") as f:
        assert sorted(r["prune_method"] for r in csv.DictReader(f)) == ["imp", "magnitude", "parp"]
    for r in (0, 1):
        record = json.loads((out / f"seed-0/tickets-imp/en/round-{r}/round.json").read_text())
        assert f"| **en** | {r} | {100 * record['sparsity']:.1f} | {100 * record['eval_cer']:.2f} | {100 * record['test_cer']:.2f} | 1 |" in report
    # IoU between methods, from the masks themselves (numpy).
    bits = {m: Mask.load(out / f"seed-0/{t}/en/sparsity-0.80") for m, t in (("oneshot", "tickets"), ("imp", "tickets-imp"), ("parp", "tickets-parp"))}
    flat = {m: np.concatenate([np.unpackbits(mask.packed(n), count=mask.sizes[n], bitorder="little") for n in sorted(mask.slices)]).astype(bool)
            for m, mask in bits.items()}
    _, _, iou_numbers = methods_iou_tables(results.method_ious[0.8], METHODS)
    expected = defaultdict(list)
    for a, b in (("oneshot", "imp"), ("oneshot", "parp"), ("imp", "parp")):
        expected[f"en:{a}-{b}"] = [float((flat[a] & flat[b]).sum() / (flat[a] | flat[b]).sum())]
        assert iou_numbers["agreement"][f"en:{a}-{b}"] == pytest.approx(expected[f"en:{a}-{b}"])
    base = Mask.load(out / "seed-0/tickets/base/sparsity-0.80")
    base_flat = np.concatenate([np.unpackbits(base.packed(n), count=base.sizes[n], bitorder="little") for n in sorted(base.slices)]).astype(bool)
    for m in METHODS:
        assert iou_numbers["vs_base"][m] == pytest.approx([float((flat[m] & base_flat).sum() / (flat[m] | base_flat).sum())])


def test_the_footprint_counts_every_imp_round_and_parp_ticket(methods_study):
    """What --dry_run's footprint says IMP and PARP steps keep is within 10% of what they hold
    (each file once: IMP's tickets are hard links to its rounds' files)."""
    from utils.footprint import model_size, study_footprint

    path, _ = methods_study
    config = load_config(str(path))
    steps = plan(config)
    estimate = {row.kind: row.kept for row in study_footprint(config, steps, model_size)}
    for kind in ("imp", "parp"):
        files = {(p.stat().st_dev, p.stat().st_ino): p.stat().st_size for st in steps if st.kind == kind for p in st.output.rglob("*") if p.is_file()}
        measured = sum(files.values())
        assert abs(estimate[kind] - measured) <= 0.1 * measured, (kind, estimate[kind], measured)
