"""Studies with several self-supervised bases: config checks, the comparison's numbers against
hand-computed values, and a two-base mini study through run_grid.py (run_pretrain.py per base)."""

import csv
import json
import re
from statistics import stdev

import pytest
import yaml

from tests.conftest import TINY_CONFIG, grid, result_row, write_study
from utils.bases import advantage_pairs, compare_bases
from utils.records import StudyResults
from utils.grid import load_config, plan

SSL = {"num_train_epochs": 1, "per_device_train_batch_size": 8, "learning_rate": 1e-3, "mask_time_prob": 0.5, "mask_time_length": 5,
       "use_cpu": True, "disable_tqdm": True}
BASES = {"imbalanced": {"mixture": {"en": 0.75, "de": 0.25}}, "balanced": {"mixture": {"en": 0.5, "de": 0.5}}}


def test_bad_bases_are_refused_before_any_work(tmp_path):
    from run_grid import check_flags

    cases = [
        ({"bases": {"a": {"mixture": {"en": 0.7, "de": 0.2}}}}, "base 'a': mixture shares {'en': 0.7, 'de': 0.2} sum to 0.9: expected them to sum to 1"),
        ({"bases": {"a": {"mixture": {"en": 1.2, "de": -0.2}}}}, "base 'a': mixture share de=-0.2: expected a number >= 0"),
        ({"bases": {"a": {"mixture": {"en": 0.5, "qq": 0.5}}}}, "unknown language 'qq'"),
        ({"bases": {"a": {"mix": {"en": 1.0}}}}, "base 'a': expected a mapping with a mixture"),
        ({"bases": {"a b": {"mixture": {"en": 1.0}}}}, "base name 'a b'"),
        ({"bases": BASES, "ctc_pretrain": {"mixture": {"en": 1.0}}, "data": {"dataset_name": "generated"}}, "gives both 'ctc_pretrain' and 'bases'"),
        ({"bases": BASES, "dominant": "de"}, "dominant language 'de' is not an upstream language ['en']"),
        ({"ssl_pretrain": {"total_clips": 10}}, "grid config bases {}: expected a mapping"),
        ({"bases": BASES, "upstream": ["en", "de"], "ssl_pretrain": {"total_clip": 10}}, "section 'ssl_pretrain' has unknown flag(s) ['total_clip']"),
        ({"bases": {"a": {"mixture": {"en": 1.0}, "learning_rat": 1.0}}}, "section 'bases.a' has unknown flag(s) ['learning_rat']"),
        ({"bases": {"a": {"mixture": {"en": 1.0}, "model": "org/x"}}}, "base 'a': expected a mapping with a mixture to pretrain on"),
        ({"bases": {"a": {"model": "org/x", "learning_rate": 1.0}}}, "a base that starts from a model takes only model: ORG/NAME"),
        ({"bases": {"a": {"model": "org/x"}, "b": {"model": "org/y"}}}, "grid config bases all start from models: expected dominant"),
    ]
    for overrides, message in cases:
        with pytest.raises(ValueError) as err:
            check_flags(load_config(str(write_study(tmp_path, **overrides))))
        assert message in str(err.value)


def test_plan_runs_the_whole_study_per_base_from_shared_initial_weights(tmp_path):
    config = load_config(str(write_study(tmp_path, bases=BASES, upstream=["en", "de"], ssl_pretrain={"total_clips": 80, **SSL})))
    steps = plan(config)
    ids = [s.id for s in steps]
    assert config.dominant == "en"  # the largest share in any mixture
    assert not any("base-model" in i for i in ids)  # run_pretrain.py draws the initial weights from the seed: the same for every base
    for name in BASES:
        pretrain = steps[ids.index(f"base-{name}/seed-0/pretrain")]
        assert pretrain.argv[1].endswith("run_pretrain.py") and pretrain.needs == [] and pretrain.settings["seed"] == 0
        assert pretrain.settings["model_name_or_path"] == str(TINY_CONFIG)
        assert pretrain.settings["mixture"] == [f"{c}={w}" for c, w in BASES[name]["mixture"].items()]
        finetune = steps[ids.index(f"base-{name}/seed-0/finetune/de")]
        assert finetune.settings["model_name_or_path"] == pretrain.settings["output_dir"] == str(tmp_path / "study" / f"base-{name}" / "seed-0" / "pretrain")
        assert f"base-{name}/iou-seeds/sparsity-0.80" in ids
    assert len(ids) == 2 * (2 * (1 + 2 + 3 + 2 + 1) + 1)
    assert advantage_pairs(["en", "de", "es"], ["ca", "de", "en"], "en") == [("de", "ca"), ("es", "ca"), ("es", "de")]


def test_plan_starts_each_model_base_from_its_own_model(tmp_path):
    models = {"w2v": {"model": str(TINY_CONFIG)}, "bert": {"model": str(TINY_CONFIG.parent / "tiny-w2v-bert")}, "hub": {"model": "org/published"}}
    path = write_study(tmp_path, bases=models, upstream=["en", "de"], dominant="en")
    path.write_text(yaml.safe_dump({k: v for k, v in yaml.safe_load(path.read_text()).items() if k != "model"}))  # every base names its own model
    config = load_config(str(path))
    steps = plan(config)
    ids = [s.id for s in steps]
    for name in ("w2v", "bert"):  # config directories: a seeded initialisation step per base, which fine-tuning and the base ticket start from
        init = steps[ids.index(f"base-{name}/seed-0/base-model")]
        assert init.settings["init_from_config"] == models[name]["model"] and init.needs == []
        finetune = steps[ids.index(f"base-{name}/seed-0/finetune/en")]
        assert finetune.settings["model_name_or_path"] == init.settings["output_dir"] and finetune.needs == [init.id]
    finetune = steps[ids.index("base-hub/seed-0/finetune/en")]
    assert finetune.settings["model_name_or_path"] == "org/published" and finetune.needs == []
    assert steps[ids.index("base-hub/seed-0/prune/base/sparsity-0.80")].settings["model_name_or_path"] == "org/published"
    assert not any(s.kind == "pretrain" for s in steps)


def _iou(labels, values):
    n = len(labels)
    matrix = [[1.0 if i == j else values.get(frozenset((labels[i], labels[j])), 0.0) for j in range(n)] for i in range(n)]
    return {"labels": labels, "matrix": matrix, "random_matrix": [[0.1] * n for _ in range(n)]}


def test_comparison_matches_hand_computed_values():
    n = [10, 20, 10, 20]  # 60 reference characters; CER = edits / 60
    a = [result_row("en", "ca", 0.8, [3, 6, 3, 6], n), result_row("de", "ca", 0.8, [6, 12, 6, 12], n), result_row("es", "ca", 0.8, [3, 9, 3, 9], n),
         result_row("en", "ca", 0.8, [3, 3, 3, 3], n, seed=1), result_row("de", "ca", 0.8, [6, 6, 6, 6], n, seed=1), result_row("es", "ca", 0.8, [6, 6, 6, 6], n, seed=1)]
    b = [result_row("en", "ca", 0.8, [3, 6, 3, 6], n), result_row("de", "ca", 0.8, [3, 6, 3, 6], n), result_row("es", "ca", 0.8, [6, 6, 6, 6], n),
         result_row("en", "ca", 0.8, [6, 6, 6, 6], n, seed=1), result_row("de", "ca", 0.8, [3, 6, 3, 6], n, seed=1), result_row("es", "ca", 0.8, [3, 6, 3, 6], n, seed=1)]
    labels = ["en", "de", "es", "base"]
    ious = {0.8: {"per_seed": [_iou(labels, {frozenset(("en", "base")): 0.5}), _iou(labels, {frozenset(("en", "base")): 0.7})]}}
    seed_iou = {"pairs": [{"a": "en@0", "b": "en@1", "iou": 0.3, "random_iou": 0.1}], "layers": []}
    text, numbers = compare_bases({"A": StudyResults(a, ious, {0.8: seed_iou}, []), "B": StudyResults(b, {}, {}, [])}, 0.8, ["en", "de", "es"], ["ca"], "en")
    # Base A: seed 0 en .30 de .60 es .40 -> advantage mean(.30, .10) = .20; seed 1 en .20 de .40 es .40 -> .20; pooled en .25 de .50 es .40 -> .20.
    # Base B: seed 0 en .30 de .30 es .40 -> .05; seed 1 en .40 de .30 es .30 -> -.10; pooled en .35 de .30 es .35 -> -.025.
    adv = numbers["advantage"]
    assert adv["A"]["estimate"] == pytest.approx(0.20) and adv["A"]["per_seed"] == pytest.approx({0: 0.20, 1: 0.20})
    assert adv["B"]["estimate"] == pytest.approx(-0.025) and adv["B"]["per_seed"] == pytest.approx({0: 0.05, 1: -0.10})
    diff = numbers["advantage_vs_reference"]["B"]
    assert diff["estimate"] == pytest.approx(-0.225) and diff["per_seed"] == pytest.approx({0: -0.15, 1: -0.30})
    for ci in (adv["A"], adv["B"], diff):
        assert ci["low"] < ci["estimate"] < ci["high"]
    assert f"| B − A | -22.50 [{100 * diff['low']:+.2f}, {100 * diff['high']:+.2f}]" in text and f"| -15.00, -30.00 | {100 * stdev([-0.15, -0.30]):.2f} |" in text
    # avg non-matching: de's only non-matching downstream is ca: pooled .50 in A; per seed .60, .40.
    assert numbers["avg_non_matching"]["A/de"]["estimate"] == pytest.approx(0.5) and numbers["avg_non_matching"]["A/de"]["per_seed"] == pytest.approx([0.6, 0.4])
    # IoU with the base pruned the same way: seeds .5 and .7; chance-corrected (x - .1) / .9; noise floor .3.
    assert numbers["iou_vs_base"]["A/en"] == {"mean": pytest.approx(0.6), "per_seed": [0.5, 0.7], "seed_to_seed": [0.3]}
    assert f"60.00 [50.00, 70.00] ({100 * (0.6 - 0.1) / 0.9:.2f}) | 30.00 |" in text


@pytest.fixture(scope="module")
def two_base_study(corpus_dir, tmp_path_factory):
    """Two SSL bases (English-heavy, balanced) through the whole grid: one seed, en and de upstream, ca downstream."""
    from utils.corpus import generate_corpus

    tmp = tmp_path_factory.mktemp("bases")
    data = tmp / "data"
    data.mkdir()
    for code in ("en", "ca"):
        (data / code).symlink_to(corpus_dir / code)
    generate_corpus(str(data), ["de"], num_train=240, num_eval=24, vocab_size=60)
    path = write_study(tmp, bases=BASES, upstream=["en", "de"], seeds=[0], data={"data_dir": str(data / "{language}")},
                       ssl_pretrain={"total_clips": 80, "eval_clips": 8, **SSL},
                       resources={kind: {"cpus": 1} for kind in ("init", "pretrain", "finetune", "prune", "transfer", "iou")})
    result = grid(path, "--slots", "2", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "study", result


def test_two_base_study_report_matches_its_results_files(two_base_study):
    study, result = two_base_study
    assert re.search(r"ran 18 step\(s\), skipped 0", result.stdout), result.stdout[-2000:]
    cer, mixtures = {}, {}
    for name in BASES:
        root = study / f"base-{name}"
        mixtures[name] = json.loads((root / "seed-0" / "pretrain" / "mixture.json").read_text())
        for up in ("en", "de"):
            cer[(name, up)] = json.loads((root / "seed-0" / "transfer" / f"{up}-ca" / "sparsity-0.80" / "results.json").read_text())["test_cer"]
        assert (root / "REPORT.md").is_file()
    # The English-heavy base drew 60 English and 20 German clips, the balanced one 40 and 40.
    assert {n: {code: m["drawn"]["train"][code]["clips"] for code in ("en", "de")} for n, m in mixtures.items()} == {"imbalanced": {"en": 60, "de": 20}, "balanced": {"en": 40, "de": 40}}
    report = (study / "REPORT.md").read_text()
    # By hand from results.json: advantage = CER(de -> ca) - CER(en -> ca), and balanced minus imbalanced.
    advantage = {name: cer[(name, "de")] - cer[(name, "en")] for name in BASES}
    for name in BASES:
        assert f"| **{name}** | {100 * advantage[name]:+.2f} [" in report
    assert f"| balanced − imbalanced | {100 * (advantage['balanced'] - advantage['imbalanced']):+.2f} [" in report
    for name in BASES:  # avg non-matching CER of the en ticket is its ca CER (one seed: no spread)
        assert re.search(rf"\| \*\*en\*\* \(dominant\) \|.*{100 * cer[(name, 'en')]:.2f} \[", report)
        iou = json.loads((study / f"base-{name}" / "seed-0" / "iou" / "sparsity-0.80" / "iou.json").read_text())
        value = iou["matrix"][iou["labels"].index("de")][iou["labels"].index("base")]
        assert re.search(rf"\| \*\*de\*\* \|.*{100 * value:.2f} \(", report)
    with open(study / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(r["base"], r["upstream"], float(r["test_cer"])) for r in rows} == {(n, u, c) for (n, u), c in cer.items()}
    assert (study / "figures" / "advantage_0.80.png").stat().st_size > 0
