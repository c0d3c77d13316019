"""Trainer pieces shared by the recipes: training-argument defaults that follow the paper, and a
Trainer whose predictions are greedy CTC ids cut to each clip's real length."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from transformers import Trainer, TrainingArguments


@dataclass
class CTCTrainingArguments(TrainingArguments):
    """``TrainingArguments`` (every flag still passes through) with defaults for CTC fine-tuning:
    evaluate and save every epoch, keep the checkpoint with the lowest eval CTC loss as the paper
    does, and batch clips of similar length together."""

    do_train: bool = field(default=True, metadata={"help": "Train (pass --do_train False to only evaluate)."})
    eval_strategy: str = field(default="epoch", metadata={"help": "When to evaluate: no, steps, epoch."})
    save_strategy: str = field(default="epoch", metadata={"help": "When to checkpoint: no, steps, epoch, best."})
    load_best_model_at_end: bool = field(default=True, metadata={"help": "Restore the best checkpoint at the end."})
    metric_for_best_model: Optional[str] = field(default="eval_loss", metadata={"help": "Metric that picks the best checkpoint."})
    greater_is_better: Optional[bool] = field(default=False, metadata={"help": "Whether a higher metric is better."})
    save_total_limit: Optional[int] = field(default=2, metadata={"help": "Checkpoints kept (the best is always kept)."})
    train_sampling_strategy: str = field(default="group_by_length", metadata={"help": "random, sequential, group_by_length, ..."})
    length_column_name: str = field(default="input_length", metadata={"help": "Precomputed lengths for length grouping."})


class CTCTrainer(Trainer):
    """Returns argmax ids instead of logits from ``prediction_step``, with the frames that only
    exist because of batch padding set to the blank: small models do not predict blank there, and
    decoding them corrupts CER (measured 0.71 batched vs 0.54 one by one). Also saves gathering
    full logits across processes."""

    def prediction_step(
        self, model: torch.nn.Module, inputs: dict[str, Any], prediction_loss_only: bool, ignore_keys: Optional[list[str]] = None
    ):
        loss, logits, labels = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        if logits is None:
            return loss, logits, labels
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        pred_ids = logits.argmax(dim=-1)
        attention_mask = inputs.get("attention_mask")
        if attention_mask is not None:
            core = self.accelerator.unwrap_model(model)
            lengths = core._get_feat_extract_output_lengths(attention_mask.sum(-1)).to(pred_ids.device)
            frames = torch.arange(pred_ids.shape[1], device=pred_ids.device)
            pred_ids = pred_ids.masked_fill(frames[None, :] >= lengths[:, None], core.config.pad_token_id)
        return loss, pred_ids, labels
