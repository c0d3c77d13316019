"""A small multilingual speech corpus made offline, so the whole method runs without the Hub.

Sentences of 2-5 words drawn from each language's most frequent words (``wordfreq``), spoken by
espeak-ng with a random voice variant, speed and pitch per utterance, resampled to 16 kHz, edges
trimmed, and written in the audiofolder layout users use for their own data::

    <output_dir>/<code>/{train,validation,test}/metadata.csv   (file_name,transcription,voice,speed,pitch)
    <output_dir>/<code>/{train,validation,test}/<n>.wav
    <output_dir>/<code>/corpus.json                             (the settings that made it)

Everything is seeded by (seed, language, split): the same call writes the same files. Test
sentences never repeat a training sentence. Languages with no espeak-ng voice, among them the
paper's Asturian (ast) and Xhosa (xh), cannot be generated.

    python -m utils.corpus --languages en de fr es pl ca --output_dir data/corpus
    python -m utils.corpus --mix en=0.5 de=0.25 es=0.25 --output_dir data/corpus   # + data/corpus/mul
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import random
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np
import soundfile as sf

from .errors import MissingInput, OutputConflict, UsageError
from .languages import resolve_language
from .runs import replace_dir_atomic, setup_logging, write_json_atomic
from .text import SAMPLING_RATE, normalize_text

logger = logging.getLogger(__name__)

CORPUS_VERSION = 1
MIX_VERSION = 2  # 2: clips hard-linked inside each split folder (1 pointed at ../../<language>/)
VOICE_VARIANTS = [f"m{i}" for i in range(1, 8)] + [f"f{i}" for i in range(1, 6)]
SPEED_RANGE, PITCH_RANGE, WORDS_RANGE = (130, 190), (30, 70), (2, 5)
SILENCE_THRESHOLD, EDGE_PAD_SECONDS = 0.01, 0.05


def word_list(code: str, size: int) -> list[str]:
    """The ``size`` most frequent words of a language that survive normalisation unchanged and have
    at least two letters."""
    import wordfreq

    if code not in wordfreq.available_languages():
        raise UsageError(f"no wordfreq word list for language {code!r}: expected one of {sorted(wordfreq.available_languages())}")
    words = []
    for word in wordfreq.top_n_list(code, size * 5):
        if len(word) >= 2 and normalize_text(word, code) == word and " " not in word and word not in words:
            words.append(word)
        if len(words) == size:
            return words
    raise UsageError(f"wordfreq has only {len(words)} usable words for {code!r}, fewer than the {size} asked for")


def _sentences(rng: random.Random, words: list[str], count: int, exclude: set[str]) -> list[str]:
    sentences = []
    while len(sentences) < count:
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(*WORDS_RANGE)))
        if sentence not in exclude:
            sentences.append(sentence)
    return sentences


def speak(text: str, voice: str, speed: int, pitch: int, raw_wav: str) -> None:
    """espeak-ng's own output for one clip (22,050 Hz WAV)."""
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", raw_wav, text], check=True, capture_output=True)


def trimmed_clip(raw_wav: str) -> tuple[np.ndarray, int]:
    """espeak-ng's output resampled to 16 kHz with its silent edges trimmed (a short pad kept), and
    where the clip starts in the resampled audio (in samples)."""
    from torchcodec.decoders import AudioDecoder

    audio = AudioDecoder(raw_wav, sample_rate=SAMPLING_RATE).get_all_samples().data[0].numpy()
    loud = np.flatnonzero(np.abs(audio) > SILENCE_THRESHOLD * max(np.abs(audio).max(), 1e-9))
    pad = int(EDGE_PAD_SECONDS * SAMPLING_RATE)
    if not loud.size:
        return audio, 0
    start = max(0, loud[0] - pad)
    return audio[start : loud[-1] + pad], int(start)


def synthesize(text: str, voice: str, speed: int, pitch: int, path: Path) -> None:
    """Speak ``text`` with espeak-ng, resample to 16 kHz, trim silent edges, write 16-bit PCM."""
    with tempfile.NamedTemporaryFile(suffix=".wav") as raw:
        speak(text, voice, speed, pitch, raw.name)
        audio, _ = trimmed_clip(raw.name)
    sf.write(path, audio, SAMPLING_RATE, subtype="PCM_16")


def _generate_language(code: str, split_sizes: dict[str, int], vocab_size: int, seed: int, workers: int, target: Path, settings: dict) -> None:
    language = resolve_language(code)
    if language.espeak_voice is None:
        raise UsageError(
            f"no espeak-ng voice for {language.name} ({code}): the generated corpus cannot include it; "
            "use FLEURS or your own recordings (--data_dir) for this language"
        )
    if shutil.which("espeak-ng") is None:
        raise MissingInput("espeak-ng is not installed: run `make setup` (apt-get install espeak-ng)")
    words = word_list(code, vocab_size)
    tmp = Path(f"{target}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    seen: set[str] = set()
    jobs = []
    for split, size in split_sizes.items():
        rng = random.Random(f"{seed}-{code}-{split}")
        # Validation and test sentences never repeat a training sentence.
        sentences = _sentences(rng, words, size, exclude=seen if split != "train" else set())
        if split == "train":
            seen.update(sentences)
        rows = []
        for i, sentence in enumerate(sentences):
            variant = rng.choice(VOICE_VARIANTS)
            speed, pitch = rng.randint(*SPEED_RANGE), rng.randint(*PITCH_RANGE)
            rows.append({"file_name": f"{i:06d}.wav", "transcription": sentence, "voice": f"{language.espeak_voice}+{variant}", "speed": speed, "pitch": pitch})
        (tmp / split).mkdir(parents=True)
        with open(tmp / split / "metadata.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        jobs += [(row, tmp / split / row["file_name"]) for row in rows]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(lambda job: synthesize(job[0]["transcription"], job[0]["voice"], job[0]["speed"], job[0]["pitch"], job[1]), jobs))
    write_json_atomic(tmp / "corpus.json", settings)
    replace_dir_atomic(tmp, target)


def _reusable(target: Path, settings: dict, other: str) -> bool:
    """True when ``target`` holds a corpus made with exactly ``settings`` (reuse it), False when
    it does not exist; a directory made otherwise is refused, never overwritten."""
    if not target.exists():
        return False
    if not (target / "corpus.json").is_file():
        raise OutputConflict(f"{target} exists but is not a generated corpus (no corpus.json): choose another output directory")
    existing = json.loads((target / "corpus.json").read_text(encoding="utf-8"))
    if existing != json.loads(json.dumps(settings)):
        raise OutputConflict(f"{target} holds {other} ({existing}): expected {settings}; choose another output directory")
    return True


def generate_corpus(
    output_dir: str,
    languages: list[str],
    num_train: int = 2000,
    num_eval: int = 200,
    vocab_size: int = 200,
    seed: int = 0,
    workers: Optional[int] = None,
) -> dict[str, Path]:
    """Generate (or reuse) one folder per language; returns code -> folder. A folder made with other
    settings is refused rather than overwritten."""
    split_sizes = {"train": num_train, "validation": num_eval, "test": num_eval}
    workers = workers or os.cpu_count() or 1
    out = {}
    for code in languages:
        code = resolve_language(code).code
        settings = {"version": CORPUS_VERSION, "language": code, "splits": split_sizes, "vocab_size": vocab_size, "seed": seed}
        target = Path(output_dir) / code
        if not _reusable(target, settings, "a corpus made with other settings"):
            logger.info("synthesising %s corpus (%s) in %s", code, split_sizes, target)
            _generate_language(code, split_sizes, vocab_size, seed, workers, target, settings)
        out[code] = target
    return out


def mix_corpus(
    output_dir: str, mixture: dict[str, float], num_train: int, num_eval: int, seed: int = 0, per_language: Optional[dict] = None
) -> Path:
    """A multilingual corpus ``<output_dir>/mul`` drawn from the per-language corpora (generated
    first if missing) in the proportions of ``mixture``: a stand-in for a multilingual
    pretraining set, English-heavy if you make it so. Its clips are hard links to the languages'
    own (a copy where links cannot be made) under ``<split>/<language>/``, so every ``file_name``
    stays inside its split folder as the loader requires, and little is copied. ``per_language``
    holds the ``generate_corpus`` settings of the language corpora."""
    per_language = per_language or {}
    total = sum(mixture.values())
    if not mixture or total <= 0 or any(w < 0 for w in mixture.values()):
        raise UsageError(f"mixture {mixture!r}: expected positive weights per language, e.g. en=0.5 de=0.25 es=0.25")
    sources = generate_corpus(output_dir, list(mixture), **per_language)
    settings = {"version": MIX_VERSION, "mixture": {resolve_language(k).code: v / total for k, v in mixture.items()}, "num_train": num_train, "num_eval": num_eval, "seed": seed, "sources": per_language}
    target = Path(output_dir) / "mul"
    if _reusable(target, settings, "another mixture"):
        return target
    tmp = Path(f"{target}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    rng = random.Random(f"{seed}-mix")
    for split, size in (("train", num_train), ("validation", num_eval), ("test", num_eval)):
        rows = []
        for code, weight in settings["mixture"].items():
            with open(sources[code] / split / "metadata.csv", newline="", encoding="utf-8") as f:
                available = list(csv.DictReader(f))
            (tmp / split / code).mkdir(parents=True)
            for row in rng.sample(available, min(len(available), round(weight * size))):
                _link_or_copy(sources[code] / split / row["file_name"], tmp / split / code / row["file_name"])
                rows.append({"file_name": f"{code}/{row['file_name']}", "transcription": row["transcription"], "language": code})
        rng.shuffle(rows)
        with open(tmp / split / "metadata.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["file_name", "transcription", "language"])
            writer.writeheader()
            writer.writerows(rows)
    write_json_atomic(tmp / "corpus.json", settings)
    replace_dir_atomic(tmp, target)
    return target


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(source, target)


def main() -> None:
    parser = argparse.ArgumentParser(description="Generate the offline multilingual espeak-ng corpus.")
    parser.add_argument("--languages", nargs="+", default=[])
    parser.add_argument("--mix", nargs="+", default=[], metavar="CODE=WEIGHT", help="also write <output_dir>/mul, a mixture of these languages")
    parser.add_argument("--num_mix_train", type=int, default=2000)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--num_train", type=int, default=2000)
    parser.add_argument("--num_eval", type=int, default=200, help="validation and test size each")
    parser.add_argument("--vocab_size", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    setup_logging(True)
    for code, path in generate_corpus(args.output_dir, args.languages, args.num_train, args.num_eval, args.vocab_size, args.seed).items():
        print(f"{code}: {path}")
    if args.mix:
        mixture = {}
        for item in args.mix:
            code, _, weight = item.partition("=")
            try:
                mixture[code] = float(weight)
            except ValueError:
                raise SystemExit(f"error: --mix item {item!r} is not CODE=WEIGHT") from None
        per_language = {"num_train": args.num_train, "num_eval": args.num_eval, "vocab_size": args.vocab_size, "seed": args.seed}
        print(f"mul: {mix_corpus(args.output_dir, mixture, args.num_mix_train, args.num_eval, args.seed, per_language)}")


if __name__ == "__main__":
    main()
