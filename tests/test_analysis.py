"""What the language-specific weights do (run_analysis.py and its modules): the ablation zeroes
exactly the weights one ticket keeps and another prunes, and its control as many kept weights per
tensor; linear CKA against an independent (Gram-matrix) formula; probes find a planted signal and
give chance on shuffled labels; phone timings fit the generated audio; typological distances read
offline with a permutation test checked by hand; and the whole recipe on a real transfer, where
zeroing nothing reproduces the transfer's own predictions byte for byte."""

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from tests.conftest import TINY_CONFIG, run_in_process
from utils.ablation import check_comparable, groups, only_in, random_like, restricted, zeroed
from utils.analysis import ablation_cells, ablation_markdown
from utils.errors import MissingInput, UsageError
from utils.masks import Mask
from utils.probes import accuracy_interval, probe_accuracies
from utils.representations import check_layers, linear_cka
from utils.typology import distance_matrix, language_pairs, permutation_correlation

TRAIN = ["--use_cpu", "True", "--per_device_train_batch_size", "8", "--learning_rate", "2e-3", "--adam_beta2", "0.98", "--warmup_steps", "5",
         "--freeze_feature_encoder", "False", "--disable_tqdm", "True", "--seed", "3", "--report_to", "none"]


# ---------------------------------------------------------------------------------------------
# Ablation sets


def random_keeps(seed: int, density: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    names = ["wav2vec2.encoder.layers.0.attention.q_proj.weight", "wav2vec2.encoder.layers.1.feed_forward.output_dense.weight"]
    return {name: torch.rand((16, 24), generator=g) < density for name in names}


def test_the_zeroed_set_is_exactly_kept_by_a_and_pruned_by_b_and_the_control_matches_it_per_tensor():
    a, b = random_keeps(0, 0.3), random_keeps(1, 0.3)
    chosen = only_in(a, b)
    for name in a:
        expected = np.logical_and(a[name].numpy(), np.logical_not(b[name].numpy()))
        assert np.array_equal(chosen[name].numpy(), expected)
    for seed in range(5):
        control = random_like(a, chosen, seed)
        for name in a:
            assert int(control[name].sum()) == int(chosen[name].sum())  # as many per tensor
            assert not (control[name] & ~a[name]).any()  # never a weight the ticket prunes
    assert not all(torch.equal(random_like(a, chosen, 0)[n], random_like(a, chosen, 1)[n]) for n in a)  # draws differ
    by_group = groups(chosen)
    assert set(by_group) == {"layer 0", "layer 1", "q", "ffn_out"}
    only_layer0 = restricted(chosen, by_group["layer 0"])
    assert torch.equal(only_layer0["wav2vec2.encoder.layers.0.attention.q_proj.weight"], chosen["wav2vec2.encoder.layers.0.attention.q_proj.weight"])
    assert not only_layer0["wav2vec2.encoder.layers.1.feed_forward.output_dense.weight"].any()


def test_zeroed_restores_the_weights_after_the_block():
    layer = torch.nn.Linear(24, 16)
    layer.weight.data.normal_()
    before = layer.weight.detach().clone()
    chosen = {"weight": torch.rand(16, 24) < 0.5}
    with zeroed(layer, chosen):
        assert torch.all(layer.weight[chosen["weight"]] == 0) and torch.equal(layer.weight[~chosen["weight"]], before[~chosen["weight"]])
    assert torch.equal(layer.weight, before)
    with pytest.raises(UsageError, match="the mask names 'bias.x', which the model lacks"):
        with zeroed(layer, {"bias.x": torch.ones(16, dtype=torch.bool)}):
            pass


def fake_mask(sparsity: float, model_type: str = "wav2vec2", shapes=None) -> Mask:
    shapes = shapes or {"w": [4, 4]}
    return Mask(np.zeros(1, np.uint64), {n: slice(0, 1) for n in shapes}, {"sparsity": sparsity, "model_type": model_type, "shapes": shapes}, f"{model_type}@{sparsity}")


def test_masks_of_other_sparsities_families_or_tensors_are_refused_in_one_line():
    with pytest.raises(UsageError, match=r"sparsity 0\.80\).*sparsity 0\.90\): expected tickets of the same sparsity"):
        check_comparable(fake_mask(0.8), fake_mask(0.9))
    with pytest.raises(UsageError, match="come from different model families"):
        check_comparable(fake_mask(0.8), fake_mask(0.8, "hubert"))
    with pytest.raises(UsageError, match="differ in their tensors"):
        check_comparable(fake_mask(0.8), fake_mask(0.8, shapes={"w": [4, 4], "v": [2, 2]}))


# ---------------------------------------------------------------------------------------------
# Linear CKA and probes


def gram_cka(x: np.ndarray, y: np.ndarray) -> float:
    """CKA as HSIC of the centred linear kernels (Kornblith et al., eq. 3 with K = XX^T): another formula than the module's."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l_ = h @ x @ x.T @ h, h @ y @ y.T @ h
    return float(np.sum(k * l_) / np.sqrt(np.sum(k * k) * np.sum(l_ * l_)))


def test_linear_cka_matches_the_gram_formula_and_its_invariances():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(50, 8)), rng.normal(size=(50, 5))
    y[:, 0] += 2 * x[:, 0]  # some shared structure
    assert linear_cka(x, y) == pytest.approx(gram_cka(x, y), rel=1e-10)
    assert linear_cka(x, x) == pytest.approx(1.0)
    rotation, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    assert linear_cka(x @ rotation * 3.7, y) == pytest.approx(linear_cka(x, y), rel=1e-10)
    assert linear_cka(x, x @ rotation) == pytest.approx(1.0)
    assert 0 <= linear_cka(rng.normal(size=(50, 8)), y) < 0.5
    with pytest.raises(UsageError, match="expected \\(examples, features\\) of the same examples"):
        linear_cka(x, y[:10])


def test_a_layer_outside_the_model_is_refused():
    assert check_layers(None, 2) == [0, 1, 2]
    with pytest.raises(UsageError, match="layer 3 is outside the model: expected 0..2"):
        check_layers([1, 3], 2)


def test_a_probe_finds_a_planted_signal_and_a_shuffled_control_gives_chance():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.array(["en", "de", "ca"]), 40)
    noise = rng.normal(size=(120, 16))
    planted = noise.copy()
    for k, language in enumerate(["en", "de", "ca"]):  # a feature per label carries it
        planted[:, 3 + k] += 3.0 * (labels == language)
    found = probe_accuracies(planted, labels, seeds=2, folds=5)
    assert found.shape == (10,) and found.mean() > 0.9
    control = probe_accuracies(planted, labels, seeds=2, folds=5, shuffled=True)
    assert abs(control.mean() - 1 / 3) < 0.12
    assert probe_accuracies(noise, labels, seeds=2, folds=5).mean() < 0.5  # no signal: near chance too
    ci = accuracy_interval(found, 5)
    j = found.size
    half = float(__import__("scipy.stats").stats.t.ppf(0.975, j - 1)) * np.sqrt((1 / j + 1 / 4) * found.var(ddof=1))
    assert (ci.low, ci.high) == pytest.approx((found.mean() - half, found.mean() + half))
    groups = np.repeat(np.arange(24), 5)  # utterances: their frames stay together
    assert probe_accuracies(planted, labels, seeds=1, folds=4, groups=groups).mean() > 0.9
    with pytest.raises(UsageError, match="each with at least 5 examples"):
        probe_accuracies(planted[:6], labels[:6], folds=5)


def test_phone_timings_line_up_with_the_generated_audio(corpus_dir, tmp_path):
    import shutil

    from utils.phones import add_phone_timings, frame_labels, read_phone_timings

    split = tmp_path / "test"
    shutil.copytree(corpus_dir / "en" / "test", split)
    timings = read_phone_timings(add_phone_timings(split).parent)
    assert len(timings) == 24
    for name, phones in timings.items():
        seconds = sf.info(split / name).duration
        starts, ends = np.array([p[1] for p in phones]), np.array([p[2] for p in phones])
        assert np.all(starts >= 0) and np.all(ends <= seconds + 1e-9) and np.all(ends > starts)
        assert np.allclose(starts[1:], ends[:-1])  # contiguous: the durations sum to the speech span
        assert (ends - starts).sum() == pytest.approx(ends[-1] - starts[0])
        audio, rate = sf.read(split / name)
        speech = audio[int(starts[0] * rate) : int(ends[-1] * rate)]
        outside = np.concatenate([audio[: int(starts[0] * rate)], audio[int(ends[-1] * rate) + int(0.02 * rate) :]])
        assert np.abs(speech).max() > 10 * max(np.abs(outside).max(initial=0), 1e-4) or outside.size < 0.02 * rate  # the speech is inside the phones
        frames = int(seconds / 0.02)
        labels = frame_labels(phones, frames, 0.02)
        assert len(labels) == frames and all(lab == "" or any(lab == p[0] for p in phones) for lab in labels)
        assert sum(lab != "" for lab in labels) == pytest.approx(sum(min(e, frames * 0.02) - s for _, s, e in phones) / 0.02, abs=len(phones) + 1)
    (split / "000000.wav").write_bytes((split / "000001.wav").read_bytes())  # a clip that is not its row's
    (split / "phones.jsonl").unlink()
    with pytest.raises(UsageError, match="000000.wav is not the clip espeak-ng makes of its metadata row"):
        add_phone_timings(split)
    with pytest.raises(MissingInput, match="a frame-level phone probe needs phone labels with timings"):
        read_phone_timings(tmp_path)


# ---------------------------------------------------------------------------------------------
# Typology


def test_distances_are_read_offline_and_an_unknown_language_is_one_line(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    matrix = distance_matrix(["en", "de", "es"], "genetic")
    assert matrix.shape == (3, 3) and np.allclose(matrix, matrix.T) and np.all(np.diag(matrix) == 0)
    assert matrix[0, 1] < matrix[0, 2]  # English is genetically closer to German than to Spanish
    assert distance_matrix(["en", "de"], "genetic")[0, 1] == pytest.approx(matrix[0, 1])
    with pytest.raises(UsageError, match="language 'qqq' \\(ISO 639-3 'qqq'\\) is not in the URIEL\\+ database"):
        distance_matrix(["en", "qqq"], "genetic")


def test_the_permutation_p_value_of_a_small_case_by_hand():
    # Three languages, pairs (0,1), (0,2), (1,2): values 1, 2, 3 and distances 1, 2, 3 correlate perfectly.
    values = np.array([[0, 1, 2], [1, 0, 3], [2, 3, 0]], float)
    distances = values.copy()
    result = permutation_correlation(values, distances, language_pairs("abc"), range(3), both=True)
    # The 6 orderings of the languages permute the distances (1, 2, 3) over the pairs: the identity
    # and the reversal (2 1 0) give (1, 2, 3) or (3, 2, 1) reversed... computed by hand below.
    import itertools

    hand = []
    for order in itertools.permutations(range(3)):
        y = [distances[order[i], order[j]] for i, j in [(0, 1), (0, 2), (1, 2)]]
        hand.append(abs(np.corrcoef([1, 2, 3], y)[0, 1]))
    assert result.r == pytest.approx(1.0) and result.exact and result.permutations == 6
    assert result.p == pytest.approx(sum(h >= 1 - 1e-12 for h in hand) / 6) == pytest.approx(2 / 6)
    assert result.smallest_p == pytest.approx(1 / 6)
    with pytest.raises(UsageError, match="2 language pair\\(s\\) with both numbers: expected at least 3"):
        permutation_correlation(values, distances, [(0, 1), (0, 2)], range(3), both=True)


# ---------------------------------------------------------------------------------------------
# Seeds pooled


def summary(seed: int, ids: list[str], intact: list[int], only: list[int], randoms: list[list[int]], lengths: list[int]) -> dict:
    base = {"upstream": "en", "downstream": "ca", "group": "all", "zeroed": 10, "kept": 100, "lengths": lengths}
    rows = [base | {"condition": "intact", "versus": None, "edits": intact, "ids": ids, "cer": 0.0}]
    rows.append(base | {"condition": "only", "versus": "de", "edits": only, "cer": 0.0})
    rows += [base | {"condition": "random", "versus": "de", "control_seed": k, "edits": e, "cer": 0.0} for k, e in enumerate(randoms)]
    return {"seed": seed, "ablation": rows, "cka": [], "probes": [], "probe_folds": 5}


def test_seeds_pool_by_utterance_and_a_test_set_that_differs_between_seeds_is_refused():
    lengths = [10, 20, 30, 40]
    s0 = summary(0, ["a", "b", "c", "d"], [1, 2, 3, 4], [3, 4, 5, 6], [[1, 2, 4, 4], [2, 2, 3, 5]], lengths)
    s1 = summary(1, ["a", "b", "c", "d"], [2, 2, 3, 3], [5, 4, 6, 6], [[2, 3, 3, 3], [2, 2, 4, 4]], lengths)
    cells = ablation_cells([s0, s1])
    rates = cells[("en", "ca", "de", "all")]
    assert np.array_equal(rates["random"].edits, [[1.5, 2, 3.5, 4.5], [2, 2.5, 3.5, 3.5]])  # draws averaged per utterance
    _, numbers = ablation_markdown([s0, s1])
    per_seed = [(np.sum(o) - np.mean([np.sum(r) for r in rs])) / np.sum(lengths) for o, rs in (([3, 4, 5, 6], s0["ablation"]), ([5, 4, 6, 6], s1["ablation"]))
                for rs in [[r["edits"] for r in rs if r["condition"] == "random"]]]
    assert numbers["vs_random"]["en-ca-de"]["estimate"] == pytest.approx(np.mean(per_seed))
    s1["ablation"][0]["ids"] = ["a", "b", "x", "y"]
    with pytest.raises(UsageError, match="en-ca: seed 1's test set shares 2 of 4 utterances with seed 0's: expected the same test set in every seed"):
        ablation_cells([s0, s1])


# ---------------------------------------------------------------------------------------------
# The recipe on a real transfer


@pytest.fixture(scope="module")
def analysed(corpus_dir, tmp_path_factory):
    """An en model fine-tuned one epoch, its ticket and the base's at 0.8, the en ticket
    transferred to ca, and run_analysis.py over them with every analysis."""
    root = tmp_path_factory.mktemp("analysis")
    base = root / "base"
    from utils.model import init_from_config

    init_from_config(str(TINY_CONFIG), str(base), seed=0)
    data = lambda code: ["--data_dir", str(corpus_dir / code)]  # noqa: E731
    assert run_in_process("run_finetune.py", ["--language", "en", *data("en"), "--output_dir", str(root / "ft-en"), "--model_name_or_path", str(base),
                                              "--num_train_epochs", "1", "--max_train_samples", "96", *TRAIN]) == 0
    for label, source in (("en", root / "ft-en"), ("base", base)):
        assert run_in_process("run_prune.py", ["--model_name_or_path", str(source), "--sparsity", "0.8", "--output_dir", str(root / "tickets" / label / "sparsity-0.80")]) == 0
    assert run_in_process("run_transfer.py", ["--upstream", "en", "--downstream", "ca", "--sparsity", "0.8", "--tickets_dir", str(root / "tickets"), *data("ca"),
                                              "--output_dir", str(root / "en-ca"), "--freeze_epochs", "1", "--train_epochs", "1", "--max_train_samples", "48", *TRAIN]) == 0
    args = ["--tickets", f"en={root / 'tickets/en/sparsity-0.80'}", f"base={root / 'tickets/base/sparsity-0.80'}", "--transfers", f"en-ca={root / 'en-ca'}",
            "--upstream_models", f"en={root / 'ft-en'}", "--base_model", str(base), "--data_dir", str(corpus_dir / "{language}"),
            "--analyses", "ablation", "cka", "probes", "phones", "--control_seeds", "2", "--probe_seeds", "1", "--probe_folds", "3",
            "--frames_per_utterance", "20", "--use_cpu", "True", "--report_to", "none", "--output_dir", str(root / "analysis")]
    assert run_in_process("run_analysis.py", args) == 0
    return root, args


def test_zeroing_nothing_reproduces_the_transfer_and_every_analysis_is_written(analysed):
    root, _ = analysed
    out = root / "analysis"
    assert (out / "ablation" / "en-ca" / "predictions_test.jsonl").read_bytes() == (root / "en-ca" / "predictions_test.jsonl").read_bytes()
    record = json.loads((out / "analysis.json").read_text())
    rows = record["ablation"]
    intact = next(r for r in rows if r["condition"] == "intact")
    own = json.loads((root / "en-ca" / "results.json").read_text())
    assert intact["matches_own"] and intact["cer"] == pytest.approx(own["test_cer"]) and intact["loss"] == pytest.approx(own["test_loss"], rel=1e-6)
    # Zeroing a whole layer's set changes the model's output (a q or k set alone may not move the loss at float precision).
    assert all(r["loss"] != intact["loss"] for r in rows if r["condition"] != "intact" and (r["group"] == "all" or r["group"].startswith("layer")))
    en, base = Mask.load(root / "tickets/en/sparsity-0.80").bools(), Mask.load(root / "tickets/base/sparsity-0.80").bools()
    expected = sum(int((en[n] & ~base[n]).sum()) for n in en)
    overall = [r for r in rows if r["condition"] != "intact" and r["group"] == "all"]
    assert [(r["condition"], r["zeroed"]) for r in overall] == [("only", expected), ("random", expected), ("random", expected)]
    per_layer = [r["zeroed"] for r in rows if r["condition"] == "only" and r["group"].startswith("layer")]
    assert sum(per_layer) == expected  # the layers partition the set
    for r in rows:  # each row's CER is its edits over its lengths
        assert r["cer"] == pytest.approx(sum(r["edits"]) / sum(r["lengths"]))
    kinds = {(r["kind"], r["a"], r["b"]) for r in record["cka"]}
    assert kinds == {("ticket-ticket", "ticket:en", "ticket:base"), ("ticket-upstream", "ticket:en", "upstream:en"), ("ticket-base", "ticket:en", "base")}
    assert {r["layer"] for r in record["cka"]} == {0, 1, 2} and all(0 <= r["cka"] <= 1 + 1e-9 for r in record["cka"])
    assert {r["task"] for r in record["probes"]} == {"language", "phones"}
    text = (out / "ANALYSIS.md").read_text()
    for heading in ("## Ablation", "## Representational similarity", "## Probes"):
        assert heading in text
    assert (out / "cka.png").is_file() and (out / "probes_language.png").is_file() and (out / "probes_phones.png").is_file()


def test_bad_analysis_input_is_one_line(analysed, tmp_path, capsys):
    root, args = analysed
    bad = [a.replace(str(root / "analysis"), str(tmp_path / "out")) for a in args]
    layers = bad[: bad.index("--output_dir")] + ["--layers", "7", "--output_dir", str(tmp_path / "layers")]
    assert run_in_process("run_analysis.py", layers) == 2
    assert "error: layer 7 is outside the model: expected 0..2" in capsys.readouterr().err
    assert not (tmp_path / "layers").exists()  # refused before anything was written
    wrong = [a.replace(f"en-ca={root / 'en-ca'}", f"en-en={root / 'en-ca'}") for a in bad]
    assert run_in_process("run_analysis.py", wrong) == 2
    assert "expected the en ticket given in --tickets fine-tuned on en" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# In a study


def analysis_study(tmp_path, name="study.yaml", **overrides):
    import yaml

    from tests.conftest import study_config

    path = tmp_path / name
    path.write_text(yaml.safe_dump(study_config(tmp_path, **({"upstream": ["en", "de"], "downstream": ["en", "ca"], "seeds": [0],
                                                               "analysis": {"control_seeds": 2, "typology": False}} | overrides)), sort_keys=False))
    return path


def test_the_grid_plans_an_analysis_per_seed_and_sparsity_after_everything_it_reads(tmp_path):
    from utils.grid import load_config, plan

    steps = {st.id: st for st in plan(load_config(str(analysis_study(tmp_path))))}
    step = steps["seed-0/analysis/sparsity-0.80"]
    assert step.kind == "analysis" and step.argv[1].endswith("run_analysis.py")
    assert [t.split("=")[0] for t in step.settings["tickets"]] == ["base", "en", "de"]
    assert [t.split("=")[0] for t in step.settings["transfers"]] == ["en-en", "en-ca", "de-en", "de-ca"]
    assert step.settings["control_seeds"] == 2 and "typology" not in step.settings and step.settings["languages"] == ["en", "de", "ca"]
    made = {st.output: st.id for st in steps.values()}
    for reference in step.settings["tickets"] + step.settings["transfers"] + step.settings["upstream_models"]:
        assert made[Path(reference.split("=", 1)[1])] in step.needs  # it runs after every step whose output it reads
    plain = {st.id: st.digest for st in plan(load_config(str(analysis_study(tmp_path, "plain.yaml", analysis=None))))}
    assert set(steps) - set(plain) == {step.id} and all(steps[i].digest == d for i, d in plain.items())
    with pytest.raises(UsageError, match="grid config analysis compares tickets, and this study makes 1 per seed"):
        load_config(str(analysis_study(tmp_path, "one.yaml", upstream=["en"], prune_base=False)))


def test_the_report_pools_the_seeds_and_the_typology_matches_numpy(analysed, tmp_path):
    from utils.analysis import analysis_markdown, typology_markdown
    from utils.records import StudyResults

    root, _ = analysed
    first = json.loads((root / "analysis" / "analysis.json").read_text())
    second = json.loads(json.dumps(first)) | {"seed": 4}
    results = StudyResults([], {}, {}, [], analyses={0.8: [first, second]})
    text = analysis_markdown(results, ["en"], ["ca"], tmp_path / "figures")
    assert "## What the language-specific weights do at 80% sparsity" in text and "seed(s) 4, 42" in text
    assert (tmp_path / "figures" / "cka_0.80.png").is_file() and (tmp_path / "figures" / "probes_phones_0.80.png").is_file()
    # Transfer CER and IoU of three upstream languages, against URIEL+'s distances computed here.
    ups, downs = ["en", "de", "es"], ["en", "ca"]
    rng = np.random.default_rng(0)
    cer = {(u, d): float(rng.uniform(0.2, 0.6)) for u in ups for d in downs}
    rows = [{"upstream": u, "downstream": d, "sparsity": 0.8, "seed": seed, "test_cer": c + 0.01 * seed} for (u, d), c in cer.items() for seed in (0, 1)]
    iou = {"labels": ups, "matrix": [[1.0, 0.3, 0.5], [0.3, 1.0, 0.4], [0.5, 0.4, 1.0]]}
    _, numbers = typology_markdown(rows, iou, 0.8, ups, downs)
    languages = ["en", "de", "es", "ca"]
    distances = distance_matrix(languages, "inventory")
    pairs = [(0, 1), (0, 2), (1, 2)]
    expected = np.corrcoef([iou["matrix"][i][j] for i, j in pairs], [distances[i, j] for i, j in pairs])[0, 1]
    assert numbers["mask IoU:inventory"]["r"] == pytest.approx(expected) and numbers["mask IoU:inventory"]["pairs"] == 3
    cells = [(u, d) for u in ups for d in downs if u != d]
    expected = np.corrcoef([cer[c] + 0.005 for c in cells], [distances[languages.index(u), languages.index(d)] for u, d in cells])[0, 1]
    assert numbers["transfer CER:inventory"]["r"] == pytest.approx(expected) and numbers["transfer CER:inventory"]["permutations"] == 6
