"""Every script's command line in one place: the argument dataclasses each ``run_*.py`` parses (the
shared ones live with their concept: ``ModelArguments`` in model.py, ``DataArguments`` in data.py,
``CTCTrainingArguments`` in training.py, ``PretrainingArguments`` in pretraining.py), and
``SCRIPT_ARGUMENTS``, what the grid validates a study config's sections against without importing
the scripts. ``parse_arguments`` reads them as the Hugging Face examples do (flags, or one JSON
file), a bad flag value ending as a usage error."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Optional

from .data import DataArguments
from .errors import UsageError
from .masks import PRUNE_SCOPES
from .model import ModelArguments
from .pretraining import PretrainingArguments
from .runs import SECRET_FLAGS, hide_token, redact_argv
from .training import CTCTrainingArguments


@dataclass
class PretrainModelArguments:
    """The model to pretrain (a config directory starts from random weights; a checkpoint with a
    quantiser continues) and the masking of the objective."""

    model_name_or_path: str = field(metadata={"help": "Config dir (from scratch) or a pretrained checkpoint with its quantiser (continue)."})
    model_revision: str = field(default="main", metadata={"help": "Hub revision of the model."})
    freeze_feature_encoder: bool = field(default=False, metadata={"help": "Keep the conv feature encoder frozen."})
    mask_time_prob: float = field(default=0.65, metadata={"help": "About this share of each clip's frames is masked (wav2vec 2.0: 0.65 with spans of 10)."})
    mask_time_length: int = field(default=10, metadata={"help": "Frames per masked span."})
    mask_time_min_masks: int = field(default=2, metadata={"help": "At least this many spans per clip."})
    num_negatives: Optional[int] = field(default=None, metadata={"help": "Distractors per masked frame (default: the config's)."})


@dataclass
class MixtureArguments:
    """Which languages in which shares, and how much audio in all."""

    mixture: list[str] = field(metadata={"help": "Shares summing to 1, e.g. en=0.5 de=0.25 es=0.25."})
    total_clips: Optional[int] = field(default=None, metadata={"help": "Training clips in all (or --total_hours)."})
    total_hours: Optional[float] = field(default=None, metadata={"help": "Training audio in all, in hours (or --total_clips)."})
    eval_clips: int = field(default=100, metadata={"help": "Validation clips, drawn in the same shares."})


@dataclass
class PruneArguments:
    model_name_or_path: str = field(metadata={"help": "Fine-tuned CTC model or pretrained base model: local dir or Hub id."})
    output_dir: str = field(metadata={"help": "Ticket directory (one sparsity) or parent of sparsity-X.XX/ directories."})
    sparsity: list[float] = field(default_factory=lambda: [0.8], metadata={"help": "Fraction of in-scope weights pruned; several share one pass."})
    prune_scope: str = field(default="encoder_linear", metadata={"help": "One of: " + "; ".join(f"{k}: {v}" for k, v in PRUNE_SCOPES.items())})
    method: str = field(default="magnitude", metadata={"help": "magnitude (L1), or random (control: same count, random positions)."})
    layerwise: bool = field(default=False, metadata={"help": "Control: the same sparsity in every tensor instead of one global threshold."})
    seed: int = field(default=0, metadata={"help": "Seed of the threshold sample, random scores and any new head."})
    model_revision: str = field(default="main", metadata={"help": "Hub revision of the source model."})
    evaluate_on: Optional[str] = field(
        default=None,
        metadata={"help": "Score each ticket as pruned, before any training, on this split (test or validation) of --language's data "
                          "(the data flags below, as in run_finetune.py): CER/WER in its card's model-index, rows in predictions_<split>.jsonl."},
    )
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "Batch size of --evaluate_on's scoring."})
    compress: bool = field(default=True, metadata={"help": "zstd-compress mask tensors when that saves at least a tenth of their size."})
    push_to_hub: bool = field(default=False, metadata={"help": "Push each ticket as a model repo (--hub_model_id)."})
    hub_model_id: Optional[str] = field(default=None, metadata={"help": "ORG/NAME of the ticket repo; with several sparsities '-sparsity-0.80' etc. is appended."})
    hub_mask_repo_id: Optional[str] = field(default=None, metadata={"help": "ORG/NAME of a dataset repo that collects masks, with an index table."})
    hub_token: Optional[str] = field(default=None, metadata={"help": "Hub token (default: the logged-in one)."})
    hub_private_repo: Optional[bool] = field(default=None, metadata={"help": "Create new repos as private."})


@dataclass
class TransferArguments:
    upstream: str = field(metadata={"help": "Language whose ticket is transferred (or 'base': the pruned pretrained model)."})
    downstream: str = field(metadata={"help": "Language to fine-tune on and test."})
    sparsity: float = field(default=0.8, metadata={"help": "Sparsity of the ticket."})
    ticket: Optional[str] = field(default=None, metadata={"help": "Ticket directory or Hub repo, overriding the lookup by --upstream/--sparsity."})
    tickets_dir: str = field(default="tickets", metadata={"help": "Local tickets: <tickets_dir>/<upstream>/sparsity-0.80/."})
    ticket_repo_pattern: Optional[str] = field(
        default=None, metadata={"help": "Hub ticket repos, e.g. 'me/xls-r-300m-{upstream}-ticket-sparsity-{sparsity:.2f}'."}
    )
    upstream_model: Optional[str] = field(default=None, metadata={"help": "Fine-tuned upstream model to prune now when no ticket exists (saved under --tickets_dir)."})
    prune_scope: str = field(default="encoder_linear", metadata={"help": "Scope for pruning now (see run_prune.py)."})
    freeze_epochs: int = field(default=1, metadata={"help": "Epochs with the encoder frozen when upstream != downstream."})
    train_epochs: int = field(default=10, metadata={"help": "Epochs of full training (after the frozen ones)."})
    dense_transfer: bool = field(default=False, metadata={"help": "Control: start from the ticket but let pruned weights regrow."})


@dataclass
class IoUArguments:
    masks: list[str] = field(metadata={"help": "LABEL=MASK pairs, e.g. en=tickets/en/sparsity-0.90 (dir, file or Hub reference); LANGUAGE@SEED labels compare seeds."})
    output_dir: str = field(metadata={"help": "Where the tables and pictures go."})
    base: Optional[str] = field(default=None, metadata={"help": "The base model's mask at the same sparsity (labelled 'base')."})


SCRIPT_ARGUMENTS: dict[str, tuple[type, ...]] = {
    "run_finetune.py": (ModelArguments, DataArguments, CTCTrainingArguments),
    "run_prune.py": (PruneArguments, DataArguments),
    "run_transfer.py": (TransferArguments, ModelArguments, DataArguments, CTCTrainingArguments),
    "run_iou.py": (IoUArguments,),
    "run_pretrain.py": (PretrainModelArguments, MixtureArguments, DataArguments, PretrainingArguments),
}


def flag_names(script: str) -> set[str]:
    """Every flag ``script`` accepts (without the leading dashes)."""
    from dataclasses import fields

    return {f.name for cls in SCRIPT_ARGUMENTS[script] for f in fields(cls)}


def script_parser(script: str, description: Optional[str] = None):
    """``script``'s argument parser; ``--help`` starts with ``description`` (the script's docstring,
    whose example is a realistic command)."""
    import argparse

    from transformers import HfArgumentParser

    return HfArgumentParser(SCRIPT_ARGUMENTS[script], prog=script, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)


def parse_arguments(script: str, description: Optional[str] = None) -> tuple:
    """``script``'s dataclasses from the command line, or from one JSON file holding them; a value
    the dataclasses refuse (e.g. an unknown ``--eval_strategy``) is a usage error."""
    parser = script_parser(script, description)
    try:
        if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
            parsed = tuple(parser.parse_json_file(os.path.abspath(sys.argv[1])))
        else:
            parsed = tuple(parser.parse_args_into_dataclasses())
    except ValueError as err:
        if isinstance(err, UsageError):
            raise
        raise UsageError(f"{script}: {err}") from None
    # A Hub token leaves the arguments (saved as training_args.bin, recorded in results.json's
    # command) for the environment, where huggingface_hub reads it.
    for arguments in parsed:
        for name in SECRET_FLAGS:
            if getattr(arguments, name, None):
                hide_token(getattr(arguments, name))
                setattr(arguments, name, None)
    sys.argv[:] = redact_argv(sys.argv)
    return parsed
