"""wav2vec 2.0 self-supervised pretraining as transformers implements it (``Wav2Vec2ForPreTraining``),
in Trainer pieces: the collator that masks time steps and samples negatives, seeded; the Trainer
that normalises the loss by the number of masked frames and logs what the objective is made of;
the callback that decays the Gumbel temperature of the quantiser.

The logged measures: ``contrastive_loss`` and ``diversity_loss`` per masked frame,
``codevector_perplexity`` (how many codevectors the quantiser uses; it starts near their number
and a collapse toward 1 means the quantiser has degenerated), and ``contrastive_accuracy``: how
often the true quantised target scores above every sampled negative (chance is 1/(K+1)).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices, _sample_negative_indices

from .preemption import MidEpochResumeMixin
from .training import SuiteCardMixin, WholeCheckpointsMixin, keep_checkpoints_field

SSL_MEASURES = ("contrastive_loss", "diversity_loss", "codevector_perplexity", "contrastive_accuracy")


@dataclass
class PretrainingArguments(TrainingArguments):
    """``TrainingArguments`` (every flag passes through) with defaults for pretraining: evaluate and
    save every epoch, keep the last checkpoint (the loss changes meaning as the Gumbel temperature
    falls, so "lowest eval loss" is not a model choice), batch clips of similar length, and the
    Gumbel temperature schedule of the wav2vec 2.0 paper (2 -> 0.5, x0.999995 per update)."""

    do_train: bool = field(default=True, metadata={"help": "Train."})
    eval_strategy: str = field(default="epoch", metadata={"help": "When to evaluate: no, steps, epoch."})
    save_strategy: str = field(default="epoch", metadata={"help": "When to checkpoint: no, steps, epoch."})
    save_total_limit: Optional[int] = field(default=2, metadata={"help": "Checkpoints kept."})
    train_sampling_strategy: str = field(default="group_by_length", metadata={"help": "random, sequential, group_by_length, ..."})
    length_column_name: str = field(default="input_length", metadata={"help": "Precomputed lengths for length grouping."})
    max_gumbel_temperature: float = field(default=2.0, metadata={"help": "Gumbel softmax temperature at step 0."})
    min_gumbel_temperature: float = field(default=0.5, metadata={"help": "Floor of the Gumbel softmax temperature."})
    gumbel_temperature_decay: float = field(default=0.999995, metadata={"help": "Temperature factor per optimizer update."})
    keep_checkpoints: bool = keep_checkpoints_field()


def gumbel_temperature(args: PretrainingArguments, step: int) -> float:
    """The temperature after ``step`` updates: max * decay**step, floored at min."""
    return max(args.max_gumbel_temperature * args.gumbel_temperature_decay**step, args.min_gumbel_temperature)


class GumbelTemperatureCallback(TrainerCallback):
    """Sets the quantiser's temperature from the global step before every update, so a resumed run
    continues the schedule where it stopped."""

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        model.set_gumbel_temperature(gumbel_temperature(args, state.global_step))

    on_train_begin = on_step_begin


@dataclass
class DataCollatorForWav2Vec2Pretraining:
    """Pads ``input_values`` and adds ``mask_time_indices`` (spans of ``mask_time_length`` frames
    covering about ``mask_time_prob`` of each clip's real frames) and ``sampled_negative_indices``
    (``num_negatives`` distractors per frame, drawn from the same clip's real frames, never the
    frame itself). Padding frames are never masked nor drawn.

    The draws are seeded by (seed, epoch, the batch's audio): the same batch gets the same masks
    in any run or resume, and new ones in a new epoch (``epoch`` is set by the Trainer below). The
    model gets the attention mask only when its feature extractor asks for one, as in fine-tuning.
    transformers' helpers draw from numpy's global generator, whose state is restored after."""

    model: Any  # the Wav2Vec2ForPreTraining model: its conv arithmetic maps samples to frames
    feature_extractor: Any
    mask_time_prob: float
    mask_time_length: int
    mask_time_min_masks: int = 2
    num_negatives: int = 100
    seed: int = 0
    epoch: int = 0
    pad_to_multiple_of: Optional[int] = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.feature_extractor.pad(
            [{"input_values": f["input_values"]} for f in features],
            padding=True,
            pad_to_multiple_of=self.pad_to_multiple_of,
            return_attention_mask=True,
            return_tensors="pt",
        )
        frames = int(self.model._get_feat_extract_output_lengths(batch["input_values"].shape[-1]))
        frame_mask = self.model._get_feature_vector_attention_mask(frames, batch["attention_mask"], add_adapter=False)
        shape = (len(features), frames)
        state = np.random.get_state()
        try:
            np.random.seed(self._draw_seed(batch["input_values"]))
            mask = _compute_mask_indices(
                shape, self.mask_time_prob, self.mask_time_length, attention_mask=frame_mask, min_masks=self.mask_time_min_masks
            )
            negatives = _sample_negative_indices(shape, self.num_negatives, mask_time_indices=frame_mask.numpy())
        finally:
            np.random.set_state(state)
        batch["mask_time_indices"] = torch.tensor(mask, dtype=torch.bool) & frame_mask.bool()
        batch["sampled_negative_indices"] = torch.tensor(negatives, dtype=torch.long)
        if not getattr(self.feature_extractor, "return_attention_mask", True):
            del batch["attention_mask"]  # group-norm models (wav2vec2-base) are trained on zero padding, without one
        return batch

    def _draw_seed(self, input_values: torch.Tensor) -> int:
        digest = hashlib.blake2b(f"{self.seed}-{self.epoch}".encode(), digest_size=4)
        digest.update(input_values.numpy().tobytes())
        return int.from_bytes(digest.digest(), "little")


def contrastive_accuracy(outputs, negative_indices: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked frames whose true quantised target is more similar to the prediction than every
    sampled negative (negatives equal to the target do not count), as a count."""
    predicted, quantized = outputs.projected_states, outputs.projected_quantized_states
    batch, frames, dim = quantized.shape
    negatives = quantized.reshape(-1, dim)[negative_indices.reshape(-1)].reshape(batch, frames, -1, dim)
    positive = torch.cosine_similarity(predicted.float(), quantized.float(), dim=-1)
    negative = torch.cosine_similarity(predicted.float()[:, :, None], negatives.float(), dim=-1)
    negative = negative.masked_fill((negatives == quantized[:, :, None]).all(-1), float("-inf"))
    return ((positive > negative.max(-1).values) & mask).sum()


class PretrainingTrainer(WholeCheckpointsMixin, SuiteCardMixin, MidEpochResumeMixin, Trainer):
    """A Trainer for ``Wav2Vec2ForPreTraining``: the loss of each batch divided by its number of
    masked frames (the objective's own normalisation: the model returns sums), evaluation loss
    computed the same way, and the measures of ``SSL_MEASURES`` logged as means over the batches
    since the last log (training: this process's batches; evaluation: all processes')."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False  # our loss is already normalised: divide by accumulation steps
        self._sums = {"train": torch.zeros(len(SSL_MEASURES) + 1), "eval": torch.zeros(len(SSL_MEASURES) + 1)}
        self.add_callback(GumbelTemperatureCallback())
        self.add_callback(_CollatorEpoch(self))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        masked = inputs["mask_time_indices"].sum().clamp(min=1)
        loss = outputs.loss / masked
        with torch.no_grad():
            correct = contrastive_accuracy(outputs, inputs["sampled_negative_indices"], inputs["mask_time_indices"])
            values = [outputs.contrastive_loss / masked, outputs.diversity_loss / masked, outputs.codevector_perplexity, correct / masked, 1.0]
            split = "train" if model.training else "eval"  # summed where the loss lives: no host sync per step
            self._sums[split] = self._sums[split].to(loss.device) + torch.stack([torch.as_tensor(v, dtype=torch.float32, device=loss.device) for v in values])
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def _means(self, split: str) -> dict[str, float]:
        sums = self._sums[split]
        if split == "eval":
            sums = self.accelerator.reduce(sums.to(self.accelerator.device), reduction="sum")
        sums = sums.cpu()
        self._sums[split] = torch.zeros_like(sums)
        if sums[-1] == 0:
            return {}
        return {name: round(float(value / sums[-1]), 4) for name, value in zip(SSL_MEASURES, sums[:-1])}

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """The evaluation's own metrics gain the objective's parts (one log entry per evaluation)."""
        self._sums["eval"] = torch.zeros_like(self._sums["eval"])
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        output.metrics.update({f"{metric_key_prefix}_{k}": v for k, v in self._means("eval").items()})
        return output

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        if "loss" in logs:  # a training log: add the objective's parts and the temperature
            logs = logs | self._means("train") | {"gumbel_temperature": round(float(self.model.quantizer.temperature), 5)}
        super().log(logs, start_time)


class _CollatorEpoch(TrainerCallback):
    """Tells the collator which epoch it is drawing for (masks differ between epochs)."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.trainer.data_collator.epoch = int((state.epoch or 0.0) + 1e-6)
