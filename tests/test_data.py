import csv
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from datasets import DatasetDict
from transformers import AutoConfig, Wav2Vec2FeatureExtractor

from tests.conftest import TINY_CONFIG, make_fleurs_repo
from utils.data import build_processor, load_fleurs_split, load_local_splits, normalize_splits
from utils.features import DataCollatorCTCWithPadding, prepare_features
from utils.languages import resolve_language
from utils.structure import frames_for_samples, receptive_field
from utils.text import build_vocab, normalize_text, unseen_chars


@pytest.mark.parametrize(
    "language, raw, expected",
    [
        ("en", "Hello, World!  It's 3 o'clock.", "hello world it's 3 o'clock"),
        ("en", "'quoted' -- dash-word", "quoted dash word"),
        ("fr", "L’homme, à l'école : «Très bien» !", "l'homme à l'école très bien"),
        ("de", "Straße? ÄPFEL & Öl.", "straße äpfel öl"),
        ("ca", "Col·lecció d’Àngels", "col lecció d'àngels"),
        ("pl", "Zażółć gęślą jaźń.", "zażółć gęślą jaźń"),
        ("tr", "IŞIK İzmir", "ışık izmir"),
        ("es", "¿Qué tal? ¡Bien!", "qué tal bien"),
        ("en", "   ", ""),
    ],
)
def test_normalize_text_hand_cases(language, raw, expected):
    assert normalize_text(raw, language) == expected


def test_normalize_text_composes_diacritics_and_ignores_chars():
    decomposed = "cafe\u0301"  # e + combining acute
    assert normalize_text(decomposed, "fr") == "café"
    assert normalize_text("a#b c", "en", chars_to_ignore=["#"]) == "ab c"


def test_vocab_from_training_text_only():
    vocab = build_vocab(["ab a", "ba c"])
    assert vocab == {"a": 0, "b": 1, "c": 2, "|": 3, "[UNK]": 4, "[PAD]": 5}
    assert unseen_chars(["abd xd", "é"], vocab) == {"d": 2, "x": 1, "é": 1}
    with pytest.raises(ValueError, match="no characters"):
        build_vocab(["", " "])


def _processor(tmp_path, texts):
    fe = Wav2Vec2FeatureExtractor.from_pretrained(TINY_CONFIG)
    return build_processor(build_vocab(texts), fe, str(tmp_path / "proc"))


def test_processor_round_trip_and_unknown_chars(tmp_path):
    processor = _processor(tmp_path, ["hello world"])
    ids = processor.tokenizer("hello xyz").input_ids
    assert ids.count(processor.tokenizer.unk_token_id) == 3
    assert processor.decode(processor.tokenizer("hello world").input_ids, group_tokens=False) == "hello world"
    assert (tmp_path / "proc" / "vocab.json").is_file()


def test_collator_pads_inputs_and_labels(tmp_path):
    processor = _processor(tmp_path, ["abc"])
    collator = DataCollatorCTCWithPadding(processor)
    features = [
        {"input_values": [0.1] * 500, "labels": [0, 1, 2]},
        {"input_values": [0.2] * 320, "labels": [2]},
    ]
    batch = collator(features)
    assert batch["input_values"].shape == (2, 500)
    assert batch["attention_mask"].tolist()[1] == [1] * 320 + [0] * 180
    assert torch.all(batch["input_values"][1, 320:] == 0)
    assert batch["labels"].tolist() == [[0, 1, 2], [2, -100, -100]]


def _write_split(root: Path, split: str, rows):
    (root / split).mkdir(parents=True, exist_ok=True)
    with open(root / split / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "transcription"])
        writer.writerows(rows)


def _tone(path: Path, seconds: float, sr: int = 22050):
    t = np.arange(int(seconds * sr)) / sr
    sf.write(path, 0.3 * np.sin(2 * np.pi * 220 * t), sr)


def test_local_folder_counts_every_kind_of_bad_row(tmp_path, caplog):
    root = tmp_path / "data"
    for split in ("train", "validation", "test"):
        (root / split).mkdir(parents=True)
        _tone(root / split / "good.wav", 1.0)
        _tone(root / split / "tiny.wav", 0.01)  # 160 samples at 16 kHz: under the 400-sample receptive field
        (root / split / "broken.wav").write_bytes(b"not audio at all")
        _write_split(
            root,
            split,
            [("good.wav", "Good clip!"), ("missing.wav", "gone"), ("tiny.wav", "tiny"), ("broken.wav", "broken"), ("good.wav", "?!")],
        )
    with caplog.at_level(logging.WARNING):
        raw = load_local_splits(str(root))
        assert len(raw["train"]) == 4  # the missing file is skipped
        raw = normalize_splits(raw, resolve_language("en"))
        assert len(raw["train"]) == 3  # "?!" normalises to empty
        processor = _processor(tmp_path, raw["train"]["text"])
        config = AutoConfig.from_pretrained(TINY_CONFIG)
        prepared = prepare_features(raw, processor, lambda n: frames_for_samples(config, n), receptive_field(config), 16000 * 20)
    assert len(prepared["train"]) == 1
    assert prepared["train"][0]["input_length"] == 16000  # resampled from 22.05 kHz
    assert processor.decode(prepared["train"][0]["labels"], group_tokens=False) == "good clip"
    log = caplog.text
    assert "skipped 1 of 5 rows whose audio file is missing" in log
    assert "skipped 1 of 4 rows with an empty transcript" in log
    assert "1 unreadable audio" in log and "1 shorter than 400 samples" in log


def test_local_folder_missing_split_is_a_clear_error(tmp_path):
    _write_split(tmp_path, "train", [])
    with pytest.raises(FileNotFoundError, match=r"validation/metadata.csv"):
        load_local_splits(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        load_local_splits(str(tmp_path / "nope"))


def test_frames_match_the_model(tmp_path):
    from transformers import Wav2Vec2ForCTC

    for config in (AutoConfig.from_pretrained(TINY_CONFIG), AutoConfig.for_model("wav2vec2")):
        model = Wav2Vec2ForCTC(config) if config.hidden_size < 512 else None
        expected = [int(Wav2Vec2ForCTC._get_feat_extract_output_lengths(model or _Shim(config), n)) for n in (400, 401, 719, 720, 16000, 33333)]
        assert [frames_for_samples(config, n) for n in (400, 401, 719, 720, 16000, 33333)] == expected
        assert frames_for_samples(config, receptive_field(config)) == 1
        assert frames_for_samples(config, receptive_field(config) - 1) == 0
    assert receptive_field(AutoConfig.for_model("wav2vec2")) == 400


class _Shim:
    """Just enough of a model for ``_get_feat_extract_output_lengths`` without building it."""

    def __init__(self, config):
        self.config = config


def test_fleurs_loader_reads_offline_hub_cache(tmp_path, corpus_dir, monkeypatch):
    import huggingface_hub.constants as hub_constants

    make_fleurs_repo(tmp_path / "hub", corpus_dir)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    dev = load_fleurs_split("ca_es", "dev")
    with open(corpus_dir / "ca" / "validation" / "metadata.csv", encoding="utf-8") as f:
        expected = [row["transcription"] for row in csv.DictReader(f)]
    assert dev["text"] == expected
    assert Path(dev[0]["audio"]["path"]).name == "1000.wav"
    with pytest.raises(FileNotFoundError, match="cannot fetch FLEURS config 'xh_za'"):
        load_fleurs_split("xh_za", "train")


def test_features_are_cached_by_fingerprint_and_reused(corpus_dir, tmp_path, monkeypatch, caplog):
    import datasets

    from utils.data import DataArguments, build_processor, load_language_splits
    from utils.features import features_cache_dir, vectorize_splits

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    args = DataArguments(language="en", data_dir=str(corpus_dir / "en"), max_train_samples=40)
    raw, vocab = load_language_splits(args, resolve_language("en"))
    config = AutoConfig.from_pretrained(TINY_CONFIG)
    extractor = Wav2Vec2FeatureExtractor.from_pretrained(TINY_CONFIG)
    processor = build_processor(vocab, extractor, str(tmp_path / "p1"))
    with caplog.at_level(logging.INFO, logger="utils.features"):
        first = vectorize_splits(raw, processor, config, args)
        assert caplog.text.count("features: computing") == 3 and "features: cached" not in caplog.text
        caplog.clear()
        again = vectorize_splits(raw, build_processor(vocab, extractor, str(tmp_path / "p2")), config, args)  # a later step, same data
        assert caplog.text.count("features: cached") == 3 and "computing" not in caplog.text
    assert len(list(features_cache_dir().glob("*.arrow"))) >= 3
    for split in first:
        assert again[split]["id"] == first[split]["id"] and again[split]["labels"] == first[split]["labels"]
        assert np.array_equal(np.concatenate(again[split]["input_values"]), np.concatenate(first[split]["input_values"]))
    # Another vocabulary (so other label ids) or other clips: other features, never the cached ones.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="utils.features"):
        permuted = {char: len(vocab) - 1 - i for char, i in vocab.items()}
        vectorize_splits(raw, build_processor(permuted, extractor, str(tmp_path / "p3")), config, args)
        vectorize_splits(DatasetDict({k: v.select(range(10)) for k, v in raw.items()}), processor, config, args)
    assert caplog.text.count("features: computing") == 6


def test_unlabelled_folder_reads_for_pretraining_only(tmp_path, caplog):
    """A metadata.csv with file_name alone: pretraining reads it (empty texts, no labels, a
    minimum of output frames); fine-tuning refuses it for its missing transcription column."""
    from transformers import Wav2Vec2FeatureExtractor

    for split in ("train", "validation"):
        (tmp_path / split).mkdir()
        _tone(tmp_path / split / "long.wav", 1.0)
        _tone(tmp_path / split / "short.wav", 0.05)  # 800 samples: 2 frames of the tiny model
        (tmp_path / split / "metadata.csv").write_text("file_name\nlong.wav\nshort.wav\n")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['transcription'\]"):
        load_local_splits(str(tmp_path), ("train", "validation"))
    raw = load_local_splits(str(tmp_path), ("train", "validation"), require_text=False)
    assert set(raw) == {"train", "validation"} and raw["train"]["text"] == ["", ""]
    config = AutoConfig.from_pretrained(TINY_CONFIG)
    with caplog.at_level(logging.WARNING):
        prepared = prepare_features(raw, Wav2Vec2FeatureExtractor(), lambda n: frames_for_samples(config, n), receptive_field(config),
                                    16000 * 20, min_frames=6)
    assert prepared["train"]["id"] == ["long.wav"] and prepared["train"][0]["labels"] == []
    assert frames_for_samples(config, 800) < 6 and "1 fewer than 6 output frames" in caplog.text


def test_audiofolder_metadata_quirks_and_escapes(tmp_path, caplog):
    """A BOM, quoted commas and repeated rows are read (repeats skipped and counted); a file_name
    leading outside its split folder is refused before any audio is read."""
    root = tmp_path / "data"
    outside = tmp_path / "secret.wav"
    _tone(outside, 0.5)
    for split in ("train", "validation", "test"):
        (root / split).mkdir(parents=True)
        _tone(root / split / "a.wav", 0.5)
        with open(root / split / "metadata.csv", "w", newline="", encoding="utf-8-sig") as f:  # written with a BOM
            csv.writer(f).writerows([["file_name", "transcription"], ["a.wav", "one, two"], ["a.wav", "one, two"]])
    with caplog.at_level(logging.WARNING):
        splits = load_local_splits(str(root))
    assert splits["train"]["text"] == ["one, two"] and "skipped 1 repeated row(s)" in caplog.text
    (root / "train" / "link.wav").symlink_to(outside)
    for bad in ("../../secret.wav", str(outside), "link.wav", "sub/../../secret.wav"):
        with open(root / "train" / "metadata.csv", "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([["file_name", "transcription"], ["a.wav", "ok"], [bad, "x"]])
        with pytest.raises(ValueError, match=rf"metadata.csv line 3: file_name {re.escape(repr(bad))} leads outside .*train: expected a path inside the split folder"):
            load_local_splits(str(root))
