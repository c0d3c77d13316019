"""CER and WER of greedy CTC transcripts, computed with jiwer (the library ``evaluate``'s cer/wer
wrap; ``evaluate.load`` would fetch their scripts from the Hub, which offline runs cannot)."""

from __future__ import annotations

from typing import Callable

import jiwer
import numpy as np
from transformers import EvalPrediction, Wav2Vec2Processor


def error_rates(references: list[str], hypotheses: list[str]) -> dict[str, float]:
    """Corpus-level CER and WER (total edits / total reference characters or words)."""
    return {"cer": jiwer.cer(references, hypotheses), "wer": jiwer.wer(references, hypotheses)}


def decode_predictions(pred: EvalPrediction, processor: Wav2Vec2Processor) -> tuple[list[str], list[str]]:
    """(references, hypotheses) from predicted ids and labels, both padded with -100."""
    pad = processor.tokenizer.pad_token_id
    pred_ids = np.where(pred.predictions == -100, pad, pred.predictions)
    label_ids = np.where(pred.label_ids == -100, pad, pred.label_ids)
    hypotheses = processor.batch_decode(pred_ids)
    # Labels are not CTC output: repeated letters are real ("hello"), so do not merge them.
    references = processor.batch_decode(label_ids, group_tokens=False)
    return references, hypotheses


def make_compute_metrics(processor: Wav2Vec2Processor) -> Callable[[EvalPrediction], dict[str, float]]:
    def compute_metrics(pred: EvalPrediction) -> dict[str, float]:
        return error_rates(*decode_predictions(pred, processor))

    return compute_metrics
