"""From audio to model input: feature extraction with counted skips, cached by fingerprint, the
limits a model's front end implies, and the padding collator. The model input is the family's
(``utils.structure``): raw ``input_values``, or log-mel ``input_features`` for w2v-BERT."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import soundfile
import torch
from datasets import Audio, Dataset, DatasetDict, Features, List, Value
from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Processor

from .arguments import DataArguments
from .errors import UsageError
from .structure import check_feature_extractor, frames_for_samples, front_end_key, receptive_field
from .text import SAMPLING_RATE

logger = logging.getLogger(__name__)

FEATURES_VERSION = 3  # bump when featurize changes what it writes: old cached features are then ignored


def header_seconds(audio: dict) -> Optional[float]:
    """A clip's duration from its header alone (WAV, FLAC, OGG, MP3 through libsndfile), or None
    when the header cannot tell: lets an hour-long clip be skipped without decoding it."""
    try:
        source = audio.get("path") if not audio.get("bytes") else io.BytesIO(audio["bytes"])
        return soundfile.info(source).duration if source else None
    except Exception:  # libsndfile cannot read this header: the decoder decides
        return None


def features_fingerprint(split: Dataset, processor: Union[Wav2Vec2Processor, Wav2Vec2FeatureExtractor], limits: dict) -> str:
    """What a split's features depend on: its rows (ids, texts, audio paths with their sizes and
    modification times), the tokenizer's vocabulary, the feature extractor's settings and the
    filtering limits. Equal fingerprints mean equal features, whichever step computes them."""
    tokenizer = getattr(processor, "tokenizer", None)
    digest = hashlib.sha256(json.dumps({"version": FEATURES_VERSION, "limits": limits, "vocab": tokenizer.get_vocab() if tokenizer else None,
                                        "extractor": getattr(processor, "feature_extractor", processor).to_dict()}, sort_keys=True, default=str).encode())
    audio = split.cast_column("audio", Audio(decode=False))["audio"] if "audio" in split.column_names else []
    for uid, text, item in zip(split["id"], split["text"], audio):
        path = item.get("path") or ""
        stat = os.stat(path) if path and os.path.exists(path) else None
        digest.update(json.dumps([uid, text, path, stat.st_size if stat else None, stat.st_mtime_ns if stat else None,
                                  None if stat or not item.get("bytes") else hashlib.sha256(item["bytes"]).hexdigest()]).encode())
    return digest.hexdigest()


def features_cache_dir() -> Path:
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "language-tickets-features"


def prepare_features(
    splits: DatasetDict,
    processor: Union[Wav2Vec2Processor, Wav2Vec2FeatureExtractor],
    frames_for_samples,
    min_samples: int,
    max_samples: int,
    num_proc: Optional[int] = None,
    cache_key: Optional[dict] = None,
    min_frames: int = 1,
) -> DatasetDict:
    """Decode audio (16 kHz, mono: other rates are resampled, channels averaged), extract the model's input (``input_values`` of raw-waveform families,
    log-mel ``input_features`` of w2v-BERT: whatever the extractor names first), tokenise ``labels`` and filter, logging a
    count per reason: unreadable audio (an empty or truncated file too), NaN or Inf samples, too long (from the
    header when it tells, before decoding), too short (under the receptive field ``min_samples`` or
    ``--min_duration``), too long, fewer output frames than label tokens (CTC cannot align) or
    than ``min_frames``. Given a bare feature extractor (pretraining), ``labels`` stay empty.

    With ``cache_key`` (what ``frames_for_samples`` depends on), each split's features are cached
    as an Arrow file named by its fingerprint in the datasets cache: the main process computes
    them once (the scripts wrap this in ``main_process_first``) and the other ranks, and every
    later step on the same data with the same vocabulary, load them instead."""
    decoder = Audio(sampling_rate=SAMPLING_RATE)
    extractor = getattr(processor, "feature_extractor", processor)
    tokenizer = getattr(processor, "tokenizer", None)
    input_name = extractor.model_input_names[0]
    log_mel = input_name == "input_features"
    empty = np.zeros((0, extractor.feature_size * getattr(extractor, "stride", 1)) if log_mel else 0, np.float32)

    def featurize(row):
        seconds = header_seconds(row["audio"])
        if seconds is not None and math.floor(seconds * SAMPLING_RATE) > max_samples:  # not decoded: bounded time and memory
            return {input_name: empty, "labels": [], "input_length": math.floor(seconds * SAMPLING_RATE), "skip": f"longer than {max_samples} samples"}
        try:
            array = decoder.decode_example(row["audio"])["array"]
        except Exception:  # any decoder failure means the same thing: this file cannot be used
            return {input_name: empty, "labels": [], "input_length": 0, "skip": "unreadable audio"}
        n = len(array)
        if not np.isfinite(array).all():
            return {input_name: empty, "labels": [], "input_length": n, "skip": "non-finite samples (NaN or Inf)"}
        if n < min_samples:  # too short to extract (log-mel needs two windows): skipped below
            return {input_name: empty, "labels": [], "input_length": n, "skip": f"shorter than {min_samples} samples"}
        inputs = np.asarray(extractor(array, sampling_rate=SAMPLING_RATE)[input_name][0], np.float32)
        labels = tokenizer(row["text"]).input_ids if tokenizer else []
        skip = ""
        if n > max_samples:
            skip = f"longer than {max_samples} samples"
        elif frames_for_samples(n) < len(labels):
            skip = "fewer output frames than label tokens"
        elif frames_for_samples(n) < min_frames:
            skip = f"fewer than {min_frames} output frames"
        return {input_name: inputs, "labels": labels, "input_length": n, "skip": skip}

    features = Features(
        {
            "id": Value("string"),
            "text": Value("string"),
            input_name: List(List(Value("float32"))) if log_mel else List(Value("float32")),
            "labels": List(Value("int32")),
            "input_length": Value("int64"),
            "skip": Value("string"),
        }
    )
    prepared = {}
    for name, dataset in splits.items():
        cache_file = None
        if cache_key is not None:
            limits = {"min_samples": min_samples, "max_samples": max_samples, **cache_key} | ({"min_frames": min_frames} if min_frames > 1 else {})
            fingerprint = features_fingerprint(dataset, processor, limits)
            cache_file = features_cache_dir() / f"{fingerprint}.arrow"
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            logger.info("%s features: %s (%s)", name, "cached" if cache_file.is_file() else "computing", cache_file)
        dataset = dataset.map(featurize, remove_columns=["audio"], features=features, num_proc=num_proc, desc=f"features ({name})",
                              cache_file_name=str(cache_file) if cache_file else None, load_from_cache_file=cache_file is not None,
                              new_fingerprint=cache_file.stem if cache_file else None)
        reasons = Counter(r for r in dataset["skip"] if r)
        if reasons:
            detail = ", ".join(f"{count} {reason}" for reason, count in reasons.items())
            logger.warning("%s: skipped %d of %d rows (%s)", name, sum(reasons.values()), len(dataset), detail)
        dataset = dataset.filter(lambda row: not row["skip"]).remove_columns("skip")
        if len(dataset) == 0:
            raise UsageError(f"split {name!r} has no usable rows after filtering: see the skip counts above")
        prepared[name] = dataset
    return DatasetDict(prepared)


@dataclass
class DataCollatorCTCWithPadding:
    """Pads the model input (``input_values`` or ``input_features``) with the feature extractor and
    ``labels`` with -100 (ignored by CTC)."""

    processor: Wav2Vec2Processor
    padding: Union[bool, str] = True
    pad_to_multiple_of: Optional[int] = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        name = self.processor.feature_extractor.model_input_names[0]
        inputs = [{name: f[name]} for f in features]
        labels = [{"input_ids": f["labels"]} for f in features]
        batch = self.processor.feature_extractor.pad(
            inputs, padding=self.padding, pad_to_multiple_of=self.pad_to_multiple_of, return_tensors="pt"
        )
        labels_batch = self.processor.tokenizer.pad(labels, padding=self.padding, return_tensors="pt")
        batch["labels"] = labels_batch["input_ids"].masked_fill(labels_batch["attention_mask"].ne(1), -100)
        return batch


def vectorize_splits(
    raw: DatasetDict, processor: Union[Wav2Vec2Processor, Wav2Vec2FeatureExtractor], config, args: DataArguments, min_frames: int = 1
) -> DatasetDict:
    """``prepare_features`` with the limits a model config and the duration flags imply."""
    check_feature_extractor(config, getattr(processor, "feature_extractor", processor))
    return prepare_features(
        raw,
        processor,
        frames_for_samples=lambda n: frames_for_samples(config, n),
        min_samples=max(receptive_field(config), int(args.min_duration_in_seconds * SAMPLING_RATE)),
        max_samples=int(args.max_duration_in_seconds * SAMPLING_RATE),
        num_proc=args.preprocessing_num_workers,
        cache_key=front_end_key(config),
        min_frames=min_frames,
    )
