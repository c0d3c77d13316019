"""Speech data for CTC: where a language's splits come from (FLEURS, any Hub dataset, a local
audiofolder, the generated corpus), their normalised text and the character vocabulary built from
the training split only. Features and the collator are ``utils.features``'s.

Every source ends as a ``DatasetDict`` with splits ``train``/``validation``/``test`` and three
columns: ``id`` (the clip's file name, or the dataset's own id: what per-utterance predictions are
keyed by), ``audio`` (an ``Audio(sampling_rate=16000, decode=False)`` feature, decoded row by row in
``prepare_features`` so that one unreadable file is a counted skip rather than a crash) and ``text``.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from datasets import Audio, Dataset, DatasetDict, load_dataset
from huggingface_hub import hf_hub_download
from transformers import Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2Processor

from .arguments import FLEURS_REPO, GENERATED, DataArguments
from .errors import MissingInput, UsageError, is_disk_full
from .languages import Language
from .runs import atomic_open, replace_dir_atomic
from .text import PAD, SAMPLING_RATE, UNK, WORD_DELIMITER, build_vocab, normalize_text, unseen_chars

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")


# ---------------------------------------------------------------------------------------------
# Text


def build_processor(vocab: dict[str, int], feature_extractor: Wav2Vec2FeatureExtractor, save_dir: str) -> Wav2Vec2Processor:
    """A processor whose tokenizer holds ``vocab``; written to ``save_dir`` (vocab.json included)."""
    os.makedirs(save_dir, exist_ok=True)
    vocab_path = os.path.join(save_dir, "vocab.json")
    with atomic_open(vocab_path) as f:
        json.dump(vocab, f, ensure_ascii=False, indent=1)
    tokenizer = Wav2Vec2CTCTokenizer(vocab_path, unk_token=UNK, pad_token=PAD, word_delimiter_token=WORD_DELIMITER)
    processor = Wav2Vec2Processor(feature_extractor=feature_extractor, tokenizer=tokenizer)
    processor.save_pretrained(save_dir)
    return processor


# ---------------------------------------------------------------------------------------------
# Sources


@dataclass(frozen=True)
class DatasetReference:
    """The split a model was scored on, in the Hub's model-index terms: ``type`` is the dataset's
    Hub id (``audiofolder`` or ``generated`` for local data, whose paths never leave the machine),
    ``name`` what a reader sees, ``config`` the dataset config (or the language), ``split`` the
    source's split name."""

    type: str
    name: str
    config: Optional[str]
    split: str


def source_split_name(args: DataArguments, split: str) -> str:
    """The Hub source's own name of ``split`` (train, validation, test): FLEURS calls validation ``dev``."""
    default_validation = "dev" if args.dataset_name == FLEURS_REPO else "validation"
    return {"train": args.train_split_name, "validation": args.eval_split_name or default_validation, "test": args.test_split_name}[split]


def dataset_reference(args: DataArguments, language: Language, split: str = "test") -> DatasetReference:
    """Where ``split`` of ``language`` came from (as ``load_raw_splits`` reads it), without naming a local path."""
    if args.data_dir:
        return DatasetReference("audiofolder", "local audio folder", language.code, split)
    if args.dataset_name == GENERATED:
        return DatasetReference("generated", "language-tickets generated espeak-ng corpus", language.code, split)
    if args.dataset_name == FLEURS_REPO:
        return DatasetReference(FLEURS_REPO, "FLEURS", args.dataset_config_name or language.fleurs, source_split_name(args, split))
    return DatasetReference(args.dataset_name, args.dataset_name, args.dataset_config_name, source_split_name(args, split))


def load_raw_splits(args: DataArguments, language: Language, wanted: tuple[str, ...] = SPLITS, require_text: bool = True) -> DatasetDict:
    """The ``wanted`` splits of ``language`` from the source ``args`` names, as ``audio`` + ``text``.
    Without ``require_text`` (self-supervised pretraining) a source may lack transcripts."""
    if args.data_dir:
        out = load_local_splits(args.data_dir, wanted, require_text)
    elif args.dataset_name == GENERATED:
        from .corpus import generate_corpus

        corpus_dir = os.path.expanduser(args.generated_corpus_dir)
        generate_corpus(corpus_dir, [language.code], args.generated_num_train, args.generated_num_eval)
        out = load_local_splits(os.path.join(corpus_dir, language.code), wanted)
    elif args.dataset_name == FLEURS_REPO:
        config = args.dataset_config_name or language.fleurs
        out = DatasetDict({split: load_fleurs_split(config, source_split_name(args, split), args.dataset_revision) for split in wanted})
    else:
        out = load_hub_splits(args, language, wanted, require_text)
    limits = {"train": args.max_train_samples, "validation": args.max_eval_samples, "test": args.max_test_samples}
    for split, limit in limits.items():
        if limit is not None and split in out:
            out[split] = out[split].select(range(min(limit, len(out[split]))))
    return out


def _audio_text_dataset(paths: list[str], texts: list[str], ids: list[str]) -> Dataset:
    dataset = Dataset.from_dict({"id": ids, "audio": paths, "text": texts})
    return dataset.cast_column("audio", Audio(sampling_rate=SAMPLING_RATE, decode=False))


def load_local_splits(data_dir: str, wanted: tuple[str, ...] = SPLITS, require_text: bool = True) -> DatasetDict:
    """An audiofolder-layout directory: ``<split>/metadata.csv`` (UTF-8, a BOM allowed) with
    ``file_name`` and ``transcription`` columns (``file_name`` alone without ``require_text``),
    audio paths relative to the split folder. A ``file_name`` that leaves the split folder
    (absolute, ``..``, or a symlink pointing outside) is refused before any audio is read; rows whose
    audio file is missing, and repeated rows, are skipped and counted."""
    root = Path(data_dir)
    if not root.is_dir():
        raise MissingInput(f"--data_dir {data_dir!r} is not a directory: expected train/ validation/ test/ inside")
    splits = {}
    for split in wanted:
        metadata = root / split / "metadata.csv"
        if not metadata.is_file():
            raise MissingInput(f"missing {metadata}: --data_dir needs {'/, '.join(wanted)}/ each with metadata.csv")
        with open(metadata, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            missing_columns = ({"file_name", "transcription"} if require_text else {"file_name"}) - set(reader.fieldnames or ())
            if missing_columns:
                raise UsageError(f"{metadata} lacks column(s) {sorted(missing_columns)}: expected file_name,transcription")
            rows = list(reader)
        paths, texts, ids, missing, repeated = [], [], [], [], 0
        folder, seen = (root / split).resolve(), set()
        for number, row in enumerate(rows, 2):
            path = root / split / (row["file_name"] or "")
            if Path(row["file_name"] or "").is_absolute() or not path.resolve().is_relative_to(folder):
                raise UsageError(f"{metadata} line {number}: file_name {row['file_name']!r} leads outside {root / split}: expected a path inside the split folder")
            if (row["file_name"], row.get("transcription")) in seen:
                repeated += 1
                continue
            seen.add((row["file_name"], row.get("transcription")))
            if path.is_file():
                paths.append(str(path))
                texts.append(row.get("transcription") or "")
                ids.append(row["file_name"])
            else:
                missing.append(row["file_name"])
        if missing:
            logger.warning("%s: skipped %d of %d rows whose audio file is missing (e.g. %s)", metadata, len(missing), len(rows), missing[0])
        if repeated:
            logger.warning("%s: skipped %d repeated row(s)", metadata, repeated)
        splits[split] = _audio_text_dataset(paths, texts, ids)
    return DatasetDict(splits)


def load_fleurs_split(config: str, split: str, revision: Optional[str] = None) -> Dataset:
    """One FLEURS split read from the raw files of the ``google/fleurs`` Hub repo (datasets 4+ no
    longer runs its loading script): ``data/<config>/<split>.tsv`` and
    ``data/<config>/audio/<split>.tar.gz``, fetched and cached by ``hf_hub_download``, the archive
    extracted once next to the dataset cache.

    TSV columns (no header): id, file name, raw transcription, normalised transcription,
    phonemes, number of samples, gender.
    """
    try:
        tsv = hf_hub_download(FLEURS_REPO, f"data/{config}/{split}.tsv", repo_type="dataset", revision=revision)
        archive = hf_hub_download(FLEURS_REPO, f"data/{config}/audio/{split}.tar.gz", repo_type="dataset", revision=revision)
    except Exception as err:  # huggingface_hub raises several types; all mean "not there"
        raise MissingInput(
            f"cannot fetch FLEURS config {config!r} split {split!r} from {FLEURS_REPO}: {type(err).__name__}: {err}"
        ) from err
    audio_dir = _extract_once(archive)
    by_name = {p.name: p for p in audio_dir.rglob("*.wav")}
    paths, texts, ids, missing = [], [], [], 0
    with open(tsv, encoding="utf-8") as f:
        for line in f:
            columns = line.rstrip("\n").split("\t")
            if len(columns) < 4:
                continue
            path = by_name.get(columns[1])
            if path is None:
                missing += 1
                continue
            paths.append(str(path))
            texts.append(columns[3])
            ids.append(columns[1])
    if missing:
        logger.warning("FLEURS %s/%s: skipped %d rows whose audio is not in the archive", config, split, missing)
    return _audio_text_dataset(paths, texts, ids)


def _check_members(archive: str, tar: tarfile.TarFile) -> None:
    """An audio archive holds regular files and folders under relative paths, nothing else: a
    member with an absolute path, a ``..`` part, a link or a device refuses the whole archive
    before anything is written."""
    for member in tar:
        parts = member.name.replace("\\", "/").split("/")
        if member.name.startswith(("/", "\\")) or ".." in parts:
            raise UsageError(f"archive {archive} holds {member.name!r}, which leads outside its folder: refused, nothing extracted")
        if not (member.isfile() or member.isdir()):
            kind = "a link" if member.issym() or member.islnk() else "a device or special file"
            raise UsageError(f"archive {archive} holds {member.name!r}, {kind}: expected regular audio files only; refused, nothing extracted")


def _extract_once(archive: str) -> Path:
    """Extract ``archive`` beside the resolved cache blob, atomically, and reuse it afterwards. Its
    members are checked first (``_check_members``); tarfile's ``data`` filter guards the extraction too."""
    target = Path(os.path.realpath(archive) + ".extracted")
    if not target.is_dir():
        tmp = Path(f"{target}.tmp-{os.getpid()}")
        try:
            with tarfile.open(archive) as tar:
                _check_members(archive, tar)
                tmp.mkdir(parents=True, exist_ok=True)
                tar.extractall(tmp, filter="data")
        except BaseException as err:  # nothing half-extracted stays behind
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(err, (tarfile.TarError, EOFError, zlib.error)) or (isinstance(err, OSError) and not is_disk_full(err)):
                raise UsageError(f"archive {archive} cannot be extracted ({type(err).__name__}: {err}): the download is corrupted, "
                                 "delete it and re-run") from err
            raise
        replace_dir_atomic(tmp, target)
    return target


def load_hub_splits(args: DataArguments, language: Language, wanted: tuple[str, ...] = SPLITS, require_text: bool = True) -> DatasetDict:
    """Any Hub dataset that ``load_dataset`` reads (Parquet, audiofolder, Common Voice...)."""
    splits = {}
    for split in wanted:
        name = source_split_name(args, split)
        try:
            dataset = load_dataset(args.dataset_name, args.dataset_config_name, split=name, revision=args.dataset_revision)
        except (FileNotFoundError, ConnectionError) as err:  # no such dataset, config or split; unreachable
            raise MissingInput(f"cannot load split {name!r} of dataset {args.dataset_name!r}"
                               f"{f' (config {args.dataset_config_name!r})' if args.dataset_config_name else ''}: {' '.join(str(err).split())}") from None
        if not require_text and args.text_column_name not in dataset.column_names:
            dataset = dataset.add_column(args.text_column_name, [""] * len(dataset))
        for column in (args.audio_column_name, args.text_column_name):
            if column not in dataset.column_names:
                raise UsageError(
                    f"{args.dataset_name} split {name!r} has no column {column!r}: columns are {dataset.column_names} "
                    "(set --audio_column_name / --text_column_name)"
                )
        ids = _hub_ids(dataset, args.audio_column_name)
        dataset = dataset.select_columns([args.audio_column_name, args.text_column_name])
        dataset = dataset.rename_columns({args.audio_column_name: "audio", args.text_column_name: "text"})
        dataset = dataset.add_column("id", ids)
        splits[split] = dataset.cast_column("audio", Audio(sampling_rate=SAMPLING_RATE, decode=False))
    return DatasetDict(splits)


def _hub_ids(dataset: Dataset, audio_column: str) -> list[str]:
    """Utterance ids of a Hub split: its ``id`` or ``path`` column, else the audio file names,
    else the row numbers; row numbers too when those are not unique."""
    for column in ("id", "path"):
        if column in dataset.column_names:
            ids = [str(v) for v in dataset[column]]
            break
    else:
        audio = dataset.cast_column(audio_column, Audio(decode=False))[audio_column]
        ids = [os.path.basename(a.get("path") or "") for a in audio]
    return ids if all(ids) and len(set(ids)) == len(ids) else [str(i) for i in range(len(dataset))]


# ---------------------------------------------------------------------------------------------
# Preprocessing


def normalize_splits(splits: DatasetDict, language: Language, chars_to_ignore: Optional[list[str]] = None) -> DatasetDict:
    """Normalise every transcript and drop (counting) the ones left empty."""
    splits = splits.map(lambda row: {"text": normalize_text(row["text"], language.code, chars_to_ignore)})
    for name in list(splits):
        before = len(splits[name])
        splits[name] = splits[name].filter(lambda row: len(row["text"]) > 0)
        if len(splits[name]) < before:
            logger.warning("%s: skipped %d of %d rows with an empty transcript", name, before - len(splits[name]), before)
        if len(splits[name]) == 0:
            raise UsageError(f"split {name!r} has no usable rows: expected non-empty transcripts with readable audio")
    return splits


def load_language_splits(args: DataArguments, language: Language) -> tuple[DatasetDict, dict[str, int]]:
    """The normalised splits of ``language`` and the character vocabulary of its training split;
    characters that only validation/test contain are logged (they become ``[UNK]``)."""
    raw = normalize_splits(load_raw_splits(args, language), language, args.chars_to_ignore)
    vocab = build_vocab(raw["train"]["text"])
    for split in ("validation", "test"):
        missing = unseen_chars(raw[split]["text"], vocab)
        if missing:
            logger.warning("%s: %d characters not in the training vocabulary map to [UNK]: %s", split, sum(missing.values()), dict(missing.most_common(10)))
    return raw, vocab
