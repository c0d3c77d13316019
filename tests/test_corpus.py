import csv
import hashlib
import os

import pytest
import soundfile as sf

from utils.corpus import generate_corpus, word_list
from utils.text import normalize_text


def _digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_generation_is_deterministic(tmp_path):
    a = generate_corpus(str(tmp_path / "a"), ["de"], num_train=6, num_eval=3, vocab_size=30)["de"]
    b = generate_corpus(str(tmp_path / "b"), ["de"], num_train=6, num_eval=3, vocab_size=30)["de"]
    assert _digest(a) == _digest(b)
    assert len([k for k in _digest(a) if k.endswith(".wav")]) == 12
    c = generate_corpus(str(tmp_path / "c"), ["de"], num_train=6, num_eval=3, vocab_size=30, seed=1)["de"]
    assert _digest(a) != _digest(c)


def _rows(folder, split):
    with open(folder / split / "metadata.csv", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_corpus_layout_text_and_audio(corpus_dir):
    for code in ("en", "ca"):
        train, test = _rows(corpus_dir / code, "train"), _rows(corpus_dir / code, "test")
        assert len(train) == 240 and len(test) == 24
        assert not {r["transcription"] for r in test} & {r["transcription"] for r in train}
        for row in train[:20]:
            assert normalize_text(row["transcription"], code) == row["transcription"]
            assert 2 <= len(row["transcription"].split()) <= 5
            audio, sr = sf.read(corpus_dir / code / "train" / row["file_name"])
            assert sr == 16000 and 0.3 < len(audio) / sr < 6
        assert len({r["voice"] for r in train}) > 5  # speaker variety


def test_reuse_and_refusals(corpus_dir, tmp_path):
    before = _digest(corpus_dir / "en")
    generate_corpus(str(corpus_dir), ["en"], num_train=240, num_eval=24, vocab_size=60)  # reused as is
    assert _digest(corpus_dir / "en") == before
    with pytest.raises(FileExistsError, match="other settings"):
        generate_corpus(str(corpus_dir), ["en"], num_train=10, num_eval=2, vocab_size=60)
    assert _digest(corpus_dir / "en") == before
    for code, name in (("ast", "Asturian"), ("xh", "Xhosa")):
        with pytest.raises(ValueError, match=f"no espeak-ng voice for {name}"):
            generate_corpus(str(tmp_path), [code])


def test_word_lists_are_clean():
    words = word_list("fr", 100)
    assert len(words) == len(set(words)) == 100
    assert all(len(w) >= 2 and normalize_text(w, "fr") == w for w in words)


def test_mixture_draws_the_asked_proportions_with_links_inside_its_folders(corpus_dir):
    from utils.corpus import mix_corpus
    from utils.data import load_local_splits

    per_language = {"num_train": 240, "num_eval": 24, "vocab_size": 60}
    mul = mix_corpus(str(corpus_dir), {"en": 3, "ca": 1}, num_train=100, num_eval=20, per_language=per_language)
    rows = _rows(mul, "train")
    assert len(rows) == 100 and sum(r["language"] == "en" for r in rows) == 75
    assert len({r["file_name"] for r in rows}) == 100  # drawn without replacement
    for row in rows[:10]:  # hard links to the languages' own clips, inside the mixture's split folder
        clip, source = mul / "train" / row["file_name"], corpus_dir / row["language"] / "train" / row["file_name"].split("/", 1)[1]
        assert not row["file_name"].startswith(("/", "..")) and os.path.samefile(clip, source)
    splits = load_local_splits(str(mul))  # and the loader finds every one of them
    assert len(splits["train"]) == 100 and len(splits["test"]) == 20
    again = mix_corpus(str(corpus_dir), {"en": 3, "ca": 1}, num_train=100, num_eval=20, per_language=per_language)
    assert _rows(again, "train") == rows
    with pytest.raises(FileExistsError, match="holds another mixture"):
        mix_corpus(str(corpus_dir), {"en": 1, "ca": 1}, num_train=100, num_eval=20, per_language=per_language)
