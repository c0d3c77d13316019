"""CER and WER of greedy CTC transcripts, computed with jiwer (the library ``evaluate``'s cer/wer
wrap; ``evaluate.load`` would fetch their scripts from the Hub, which offline runs cannot)."""

from __future__ import annotations

import jiwer
import numpy as np
from transformers import Wav2Vec2Processor


def error_rates(references: list[str], hypotheses: list[str]) -> dict[str, float]:
    """Corpus-level CER and WER (total edits / total reference characters or words)."""
    return {"cer": jiwer.cer(references, hypotheses), "wer": jiwer.wer(references, hypotheses)}


def greedy_transcripts(pred_ids: np.ndarray, processor: Wav2Vec2Processor) -> list[str]:
    """Decode argmax CTC ids (padded with -100 across batches): merge repeats, drop blanks."""
    pad = processor.tokenizer.pad_token_id
    return processor.batch_decode(np.where(pred_ids == -100, pad, pred_ids))
