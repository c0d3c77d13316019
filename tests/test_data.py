import csv
import io
import json
import logging
import math
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from datasets import DatasetDict
from transformers import AutoConfig, Wav2Vec2FeatureExtractor

from tests.conftest import TINY_CONFIG, make_fleurs_repo
from utils.data import build_processor, load_fleurs_split, load_local_splits, normalize_splits
from utils.errors import UsageError
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


def _hostile_clips(folder: Path) -> dict[str, str]:
    """Every kind of awkward audio file a shared corpus holds; name -> what must become of it."""
    rng = np.random.default_rng(0)
    tone = (0.3 * np.sin(2 * np.pi * 220 * np.arange(16000) / 16000)).astype(np.float32)
    sf.write(folder / "empty.wav", np.zeros(0, np.float32), 16000)
    for name, bad in (("nan.wav", np.nan), ("inf.wav", np.inf)):
        clip = tone.copy()
        clip[rng.integers(16000)] = bad
        sf.write(folder / name, clip, 16000, subtype="FLOAT")
    sf.write(folder / "u8.wav", tone, 16000, subtype="PCM_U8")
    sf.write(folder / "stereo.wav", np.stack([tone, -0.5 * tone], axis=1), 16000)
    sf.write(folder / "48k.wav", (0.3 * np.sin(2 * np.pi * 220 * np.arange(48000) / 48000)), 48000)
    sf.write(folder / "ok.wav", tone, 16000)
    whole = (folder / "ok.wav").read_bytes()
    (folder / "header.wav").write_bytes(whole[:30])  # truncated inside the header
    (folder / "cut.wav").write_bytes(whole[:8044])  # truncated data: the first 0.25 s decode
    sf.write(folder / "hour.wav", np.zeros(8000 * 3600, np.float32), 8000, subtype="PCM_U8")  # an hour, 29 MB
    return {"empty.wav": "unreadable audio", "header.wav": "unreadable audio", "nan.wav": "non-finite samples (NaN or Inf)",
            "inf.wav": "non-finite samples (NaN or Inf)", "hour.wav": "longer than 320000 samples",
            "u8.wav": "", "stereo.wav": "", "48k.wav": "", "ok.wav": "", "cut.wav": ""}


def test_hostile_audio_is_decoded_resampled_or_skipped_and_counted(tmp_path, caplog):
    root = tmp_path / "data"
    for split in ("train", "validation", "test"):
        (root / split).mkdir(parents=True)
        fate = _hostile_clips(root / split)
        _write_split(root, split, [(name, "a clip") for name in fate])
    raw = normalize_splits(load_local_splits(str(root)), resolve_language("en"))
    processor = _processor(tmp_path, raw["train"]["text"])
    config = AutoConfig.from_pretrained(TINY_CONFIG)
    with caplog.at_level(logging.WARNING):
        prepared = prepare_features(raw, processor, lambda n: frames_for_samples(config, n), receptive_field(config), 16000 * 20)
    kept = {row["id"]: row for row in prepared["train"]}
    assert set(kept) == {name for name, why in fate.items() if not why}
    assert "skipped 5 of 10 rows (2 unreadable audio, 2 non-finite samples (NaN or Inf), 1 longer than 320000 samples)" in caplog.text
    extractor = processor.feature_extractor
    tone = sf.read(root / "train" / "ok.wav", dtype="float32")[0]
    expect = lambda clip: np.asarray(extractor(clip, sampling_rate=16000)["input_values"][0], np.float32)  # noqa: E731
    stereo = sf.read(root / "train" / "stereo.wav", dtype="float32")[0]
    np.testing.assert_allclose(kept["stereo.wav"]["input_values"], expect(stereo.mean(axis=1)), atol=1e-4)  # channels averaged
    np.testing.assert_allclose(kept["u8.wav"]["input_values"], expect(tone), atol=0.05)  # 8-bit: the same tone, quantised
    assert kept["48k.wav"]["input_length"] == 16000  # resampled from 48 kHz
    np.testing.assert_allclose(kept["48k.wav"]["input_values"][100:-100], expect(tone)[100:-100], atol=0.01)
    assert kept["cut.wav"]["input_length"] == 4000 and np.isfinite(kept["cut.wav"]["input_values"]).all()


def test_a_training_run_over_hostile_audio_finishes(tmp_path, corpus_dir):
    from tests.conftest import FAST, run_in_process

    root = tmp_path / "data"
    for split in ("train", "validation", "test"):
        (root / split).mkdir(parents=True)
        fate = _hostile_clips(root / split)
        with open(corpus_dir / "en" / split / "metadata.csv", encoding="utf-8") as f:
            good = list(csv.DictReader(f))[:16]
        for row in good:
            (root / split / row["file_name"]).hardlink_to(corpus_dir / "en" / split / row["file_name"])
        _write_split(root, split, [(name, "a clip") for name in fate] + [(r["file_name"], r["transcription"]) for r in good])
    out = tmp_path / "ft"
    code = run_in_process("run_finetune.py", ["--language", "en", "--data_dir", str(root), "--output_dir", str(out), *FAST, "--max_steps", "3",
                                              "--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "False"])
    assert code == 0
    results = json.loads((out / "all_results.json").read_text())
    assert results["train_samples"] == 21 and results["test_samples"] == 21 and math.isfinite(results["train_loss"])


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


def _hostile_tar(member: "tarfile.TarInfo", data: bytes = b"") -> bytes:
    """A FLEURS-shaped dev archive: one good clip, then ``member``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        good = tarfile.TarInfo("dev/1000.wav")
        good.size = 4
        tar.addfile(good, io.BytesIO(b"RIFF"))
        tar.addfile(member, io.BytesIO(data) if member.isfile() else None)
    return buf.getvalue()


def _member(name, kind=tarfile.REGTYPE, target=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, target, 5 if kind == tarfile.REGTYPE else 0
    return info


@pytest.mark.parametrize("member, message", [
    (_member("../../evil.wav"), "which leads outside its folder"),
    (_member("dev/../../../evil.wav"), "which leads outside its folder"),
    (_member("/tmp/evil.wav"), "which leads outside its folder"),
    (_member("dev/link.wav", tarfile.SYMTYPE, "/etc/passwd"), "'dev/link.wav', a link"),
    (_member("dev/hard.wav", tarfile.LNKTYPE, "../../outside"), "'dev/hard.wav', a link"),
    (_member("dev/null.wav", tarfile.CHRTYPE), "a device or special file"),
    (_member("dev/fifo.wav", tarfile.FIFOTYPE), "a device or special file"),
])
def test_hostile_fleurs_archives_write_nothing_outside_their_folder(tmp_path, monkeypatch, member, message):
    import huggingface_hub.constants as hub_constants

    from tests.hub_cache import add_offline_repo

    hub = tmp_path / "deep" / "er" / "hub"  # '../../evil.wav' from the extraction folder would land inside tmp_path
    tsv = "0\t1000.wav\tA.\ta\tx\t16000\tFEMALE\n".encode()
    add_offline_repo(hub, "google/fleurs", "dataset", {"data/ca_es/dev.tsv": tsv, "data/ca_es/audio/dev.tar.gz": _hostile_tar(member, b"evil!")})
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    before = {p for p in tmp_path.rglob("*")}
    with pytest.raises(UsageError) as err:
        load_fleurs_split("ca_es", "dev")
    assert message in str(err.value) and "refused, nothing extracted" in str(err.value) and "\n" not in str(err.value)
    after = {p for p in tmp_path.rglob("*")}
    assert after == before  # nothing written anywhere: no extracted folder, no half-extracted temp folder
    assert not Path("/tmp/evil.wav").exists()


def test_a_corrupted_archive_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    from tests.hub_cache import add_offline_repo

    good = _hostile_tar(_member("dev/1001.wav"), b"abcde")
    add_offline_repo(tmp_path / "hub", "google/fleurs", "dataset", {"data/ca_es/dev.tsv": b"0\t1000.wav\tA.\ta\n",
                                                                    "data/ca_es/audio/dev.tar.gz": good[: len(good) // 2]})
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UsageError, match="cannot be extracted .*the download is corrupted"):
        load_fleurs_split("ca_es", "dev")
    assert not [p for p in (tmp_path / "hub").rglob("*") if ".extracted" in p.name]


def test_features_are_cached_by_fingerprint_and_reused(corpus_dir, tmp_path, monkeypatch, caplog):
    import datasets

    from utils.arguments import DataArguments
    from utils.data import build_processor, load_language_splits
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
