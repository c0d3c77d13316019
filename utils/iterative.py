"""Iterative magnitude pruning with rewinding (run_imp.py), in open_lth's shape: a schedule of
sparsity levels that hits every requested sparsity exactly, the rewind point (the weights every
round after the first restarts from), and the length of the first round, which a rewind step
must fall inside. The pruning itself is ``utils.pruning.compute_masks(..., within=mask)``: each
round's mask a subset of the one before, by the same exact global threshold and tie rule."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import torch
from huggingface_hub.constants import SAFETENSORS_INDEX_FILE, SAFETENSORS_SINGLE_FILE
from transformers import TrainerCallback, TrainingArguments

from .errors import UsageError
from .runs import atomic_open

logger = logging.getLogger(__name__)


def imp_levels(sparsities: list[float], rounds: int) -> list[float]:
    """The sparsity each pruning round ends at. The first requested sparsity is reached in
    ``rounds - len(sparsities) + 1`` rounds that each prune the same fraction of the weights left
    (1 - (1 - s)^(1/n)), then one round per further sparsity: every requested sparsity ends a
    round, so each is exact (``round(s * N)`` pruned, as run_prune.py does)."""
    sparsities = sorted(sparsities)
    if rounds < len(sparsities):
        raise UsageError(f"--rounds {rounds} cannot reach the {len(sparsities)} sparsities {sparsities}: each requested sparsity ends a round, "
                         f"so expected --rounds {len(sparsities)} or more")
    first = rounds - len(sparsities) + 1
    return [1.0 - (1.0 - sparsities[0]) ** (r / first) for r in range(1, first)] + sparsities


def round_fraction(levels: list[float], round_: int) -> float:
    """The fraction of the weights still kept that round ``round_`` (1-based) prunes."""
    before = levels[round_ - 2] if round_ > 1 else 0.0
    return 1.0 - (1.0 - levels[round_ - 1]) / (1.0 - before)


def optimizer_steps(train_samples: int, args: TrainingArguments) -> int:
    """How many optimizer steps one fine-tune of ``train_samples`` clips takes under ``args``
    (``max_steps``, else epochs times the Trainer's updates per epoch)."""
    if args.max_steps and args.max_steps > 0:
        return args.max_steps
    batches = math.ceil(train_samples / (args.per_device_train_batch_size * max(args.world_size, 1)))
    per_epoch = max(batches // args.gradient_accumulation_steps, 1)
    return math.ceil(args.num_train_epochs * per_epoch)


def save_weights(model: torch.nn.Module, folder: str | os.PathLike) -> None:
    """Every weight of ``model`` (its state dict) to ``folder/model.safetensors``, atomically."""
    from safetensors.torch import save_file

    with atomic_open(Path(folder) / SAFETENSORS_SINGLE_FILE, "wb") as f:  # safetensors writes the temporary by its name
        save_file({name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}, f.name)


def has_weights(folder: str | os.PathLike) -> bool:
    """Whether ``save_weights`` finished writing to ``folder`` (the file appears whole, by rename)."""
    return (Path(folder) / SAFETENSORS_SINGLE_FILE).is_file()


@torch.no_grad()
def load_weights(model: torch.nn.Module, folder: str | os.PathLike) -> None:
    """Put every weight back into ``model`` from the safetensors files ``save_weights`` or
    ``save_pretrained`` wrote to ``folder`` (one file, or shards with their index)."""
    from safetensors.torch import load_file

    state = {}
    for name in weight_files(folder):
        if name != SAFETENSORS_INDEX_FILE:
            state |= load_file(str(Path(folder) / name))
    model.load_state_dict(state, strict=True)


def weight_files(folder: str | os.PathLike) -> list[str]:
    """The safetensors files holding a saved model's weights: one file, or the index and its shards."""
    index = Path(folder) / SAFETENSORS_INDEX_FILE
    if index.is_file():
        return [SAFETENSORS_INDEX_FILE, *sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))]
    return [SAFETENSORS_SINGLE_FILE]


class RewindPointCallback(TrainerCallback):
    """Keeps the weights after optimizer step ``step`` of the first round as the rewind point
    (Frankle et al. 2020's late rewinding), from the main process, at step end: after the
    optimizer step and before logging, evaluation or a checkpoint."""

    def __init__(self, step: int, folder: str | os.PathLike):
        self.step, self.folder = step, folder

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step and args.process_index == 0:
            save_weights(model, self.folder)
            logger.info("rewind point: the weights after step %d, in %s", self.step, self.folder)
