"""run_finetune.py end to end, in fresh processes, on the generated corpus and an offline FLEURS."""

import hashlib
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import FAST, ROOT, files_containing, make_fleurs_repo, run_in_process, run_script

@pytest.fixture(scope="module")
def finetuned(corpus_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "en"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    result = run_script(["--language", "en", "--data_dir", str(corpus_dir / "en"), "--output_dir", str(out),
                         "--num_train_epochs", "6", "--logging_steps", "10", *FAST], env)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_training_loss_falls_and_results_are_written(finetuned):
    results = json.loads((finetuned / "all_results.json").read_text())
    for key in ("train_loss", "eval_loss", "eval_cer", "eval_wer", "test_cer", "test_wer", "test_loss"):
        assert key in results
    assert results["test_samples"] == 24
    state = json.loads((finetuned / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert len(losses) >= 10
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    # The kept model is the checkpoint with the lowest eval loss.
    eval_losses = [entry["eval_loss"] for entry in state["log_history"] if "eval_loss" in entry]
    assert state["best_metric"] == pytest.approx(min(eval_losses))


def test_predictions_files_reproduce_the_reported_rates(finetuned, corpus_dir):
    import csv

    import jiwer

    results = json.loads((finetuned / "all_results.json").read_text())
    for split, prefix in (("validation", "eval"), ("test", "test")):
        rows = [json.loads(line) for line in (finetuned / f"predictions_{split}.jsonl").read_text().splitlines()]
        assert len(rows) == results[f"{prefix}_samples"]
        # dataset order, keyed by the clip's file name
        order = [r["file_name"] for r in csv.DictReader(open(corpus_dir / "en" / split / "metadata.csv", encoding="utf-8"))]
        assert [r["id"] for r in rows] == order[: len(rows)]
        refs, hyps = [r["reference"] for r in rows], [r["hypothesis"] for r in rows]
        assert results[f"{prefix}_cer"] == jiwer.cer(refs, hyps) == sum(r["char_edits"] for r in rows) / sum(r["ref_chars"] for r in rows)
        assert results[f"{prefix}_wer"] == jiwer.wer(refs, hyps) == sum(r["word_edits"] for r in rows) / sum(r["ref_words"] for r in rows)
        for r in rows[:5]:  # each row's counts are that pair's own edit distance
            assert r["char_edits"] == jiwer.process_characters(r["reference"], r["hypothesis"]).substitutions + jiwer.process_characters(
                r["reference"], r["hypothesis"]).deletions + jiwer.process_characters(r["reference"], r["hypothesis"]).insertions
            assert r["ref_chars"] == len(r["reference"]) and r["ref_words"] == len(r["reference"].split())


FRESH_PROCESS_CER = r"""
import csv, json, sys
import jiwer, soundfile as sf, torch
from transformers import AutoModelForCTC, AutoProcessor
out, split_dir = sys.argv[1], sys.argv[2]
model = AutoModelForCTC.from_pretrained(out).eval()
processor = AutoProcessor.from_pretrained(out)
refs, hyps = [], []
for row in csv.DictReader(open(split_dir + "/metadata.csv", encoding="utf-8")):
    audio, sr = sf.read(split_dir + "/" + row["file_name"], dtype="float32")
    inputs = processor(audio, sampling_rate=sr, return_tensors="pt")
    with torch.no_grad():
        ids = model(**inputs).logits.argmax(-1)[0]
    hyps.append(processor.decode(ids))
    refs.append(row["transcription"])
print(json.dumps({"cer": jiwer.cer(refs, hyps), "modules": sorted(m for m in sys.modules if m.startswith("utils"))}))
"""


def test_saved_model_loads_in_fresh_process_and_cer_matches_jiwer(corpus_dir, tmp_path, script_env):
    # Two steps at a tiny learning rate: the model still emits random characters on every frame,
    # so batched evaluation that decoded padding frames, or any decoding slip, would change the CER.
    out = tmp_path / "barely"
    result = run_script(["--language", "en", "--data_dir", str(corpus_dir / "en"), "--output_dir", str(out), "--num_train_epochs", "1",
                         "--max_train_samples", "16", *FAST, "--learning_rate", "1e-6"], script_env)
    assert result.returncode == 0, result.stderr[-3000:]
    result = subprocess.run([sys.executable, "-c", FRESH_PROCESS_CER, str(out), str(corpus_dir / "en" / "test")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-3000:]
    fresh = json.loads(result.stdout.strip().splitlines()[-1])
    assert fresh["modules"] == []  # loaded with plain transformers, none of our code
    reported = json.loads((out / "all_results.json").read_text())["test_cer"]
    assert fresh["cer"] > 1.0  # random characters: more insertions than reference characters
    assert reported == pytest.approx(fresh["cer"], abs=1e-9)


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()}


def test_bad_input_is_one_line_and_overwrites_nothing(finetuned, corpus_dir, capsys):
    """In process: every case is refused before any training."""
    before = _digest(finetuned)

    def refused(args: list[str]) -> str:
        capsys.readouterr()
        assert run_in_process("run_finetune.py", args) == 2
        return capsys.readouterr().err.strip().splitlines()[-1]

    assert refused(["--language", "xx", "--data_dir", str(corpus_dir / "en"), "--output_dir", str(finetuned.parent / "x"), *FAST]).startswith(
        "error: unknown language 'xx'")
    last = refused(["--language", "ca", "--data_dir", str(corpus_dir / "ca"), "--output_dir", str(finetuned), *FAST])
    assert "holds a different run (language: 'en' there, 'ca' now" in last
    for change, message in ((["--learning_rate", "1e-3"], "learning_rate: 0.002 there, 0.001 now"), (["--seed", "2"], "seed: 1 there, 2 now"),
                            (["--num_train_epochs", "7"], "num_train_epochs: 6.0 there, 7.0 now")):
        last = refused(["--language", "en", "--data_dir", str(corpus_dir / "en"), "--output_dir", str(finetuned), "--num_train_epochs", "6",
                        "--logging_steps", "10", *FAST, *change])
        assert f"holds a different run ({message})" in last, last
    assert "train/metadata.csv" in refused(["--language", "en", "--data_dir", str(corpus_dir), "--output_dir", str(finetuned.parent / "y"), *FAST])
    assert _digest(finetuned) == before


def test_fleurs_and_generated_sources(corpus_dir, tmp_path, script_env):
    make_fleurs_repo(tmp_path / "hub", corpus_dir)
    env = dict(script_env, HF_HUB_CACHE=str(tmp_path / "hub"))
    out = tmp_path / "fleurs"
    result = run_script(["--language", "ca", "--output_dir", str(out), "--num_train_epochs", "1", "--max_train_samples", "40", *FAST], env)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "all_results.json").read_text())
    assert results["train_samples"] == 40 and results["test_samples"] == 24
    out = tmp_path / "generated"
    result = run_script(["--language", "pl", "--dataset_name", "generated", "--generated_corpus_dir", str(tmp_path / "gen"),
                         "--generated_num_train", "16", "--generated_num_eval", "4", "--output_dir", str(out), "--num_train_epochs", "1", *FAST], env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "all_results.json").read_text())["test_samples"] == 4
    assert "ż" in json.loads((out / "vocab.json").read_text()) or "ł" in json.loads((out / "vocab.json").read_text())


PULL = r"""
import json, sys
from transformers import AutoModelForCTC, AutoProcessor
model = AutoModelForCTC.from_pretrained(sys.argv[1])
processor = AutoProcessor.from_pretrained(sys.argv[1])
print(json.dumps({"vocab": len(processor.tokenizer), "head": model.lm_head.out_features}))
"""


def test_push_to_hub_as_in_the_examples(corpus_dir, tmp_path):
    from tests.hub_server import TOKEN, HubServer

    with HubServer() as hub:
        env = dict(os.environ, HF_ENDPOINT=hub.endpoint, HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(ROOT))
        env.pop("HF_HUB_OFFLINE", None)
        env.pop("HF_TOKEN", None)
        out = tmp_path / "push"
        result = run_script(["--language", "en", "--data_dir", str(corpus_dir / "en"), "--output_dir", str(out), "--num_train_epochs", "1",
                             "--max_train_samples", "16", "--push_to_hub", "--hub_model_id", "me/tiny-en", "--hub_token", TOKEN, *FAST], env)
        assert result.returncode == 0, result.stderr[-3000:]
        repo = hub.repo("me/tiny-en")  # the push authenticated with the token given as a flag ...
        assert files_containing(out, TOKEN) == [] and (out / "training_args.bin").is_file()  # ... which no written file holds
        assert not [name for name, data in repo.files.items() if TOKEN.encode() in data] and TOKEN not in result.stdout + result.stderr
        assert {"config.json", "model.safetensors", "vocab.json", "README.md"} <= set(repo.files)
        card = repo.files["README.md"].decode()
        assert "- en" in card and "- language-tickets" in card
        assert "base_model" not in card  # a local source is no Hub repo id
        # The model-index holds the test scores all_results.json reports, in the Hub's terms.
        from huggingface_hub import ModelCard

        from utils import __version__

        data, results = ModelCard(card).data, json.loads((out / "all_results.json").read_text())
        scores = {r.metric_type: r for r in data.eval_results}
        assert (scores["cer"].metric_value, scores["wer"].metric_value) == (round(100 * results["test_cer"], 2), round(100 * results["test_wer"], 2))
        assert {(r.task_type, r.dataset_type, r.dataset_name, r.dataset_config, r.dataset_split) for r in scores.values()} == {
            ("automatic-speech-recognition", "audiofolder", "local audio folder", "en", "test")}
        assert data.model_name == "tiny-en" and data.license == "apache-2.0" and data.language_tickets_version == __version__
        assert str(tmp_path) not in card and str(corpus_dir) not in card  # no local path reaches the Hub
        pulled = subprocess.run([sys.executable, "-c", PULL, "me/tiny-en"], cwd=tmp_path, env=dict(env, HF_HOME=str(tmp_path / "hf2")),
                                capture_output=True, text=True, timeout=120)
        assert pulled.returncode == 0, pulled.stderr[-2000:]
        sizes = json.loads(pulled.stdout.strip().splitlines()[-1])
        assert sizes["vocab"] == sizes["head"] == len(json.loads((out / "vocab.json").read_text())) + 2  # + <s>, </s>


def test_a_transformers_without_the_overridden_sampler_is_refused(monkeypatch):
    from transformers import Trainer

    from utils.training import CTCTrainer

    monkeypatch.delattr(Trainer, "_get_eval_sampler")
    with pytest.raises(RuntimeError, match="has no Trainer._get_eval_sampler, which CTCTrainer overrides"):
        CTCTrainer()
