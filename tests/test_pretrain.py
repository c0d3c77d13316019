"""Self-supervised pretraining: mixtures, the masking collator, the temperature schedule, and
run_pretrain.py end to end (continued by a resume, then fine-tuned by run_finetune.py)."""

import json
import math
import random
import shutil

import numpy as np
import pytest
import torch

from tests.conftest import FAST, TINY_CONFIG, files_containing, run_script
from utils.mixture import clip_counts, describe_draw, draw_mixture, parse_mixture

SSL = ["--mask_time_prob", "0.5", "--mask_time_length", "5", "--num_negatives", "10", "--use_cpu", "--disable_tqdm", "True",
       "--per_device_train_batch_size", "8", "--learning_rate", "1e-3", "--adam_beta2", "0.98", "--seed", "3",
       "--gumbel_temperature_decay", "0.99", "--logging_steps", "5"]


@pytest.mark.parametrize("entries, message", [
    (["en=0.5", "de=-0.1", "es=0.6"], "mixture share de=-0.1: expected a number >= 0"),
    (["en=0.5", "de=0.25"], "sum to 0.75: expected them to sum to 1"),
    (["en=0.5", "xx=0.5"], "unknown language 'xx'"),
    (["en=0.5", "en_us=0.5"], "names 'en' twice"),
    (["en:0.5"], "mixture entry 'en:0.5': expected language=share"),
])
def test_bad_mixtures_are_refused_in_one_line(entries, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        parse_mixture(entries)


def test_clip_counts_follow_the_largest_remainder():
    # 10 clips at 0.5/0.25/0.25: exact 5, 2.5, 2.5 -> floors 5, 2, 2 and the one left goes to the
    # first of the two equal remainders.
    assert clip_counts({"en": 0.5, "de": 0.25, "es": 0.25}, 10) == {"en": 5, "de": 3, "es": 2}
    rng = random.Random(0)
    for _ in range(200):
        raw = [rng.random() for _ in range(rng.randint(1, 6))]
        shares = {f"l{i}": w / sum(raw) for i, w in enumerate(raw)}
        total = rng.randint(0, 500)
        counts = clip_counts(shares, total)
        assert sum(counts.values()) == total
        assert all(abs(counts[c] - shares[c] * total) < 1 for c in shares)


def test_drawn_mixture_matches_the_asked_shares_by_clips_and_by_hours():
    rng = np.random.default_rng(1)
    durations = {code: list(rng.uniform(1.0, 6.0, size=n)) for code, n in (("en", 900), ("de", 400), ("es", 400))}
    shares = {"en": 0.5, "de": 0.25, "es": 0.25}
    picked = draw_mixture(durations, shares, total_clips=800, seed=0)
    assert {c: len(i) for c, i in picked.items()} == {"en": 400, "de": 200, "es": 200}
    assert picked == draw_mixture(durations, shares, total_clips=800, seed=0) != draw_mixture(durations, shares, total_clips=800, seed=1)
    total = 1800.0
    picked = draw_mixture(durations, shares, total_seconds=total, seed=0)
    drawn = describe_draw(durations, picked)
    for code, share in shares.items():  # each language within one clip of its target
        assert abs(drawn[code].seconds - share * total) <= 6.0 / 2 + 1e-9
        assert drawn[code].seconds == pytest.approx(sum(durations[code][i] for i in picked[code]), abs=1e-3)
    assert sum(d.share_of_seconds for d in drawn.values()) == pytest.approx(1.0)
    assert len(draw_mixture(durations, {"en": 0.75, "de": 0.25}, total_clips=800)["en"]) == 600  # within what en holds
    with pytest.raises(ValueError, match=r"asks for 800 de clips but the source holds 400"):
        draw_mixture(durations, {"en": 0.2, "de": 0.8}, total_clips=1000)


def test_drawn_mixture_refuses_more_hours_than_the_source_holds():
    durations = {"en": [2.0] * 100, "de": [2.0] * 10}
    with pytest.raises(ValueError, match=r"asks for 0\.0278 h of de but the source holds 0\.00556 h"):
        draw_mixture(durations, {"en": 0.5, "de": 0.5}, total_seconds=200.0)


def _collator(seed=0):
    from transformers import AutoConfig, AutoFeatureExtractor, Wav2Vec2ForPreTraining

    from utils.pretraining import DataCollatorForWav2Vec2Pretraining

    config = AutoConfig.from_pretrained(TINY_CONFIG)
    model = Wav2Vec2ForPreTraining(config)
    extractor = AutoFeatureExtractor.from_pretrained(TINY_CONFIG)
    return model, DataCollatorForWav2Vec2Pretraining(model, extractor, mask_time_prob=0.5, mask_time_length=4, num_negatives=7, seed=seed)


def test_masks_and_negatives_are_reproducible_and_respect_padding():
    model, collator = _collator()
    rng = np.random.default_rng(0)
    rows = [{"input_values": rng.standard_normal(n).astype(np.float32)} for n in (32000, 12000, 20000)]
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    batch = collator(rows)
    assert (np.random.get_state()[1] == before).all()  # numpy's global generator is left as it was
    again = collator(rows)
    for key in ("mask_time_indices", "sampled_negative_indices", "input_values", "attention_mask"):
        assert torch.equal(batch[key], again[key])
    collator.epoch = 1
    assert not torch.equal(collator(rows)["mask_time_indices"], batch["mask_time_indices"])
    _, other_seed = _collator(seed=5)
    assert not torch.equal(other_seed(rows)["mask_time_indices"], batch["mask_time_indices"])

    mask, negatives = batch["mask_time_indices"], batch["sampled_negative_indices"]
    frames = mask.shape[1]
    for b, row in enumerate(rows):
        real = int(model._get_feat_extract_output_lengths(torch.tensor(len(row["input_values"]))))
        assert not mask[b, real:].any()  # no padding frame is masked
        assert 0.3 * real <= mask[b, :real].sum() <= 0.75 * real  # about mask_time_prob of the real frames
        own = negatives[b, :real] - b * frames  # negatives: the same clip's real frames, never the frame itself
        assert own.min() >= 0 and own.max() < real
        assert not (own == torch.arange(real)[:, None]).any()
    # A group-norm model's feature extractor (wav2vec2-base) wants no attention mask: the draws still skip padding.
    collator.epoch = 0
    collator.feature_extractor.return_attention_mask = False
    plain = collator(rows)
    assert "attention_mask" not in plain and torch.equal(plain["mask_time_indices"], mask) and torch.equal(plain["sampled_negative_indices"], negatives)


def test_contrastive_accuracy_matches_a_loop():
    from types import SimpleNamespace

    from utils.pretraining import contrastive_accuracy

    torch.manual_seed(0)
    batch, frames, dim, k = 2, 6, 4, 3
    quantized = torch.randn(batch, frames, dim)
    predicted = quantized + 0.8 * torch.randn(batch, frames, dim)
    negatives = torch.randint(0, frames, (batch, frames, k)) + torch.arange(batch)[:, None, None] * frames
    negatives[0, 0, 0] = 0  # a negative equal to the target does not count against it
    mask = torch.rand(batch, frames) > 0.3
    expected = 0
    flat = quantized.reshape(-1, dim)
    for b in range(batch):
        for t in range(frames):
            if not mask[b, t]:
                continue
            positive = torch.cosine_similarity(predicted[b, t], quantized[b, t], dim=0)
            rivals = [torch.cosine_similarity(predicted[b, t], flat[i], dim=0) for i in negatives[b, t] if not torch.equal(flat[i], quantized[b, t])]
            expected += int(all(positive > r for r in rivals))
    outputs = SimpleNamespace(projected_states=predicted, projected_quantized_states=quantized)
    assert int(contrastive_accuracy(outputs, negatives, mask)) == expected


@pytest.fixture(scope="module")
def pretrained(corpus_dir, tmp_path_factory):
    """A 3-epoch run from scratch on a 75/25 en/ca mixture (dir A), and the same run resumed from
    A's first-epoch checkpoint in dir B."""
    import os

    from tests.conftest import ROOT

    tmp = tmp_path_factory.mktemp("pretrain")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), HF_HOME=str(tmp / "hf"))
    data = tmp / "data"
    data.mkdir()
    for code in ("en", "ca"):
        (data / code).symlink_to(corpus_dir / code)
    common = ["--model_name_or_path", str(TINY_CONFIG), "--mixture", "en=0.75", "ca=0.25", "--total_clips", "160", "--eval_clips", "16",
              "--data_dir", str(data / "{language}"), "--num_train_epochs", "3", "--save_total_limit", "5", "--keep_checkpoints", "True", *SSL]
    full, resumed = tmp / "A", tmp / "B"
    result = run_script([*common, "--output_dir", str(full)], env, "run_pretrain.py")
    assert result.returncode == 0, result.stderr[-3000:]
    resumed.mkdir()
    shutil.copy(full / "run_signature.json", resumed)
    shutil.copytree(full / "checkpoint-20", resumed / "checkpoint-20")
    result = run_script([*common, "--output_dir", str(resumed)], env, "run_pretrain.py")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Loading model from {resumed / 'checkpoint-20'}" in result.stderr + result.stdout
    return full, resumed, data, env, tmp


def _log(path):
    return [e for e in json.loads((path / "trainer_state.json").read_text())["log_history"] if "loss" in e]


def test_pretraining_loss_falls_and_the_temperature_follows_its_schedule_across_a_resume(pretrained):
    full, resumed, *_ = pretrained
    logs = _log(full)
    assert len(logs) == 12  # 60 updates, a log every 5
    for entry in logs:
        for key in ("contrastive_loss", "diversity_loss", "codevector_perplexity", "contrastive_accuracy"):
            assert math.isfinite(entry[key])
    # 60 updates of a tiny model: the objective falls and the quantiser spreads over more
    # codevectors without collapsing; the contrastive part itself stays near chance (ln 11) this
    # early (measured: it needs hundreds of updates; at lr 5e-3 the codebook collapsed to ~3).
    assert logs[-1]["loss"] < 0.97 * logs[0]["loss"], (logs[0]["loss"], logs[-1]["loss"])
    assert logs[0]["codevector_perplexity"] < logs[-1]["codevector_perplexity"] and logs[-1]["codevector_perplexity"] > 20
    assert abs(logs[-1]["contrastive_loss"] - math.log(11)) < 0.2 and 0.0 < logs[-1]["contrastive_accuracy"] < 1.0
    evaluation = json.loads((full / "eval_results.json").read_text())  # the final evaluation carries the same measures
    assert 0.0 < evaluation["eval_contrastive_accuracy"] < 1.0 and evaluation["eval_codevector_perplexity"] > 20
    assert evaluation["eval_loss"] == pytest.approx(evaluation["eval_contrastive_loss"] + 0.1 * evaluation["eval_diversity_loss"], abs=2e-3)
    for entry in _log(resumed):  # the update of step s ran at the temperature of step s - 1
        assert entry["gumbel_temperature"] == pytest.approx(max(2.0 * 0.99 ** (entry["step"] - 1), 0.5), abs=1e-5)
    assert [e["step"] for e in _log(resumed)] == [e["step"] for e in logs]
    # The resumed run ends where the uninterrupted one did: same data order, masks and temperatures.
    from safetensors.torch import load_file

    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_the_drawn_mixture_is_recorded_exactly(pretrained):
    import soundfile as sf

    full, _, data, *_ = pretrained
    record = json.loads((full / "mixture.json").read_text())
    assert record["requested"] == {"en": 0.75, "ca": 0.25} and record["total"] == {"clips": 160}
    drawn = record["drawn"]["train"]
    assert {c: d["clips"] for c, d in drawn.items()} == {"en": 120, "ca": 40}
    assert {c: d["clips"] for c, d in record["drawn"]["validation"].items()} == {"en": 12, "ca": 4}
    for code, ids in record["ids"]["train"].items():  # the seconds are those of the clips named
        seconds = sum(sf.info(str(data / code / "train" / name)).duration for name in ids)
        assert drawn[code]["seconds"] == pytest.approx(seconds, abs=0.01)
        assert len(set(ids)) == len(ids) == drawn[code]["clips"]
    assert sum(d["share_of_seconds"] for d in drawn.values()) == pytest.approx(1.0)


def test_the_pretrained_base_fine_tunes_like_xls_r(pretrained, corpus_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForCTC

    full, _, _, env, tmp = pretrained
    model = AutoModelForCTC.from_pretrained(full, vocab_size=30)
    saved = load_file(full / "model.safetensors")
    for name, tensor in model.state_dict().items():
        if name.startswith("wav2vec2."):
            assert torch.equal(tensor, saved[name]), name
    flags = [f for f in FAST if f not in ("--model_name_or_path", str(TINY_CONFIG))]
    result = run_script(["--language", "ca", "--data_dir", str(corpus_dir / "ca"), "--model_name_or_path", str(full),
                         "--output_dir", str(tmp / "ft"), "--num_train_epochs", "1", *flags], env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp / "ft" / "all_results.json").read_text())["test_samples"] == 24


def test_pretraining_continues_from_a_pretrained_checkpoint(pretrained, tmp_path):
    """Continued on another mixture with a zero learning rate, every weight (quantiser included)
    must come back exactly as the checkpoint had it: nothing was re-initialised."""
    from safetensors.torch import load_file

    full, _, data, env, _ = pretrained
    out = tmp_path / "continued"
    flags = [f if f != "1e-3" else "0.0" for f in SSL]
    result = run_script(["--model_name_or_path", str(full), "--mixture", "en=0.5", "ca=0.5", "--total_clips", "32", "--eval_clips", "8",
                         "--data_dir", str(data / "{language}"), "--num_train_epochs", "1", "--output_dir", str(out), *flags,
                         "--hub_token", "hf_secret_pretrain_token"], env, "run_pretrain.py")
    assert result.returncode == 0, result.stderr[-3000:]
    assert files_containing(out, "hf_secret_pretrain_token") == [] and (out / "training_args.bin").is_file()  # a token flag is written nowhere
    before, after = load_file(full / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(before) == set(after) and any(k.startswith("quantizer.") for k in after)
    for name in before:
        assert torch.equal(before[name], after[name]), name
    assert json.loads((out / "mixture.json").read_text())["drawn"]["train"]["ca"]["clips"] == 16
    assert json.loads((out / "config.json").read_text())["mask_time_prob"] == json.loads((full / "config.json").read_text())["mask_time_prob"]


def test_bad_pretraining_inputs_fail_before_any_work(pretrained, tmp_path):
    from transformers import AutoConfig, AutoFeatureExtractor, AutoModelForCTC

    _, _, data, env, _ = pretrained
    no_quantizer = tmp_path / "ctc"
    AutoModelForCTC.from_config(AutoConfig.from_pretrained(TINY_CONFIG)).save_pretrained(no_quantizer)
    AutoFeatureExtractor.from_pretrained(TINY_CONFIG).save_pretrained(no_quantizer)
    base = ["--mixture", "en=0.5", "ca=0.5", "--data_dir", str(data / "{language}"), *SSL]
    for args, message in (
        (["--model_name_or_path", str(no_quantizer), "--total_clips", "20"], "has no quantiser (project_hid.bias and"),
        (["--model_name_or_path", str(TINY_CONFIG), "--total_clips", "1000"], "asks for 500 en clips but the source holds "),
        (["--model_name_or_path", str(TINY_CONFIG), "--total_clips", "20", "--total_hours", "1"], "exactly one of --total_clips or --total_hours"),
        (["--model_name_or_path", str(TINY_CONFIG), "--total_clips", "0"], "total 0: expected a positive size"),
    ):
        result = run_script([*args, *base, "--output_dir", str(tmp_path / "out")], env, "run_pretrain.py")
        assert result.returncode == 2 and message in result.stderr.strip().splitlines()[-1], result.stderr[-2000:]
        shutil.rmtree(tmp_path / "out", ignore_errors=True)
