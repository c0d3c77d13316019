"""CER and WER of greedy CTC transcripts, computed with jiwer (the library ``evaluate``'s cer/wer
wrap; ``evaluate.load`` would fetch their scripts from the Hub, which offline runs cannot), and the
per-utterance predictions files every evaluation writes.

``predictions_<split>.jsonl`` holds one JSON object per evaluated utterance, in dataset order:
``id`` (the clip's file name, or the dataset's id), ``reference``, ``hypothesis``, ``char_edits``
and ``ref_chars`` (substitutions + deletions + insertions, and reference length, as jiwer counts
characters), ``word_edits`` and ``ref_words`` (the same for words). The split's CER is exactly
``sum(char_edits) / sum(ref_chars)`` and its WER ``sum(word_edits) / sum(ref_words)``: corpus-level
rates as jiwer computes them, so anyone can recompute, re-score or bootstrap a reported number.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import jiwer
import numpy as np
from transformers import Wav2Vec2Processor

from .errors import MissingInput, UsageError
from .runs import atomic_open

# The splits a run evaluates, by the metric prefix the Trainer gives them.
SPLIT_OF_PREFIX = {"eval": "validation", "test": "test"}


@dataclass(frozen=True)
class Utterance:
    """One evaluated utterance: its transcripts and the edit counts CER and WER are summed from."""

    id: str
    reference: str
    hypothesis: str
    char_edits: int
    ref_chars: int
    word_edits: int
    ref_words: int


def error_rates(references: list[str], hypotheses: list[str]) -> dict[str, float]:
    """Corpus-level CER and WER (total edits / total reference characters or words)."""
    return {"cer": jiwer.cer(references, hypotheses), "wer": jiwer.wer(references, hypotheses)}


def score_utterances(ids: list[str], references: list[str], hypotheses: list[str]) -> list[Utterance]:
    """Per-utterance character and word edit counts, with jiwer's alignment of each pair."""
    rows = []
    for uid, ref, hyp in zip(ids, references, hypotheses, strict=True):
        chars = jiwer.process_characters(ref, hyp)
        words = jiwer.process_words(ref, hyp)
        rows.append(
            Utterance(
                id=str(uid),
                reference=ref,
                hypothesis=hyp,
                char_edits=chars.substitutions + chars.deletions + chars.insertions,
                ref_chars=chars.substitutions + chars.deletions + chars.hits,
                word_edits=words.substitutions + words.deletions + words.insertions,
                ref_words=words.substitutions + words.deletions + words.hits,
            )
        )
    return rows


def corpus_rates(rows: list[Utterance]) -> dict[str, float]:
    """CER and WER summed over utterances: equal to ``error_rates`` on the same transcripts."""
    return {
        "cer": sum(r.char_edits for r in rows) / sum(r.ref_chars for r in rows),
        "wer": sum(r.word_edits for r in rows) / sum(r.ref_words for r in rows),
    }


def predictions_path(output_dir: str | os.PathLike, split: str) -> Path:
    return Path(output_dir) / f"predictions_{split}.jsonl"


def write_predictions(path: str | os.PathLike, rows: list[Utterance]) -> None:
    with atomic_open(path) as f:
        for row in rows:
            f.write(json.dumps(asdict(row), ensure_ascii=False) + "\n")


def read_predictions(path: str | os.PathLike, expect_cer: Optional[float] = None, expect_count: Optional[int] = None) -> list[Utterance]:
    """Read a predictions file; when the run's reported CER or sample count is given, the file
    must reproduce them exactly, else one clear error (a stale or foreign file)."""
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"{path} does not exist: expected the per-utterance predictions the run wrote beside its results")
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            try:
                rows.append(Utterance(**json.loads(line)))
            except (json.JSONDecodeError, TypeError) as err:
                raise UsageError(f"{path} line {number} is not a predictions row ({err}): expected the fields of utils.metrics.Utterance") from None
    if expect_count is not None and len(rows) != expect_count:
        raise UsageError(f"{path} holds {len(rows)} utterances but its results report {expect_count}: the files do not belong together")
    if expect_cer is not None:
        cer = corpus_rates(rows)["cer"] if rows else float("nan")
        if not np.isclose(cer, expect_cer, rtol=0, atol=1e-12):
            raise UsageError(f"{path} sums to CER {cer:.6f} but its results report {expect_cer:.6f}: the files do not belong together")
    return rows


def greedy_transcripts(pred_ids: np.ndarray, processor: Wav2Vec2Processor) -> list[str]:
    """Decode argmax CTC ids (padded with -100 across batches): merge repeats, drop blanks."""
    pad = processor.tokenizer.pad_token_id
    return processor.batch_decode(np.where(pred_ids == -100, pad, pred_ids))
