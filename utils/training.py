"""Trainer pieces shared by the recipes: training-argument defaults that follow the paper, a
Trainer that scores greedy CTC transcripts against each dataset's own transcripts, and the
callbacks of ticket transfer (hold the mask, freeze then unfreeze the encoder)."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import psutil
import torch
from torch.utils.data import SequentialSampler
from transformers import EvalPrediction, Trainer, TrainerCallback, TrainingArguments

from . import __version__
from .errors import OutputConflict
from .hub import CardEvaluation, finish_trainer_card, is_hub_id, source_license
from .metrics import SPLIT_OF_PREFIX, corpus_rates, greedy_transcripts, predictions_path, score_utterances, write_predictions
from .layout import TRAINER_RESULTS_FILE
from .preemption import MidEpochResumeMixin, train_until_stopped
from .pruning import compute_masks
from .runs import remove_checkpoints, write_json_atomic
from .structure import Family

logger = logging.getLogger(__name__)


def keep_checkpoints_field():
    """``--keep_checkpoints``, shared by the training scripts' arguments."""
    return field(default=False, metadata={"help": "Keep the Trainer checkpoints (weights, optimizer and scheduler states) after the run has "
                                                  "succeeded. By default they are removed then; a killed or failed run keeps them to resume."})


@dataclass
class CTCTrainingArguments(TrainingArguments):
    """``TrainingArguments`` (every flag still passes through) with defaults for CTC fine-tuning:
    train, evaluate and save every epoch, keep the checkpoint with the lowest eval CTC loss as the
    paper does, and batch training clips of similar length together."""

    do_train: bool = field(default=True, metadata={"help": "Train (pass --do_train False to only evaluate)."})
    eval_strategy: str = field(default="epoch", metadata={"help": "When to evaluate: no, steps, epoch."})
    save_strategy: str = field(default="epoch", metadata={"help": "When to checkpoint: no, steps, epoch, best."})
    load_best_model_at_end: bool = field(default=True, metadata={"help": "Restore the best checkpoint at the end."})
    metric_for_best_model: Optional[str] = field(default="eval_loss", metadata={"help": "Metric that picks the best checkpoint."})
    greater_is_better: Optional[bool] = field(default=False, metadata={"help": "Whether a higher metric is better."})
    save_total_limit: Optional[int] = field(default=2, metadata={"help": "Checkpoints kept (the best is always kept)."})
    train_sampling_strategy: str = field(default="group_by_length", metadata={"help": "random, sequential, group_by_length, ..."})
    length_column_name: str = field(default="input_length", metadata={"help": "Precomputed lengths for length grouping."})
    keep_checkpoints: bool = keep_checkpoints_field()


class WholeCheckpointsMixin:
    """A checkpoint whose save fails (a full disk, a file-size limit) is removed before the error
    goes on, so the folder never holds a half checkpoint that the Trainer's own
    ``get_last_checkpoint`` would resume from. (A killed save is caught on resume instead:
    ``utils.runs.last_complete_checkpoint``.)"""

    def _save_checkpoint(self, model, trial):
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        existed = os.path.isdir(folder)
        try:
            super()._save_checkpoint(model, trial)
        except Exception:
            if self.args.should_save and not existed:
                shutil.rmtree(folder, ignore_errors=True)
                logger.error("could not write %s: removed it; the checkpoints before it are intact", folder)
            raise


class SuiteCardMixin:
    """The Trainer's model card, finished with the suite's metadata (``utils.hub.finish_trainer_card``)
    when ``write_card_or_push`` asks for it; the Trainer's own pushes while saving make a plain
    card, which the final push replaces."""

    def create_model_card(self, evaluation: Optional[CardEvaluation] = None, **kwargs) -> None:
        super().create_model_card(**kwargs)
        if self.is_world_process_zero() and kwargs.get("license"):
            finish_trainer_card(os.path.join(self.args.output_dir, "README.md"), kwargs["model_name"], evaluation, kwargs["license"])


class CTCTrainer(WholeCheckpointsMixin, SuiteCardMixin, MidEpochResumeMixin, Trainer):
    """A Trainer that reports CER and WER of every evaluation and writes its per-utterance rows
    (``predictions_validation.jsonl``, ``predictions_test.jsonl``: see ``utils.metrics``) to the
    output dir, from the main process, in dataset order.

    - References are the evaluated dataset's own ``text`` column, not labels decoded back: with a
      vocabulary built from the training split only, a test character the model never saw would
      otherwise turn into ``[UNK]`` in the reference too and be scored as right.
    - Evaluation runs in dataset order (no length grouping), so predictions line up with that text.
    - ``prediction_step`` returns argmax ids, with the frames that exist only because of batch
      padding set to the blank: small models do not predict blank there, and decoding them
      corrupts CER (measured 0.71 batched vs 0.54 one by one). Ids also gather cheaply across ranks.
    """

    def __init__(self, *args, **kwargs):
        if not hasattr(Trainer, "_get_eval_sampler"):  # a private API we override: say so rather than silently evaluate shuffled
            import transformers

            raise RuntimeError(f"transformers {transformers.__version__} has no Trainer._get_eval_sampler, which CTCTrainer overrides to "
                               "evaluate in dataset order: install the versions in requirements.txt (transformers>=5.0,<6)")
        super().__init__(*args, **kwargs)
        self.compute_metrics = self._error_rates
        self._references: list[str] = []
        self._ids: list[str] = []
        self._split = "eval"

    def _get_eval_sampler(self, eval_dataset):
        # Distributed: accelerate shards batches in order and gather_for_metrics restores it.
        return SequentialSampler(eval_dataset) if self.args.world_size <= 1 else None

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        self._references = list(dataset["text"])
        self._ids = list(dataset["id"]) if "id" in dataset.column_names else [str(i) for i in range(len(dataset))]
        self._split = SPLIT_OF_PREFIX.get(metric_key_prefix, metric_key_prefix)
        return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def _error_rates(self, pred: EvalPrediction) -> dict[str, float]:
        hypotheses = greedy_transcripts(pred.predictions, self.processing_class)
        if len(hypotheses) != len(self._references):
            raise RuntimeError(f"{len(hypotheses)} predictions for {len(self._references)} references")
        rows = score_utterances(self._ids, self._references, hypotheses)
        if self.is_world_process_zero():
            write_predictions(predictions_path(self.args.output_dir, self._split), rows)
        return corpus_rates(rows)

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


class HoldMaskCallback(TrainerCallback):
    """Keeps every pruned weight at exactly 0: re-applies the mask right after each optimizer
    step (before the scheduler, logging, evaluation and checkpointing see the weights) and once
    when training starts or resumes. The mask is held as ``uint8`` on the weights' device, one
    byte per prunable weight (a float copy would take four: 8.5 GB of GPU memory for XLS-R 2B),
    and applied by one ``torch._foreach_mul_``; ``bench/bench_mask_hold.py`` measures the cost
    against a training step and against float masks."""

    def __init__(self, mask: dict[str, torch.Tensor]):
        self.mask = mask
        self._params: list[torch.Tensor] = []
        self._factors: list[torch.Tensor] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        params = dict(model.named_parameters())
        self._params = [params[name].data for name in self.mask]
        # bool -> uint8 is a view (no copy) where the mask already lives on the weights' device
        self._factors = [keep.to(device=p.device).view(torch.uint8) for keep, p in zip(self.mask.values(), self._params)]
        self._hold()

    @torch.no_grad()
    def _hold(self):
        torch._foreach_mul_(self._params, self._factors)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self._hold()


class RepruneCallback(TrainerCallback):
    """PARP's adjust and re-prune (Lai et al. 2021): the pruned weights start at 0 but stay
    trainable; every ``every`` optimizer steps (at step end: before logging, evaluation and any
    checkpoint see the weights) and once when training ends (after the best checkpoint is loaded)
    the weights in ``mask`` are pruned again to exactly ``sparsity`` by the global magnitude
    threshold of ``utils.pruning``, so weights that grew back may stay and others leave. ``mask``
    (the start's) is replaced by each re-prune's; ``reprunes`` lists the steps they happened at."""

    def __init__(self, mask: dict[str, torch.Tensor], sparsity: float, every: int):
        self.mask, self.sparsity, self.every = mask, sparsity, every
        self.reprunes: list[int] = []
        self._params: dict[str, torch.Tensor] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        params = dict(model.named_parameters())
        self._params = {name: params[name] for name in self.mask}

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            self._reprune(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:  # the end of training, not a stop signal's
            self._reprune(state.global_step, "at the end")

    @torch.no_grad()
    def _reprune(self, step: int, when: str = "") -> None:
        # bool arithmetic only: indexing the weights by the mask would copy most of them
        moved = sum(int(torch.count_nonzero((p != 0) & ~self.mask[n].to(p.device))) for n, p in self._params.items())
        new = compute_masks(self._params, [self.sparsity])[self.sparsity]
        changed = sum(int(torch.count_nonzero(new[n] ^ self.mask[n].to(new[n].device))) for n in new)
        for name, param in self._params.items():
            param.masked_fill_(~new[name], 0)
        self.mask = new
        self.reprunes.append(step)
        logger.info("PARP re-prune at step %d%s: %d pruned weights had moved off 0; %d weights changed sides", step, f" ({when})" if when else "",
                    moved, changed)


class FreezeEncoderCallback(TrainerCallback):
    """Trains only the CTC head for the first ``freeze_epochs`` epochs, then the whole model
    (the conv feature encoder stays frozen if ``keep_feature_encoder_frozen``). The head and the
    feature encoder are the model family's (``utils.structure``). Toggling ``requires_grad`` from a
    callback keeps every parameter in the optimizer built at the start; freezing before the Trainer
    builds it would leave the encoder out of it for good. Decided from the epoch a run is in, so a
    resumed run gets the right state."""

    def __init__(self, freeze_epochs: int, family: Family, keep_feature_encoder_frozen: bool = True):
        self.freeze_epochs = freeze_epochs
        self.head = family.head_prefix
        self.keep_frozen = (family.feature_encoder_prefix,) if keep_feature_encoder_frozen and family.feature_encoder else ()
        self.frozen_in_epochs: list[int] = []

    def on_epoch_begin(self, args, state, control, model=None, **kwargs):
        epoch = math.floor((state.epoch or 0.0) + 1e-6)
        frozen = epoch < self.freeze_epochs
        for name, param in model.named_parameters():
            trainable = name.startswith(self.head) or (not frozen and not name.startswith(self.keep_frozen))
            param.requires_grad_(trainable)
        if frozen:
            self.frozen_in_epochs.append(epoch)
        logger.info("epoch %d: encoder %s", epoch + 1, "frozen, training the CTC head only" if frozen else "trainable")


def refuse_finished_run(args: TrainingArguments, last_checkpoint: Optional[str]) -> None:
    """Training again into a finished run's folder, whose checkpoints are gone, would overwrite its
    results from scratch (and leave them torn if killed): refused in one line instead."""
    if last_checkpoint is None and os.path.exists(os.path.join(args.output_dir, TRAINER_RESULTS_FILE)):
        raise OutputConflict(f"output_dir {args.output_dir!r} holds a finished run whose checkpoints were removed (--keep_checkpoints keeps them): "
                             "nothing to resume; choose another --output_dir, or remove it to train again")


def train_and_evaluate(trainer: Trainer, splits, last_checkpoint: Optional[str]) -> dict[str, float]:
    """Train (resuming from ``--resume_from_checkpoint`` or this run's last checkpoint; a stop signal
    saves and exits, see ``utils.preemption``), save the kept model, then evaluate it on validation
    and test; writes ``all_results.json``."""
    args = trainer.args
    results: dict[str, float] = {}
    if args.do_train:
        refuse_finished_run(args, last_checkpoint)
        startup = time.time() - psutil.Process().create_time()
        logger.info("ready to train %.1f s after the process started (loading, features, model)", startup)
        train_result = train_until_stopped(trainer, args.resume_from_checkpoint or last_checkpoint)
        trainer.save_model()
        metrics = train_result.metrics | {"train_samples": len(splits["train"]), "startup_seconds": round(startup, 2)}
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
        results |= metrics
    for split, prefix in (("validation", "eval"), ("test", "test")):
        metrics = trainer.evaluate(splits[split], metric_key_prefix=prefix) | {f"{prefix}_samples": len(splits[split])}
        trainer.log_metrics(prefix, metrics)
        trainer.save_metrics(prefix, metrics)
        results |= metrics
    if trainer.is_world_process_zero():  # the results file names the code that made it
        path = os.path.join(args.output_dir, TRAINER_RESULTS_FILE)
        write_json_atomic(path, json.loads(Path(path).read_text(encoding="utf-8")) | {"suite_version": __version__})
    return results


def remove_checkpoints_after_success(trainer: Trainer) -> None:
    """The run has succeeded and written everything later steps and readers use (model, processor,
    results, predictions, trainer state): its checkpoints are only for resuming, and at the XLS-R
    300M shape hold about 3.6 GB each (weights and AdamW states). Removed unless ``--keep_checkpoints``."""
    if trainer.args.keep_checkpoints or not trainer.is_world_process_zero():
        return
    count, size = remove_checkpoints(trainer.args.output_dir)
    if count:
        logger.info("run finished: removed its %d checkpoint(s), %.1f MB (--keep_checkpoints keeps them)", count, size / 1e6)


def write_card_or_push(trainer: Trainer, local_name: str, evaluation: Optional[CardEvaluation], source: str, source_revision: str = "main",
                       **card) -> None:
    """The model card, and the Hub push when ``--push_to_hub`` asks for it. The Trainer's card (its
    training table) gets the suite's metadata: the test score as a model-index (when there is one),
    the licence the model inherits from ``source``, the version, and a title: the repo's name when
    ``--hub_model_id`` gives one, else ``local_name``. A local ``source`` is never named: the Hub
    accepts only repo ids as ``base_model``."""
    card.setdefault("tasks", "automatic-speech-recognition")
    if is_hub_id(source):
        card["finetuned_from"] = source
    model_name = trainer.args.hub_model_id.split("/")[-1] if trainer.args.hub_model_id else local_name
    card |= {"model_name": model_name, "evaluation": evaluation, "license": source_license(source, source_revision)}
    if trainer.args.push_to_hub:
        trainer.push_to_hub(**card)
    else:
        trainer.create_model_card(**card)
