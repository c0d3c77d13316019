"""Every script's command line in one place: the argument dataclasses each ``run_*.py`` parses
(the subclasses of transformers' ``TrainingArguments`` live with their concept,
``CTCTrainingArguments`` in training.py and ``PretrainingArguments`` in pretraining.py, since
importing them imports torch), and ``script_arguments``, what the grid validates a study config's
sections against without importing the scripts. Nothing here imports torch or datasets, so
``--help`` of run_prune.py and run_iou.py answers at once. ``parse_arguments`` reads them as the
Hugging Face examples do (flags, or one JSON file), a bad flag value ending as a usage error."""

from __future__ import annotations

import os
import string
import sys
from dataclasses import dataclass, field
from typing import Optional

from .errors import UsageError
from .runs import SECRET_FLAGS, hide_token, redact_argv
from .structure import PRUNE_SCOPES

FLEURS_REPO = "google/fleurs"
GENERATED = "generated"
GENERATED_CORPUS_DIR = os.path.join("~", ".cache", "language-tickets", "generated-corpus")


@dataclass
class DataArguments:
    """Where a language's speech comes from and how it is filtered."""

    language: Optional[str] = field(default=None, metadata={"help": "Language code, e.g. en, ca, ast (see utils/languages.py)."})
    dataset_name: str = field(
        default=FLEURS_REPO,
        metadata={
            "help": "Hub dataset id (google/fleurs is read from its raw files; any Parquet/audiofolder "
            "dataset works), or 'generated' for the offline espeak-ng corpus. Ignored with --data_dir."
        },
    )
    dataset_config_name: Optional[str] = field(
        default=None, metadata={"help": "Dataset config; defaults to the language's FLEURS config for FLEURS."}
    )
    dataset_revision: Optional[str] = field(default=None, metadata={"help": "Hub revision of the dataset."})
    data_dir: Optional[str] = field(
        default=None,
        metadata={"help": "Local folder with train/ validation/ test/, each holding metadata.csv (file_name,transcription)."},
    )
    train_split_name: str = field(default="train", metadata={"help": "Training split of the source."})
    eval_split_name: Optional[str] = field(
        default=None, metadata={"help": "Validation split of the source (default: 'dev' for FLEURS, else 'validation')."}
    )
    test_split_name: str = field(default="test", metadata={"help": "Test split of the source."})
    audio_column_name: str = field(default="audio", metadata={"help": "Audio column of a Hub dataset."})
    text_column_name: str = field(
        default="transcription",
        metadata={"help": "Transcript column (FLEURS/local/generated: transcription; Common Voice: sentence)."},
    )
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Truncate the training split."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Truncate the validation split."})
    max_test_samples: Optional[int] = field(default=None, metadata={"help": "Truncate the test split."})
    min_duration_in_seconds: float = field(default=0.0, metadata={"help": "Drop shorter clips."})
    max_duration_in_seconds: float = field(default=20.0, metadata={"help": "Drop longer clips."})
    chars_to_ignore: Optional[list[str]] = field(
        default=None, metadata={"help": "Extra characters deleted from transcripts before normalisation."}
    )
    preprocessing_num_workers: Optional[int] = field(default=None, metadata={"help": "Processes for datasets.map."})
    generated_corpus_dir: str = field(
        default=GENERATED_CORPUS_DIR,
        metadata={"help": "Where --dataset_name generated writes (and reuses) its corpus."},
    )
    generated_num_train: int = field(default=2000, metadata={"help": "Generated training utterances per language."})
    generated_num_eval: int = field(default=200, metadata={"help": "Generated validation/test utterances per language."})


def fill_language(value: str, code: str, where: str = "value") -> str:
    """A dataset flag with ``{language}`` replaced by ``code`` (one ``data_dir`` per language, say):
    the grid's data values and run_pretrain.py's mixture sources. Any other template field, or a
    lone brace, is refused in one line naming the value."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(value) if name is not None]
    except ValueError as err:
        raise UsageError(f"{where} {value!r} is not a valid template ({err}): write {{language}} for the language code, "
                         "{{ and }} for literal braces") from None
    other = [name for name in names if name != "language"]
    if other:
        raise UsageError(f"{where} {value!r} uses the template field {{{other[0]}}}: only {{language}} is filled in "
                         "(write {{ and }} for literal braces)")
    return value.format(language=code)


@dataclass
class ModelArguments:
    """Which model to fine-tune and the config values to override (None keeps the checkpoint's)."""

    model_name_or_path: str = field(
        default="facebook/wav2vec2-xls-r-300m",
        metadata={"help": "Hub id or local dir. A local dir with only config.json (+ preprocessor_config.json) starts from random weights."},
    )
    model_revision: str = field(default="main", metadata={"help": "Hub revision of the model."})
    freeze_feature_encoder: bool = field(default=True, metadata={"help": "Keep the conv feature encoder frozen."})
    attention_dropout: Optional[float] = field(default=None, metadata={"help": "Override config.attention_dropout."})
    activation_dropout: Optional[float] = field(default=None, metadata={"help": "Override config.activation_dropout."})
    hidden_dropout: Optional[float] = field(default=None, metadata={"help": "Override config.hidden_dropout."})
    feat_proj_dropout: Optional[float] = field(default=None, metadata={"help": "Override config.feat_proj_dropout."})
    final_dropout: Optional[float] = field(default=None, metadata={"help": "Override config.final_dropout."})
    mask_time_prob: Optional[float] = field(default=None, metadata={"help": "Override config.mask_time_prob (SpecAugment)."})
    layerdrop: Optional[float] = field(default=None, metadata={"help": "Override config.layerdrop."})
    ctc_loss_reduction: str = field(default="mean", metadata={"help": "CTC loss reduction: mean or sum."})
    ctc_zero_infinity: bool = field(default=True, metadata={"help": "Zero infinite CTC losses (unalignable rows)."})


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
class ParpArguments:
    """run_finetune.py's PARP mode: the fine-tuned model is a ticket of the start model."""

    parp_sparsity: Optional[float] = field(
        default=None,
        metadata={"help": "PARP (Lai et al. 2021): prune the start model (--model_name_or_path, pretrained or upstream) to this sparsity by "
                          "magnitude, fine-tune with the pruned weights zeroed but trainable, re-prune every --reprune_steps steps and at the "
                          "end; output_dir is then a ticket (mask.safetensors, method parp). Default: an ordinary dense fine-tune."},
    )
    reprune_steps: int = field(default=50, metadata={"help": "PARP: optimizer steps between re-prunes (one larger than the run: prune only at the end)."})
    parp_scope: str = field(default="encoder_linear", metadata={"help": "PARP: the weights pruned (see run_prune.py --prune_scope)."})


@dataclass
class ImpArguments:
    """run_imp.py: which sparsities, in how many rounds, rewound to which step."""

    sparsity: list[float] = field(default_factory=lambda: [0.7, 0.8, 0.9], metadata={"help": "Sparsities written as tickets; each ends a round, hit exactly."})
    rounds: int = field(default=5, metadata={"help": "Pruning rounds (each followed by a fine-tune): the first sparsity in equal fractions of "
                                                     "what is left, then one round per further sparsity. At least the number of sparsities."})
    rewind_step: int = field(default=0, metadata={"help": "Rewind kept weights to those after this optimizer step of the first round (0: the starting weights)."})
    prune_scope: str = field(default="encoder_linear", metadata={"help": "The weights pruned (see run_prune.py)."})


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


ANALYSES = ("ablation", "cka", "probes", "phones")


@dataclass
class AnalysisArguments:
    """run_analysis.py: which tickets and models, which analyses, how many control draws and probe runs."""

    tickets: list[str] = field(metadata={"help": "LABEL=TICKET_DIR of every ticket compared (one sparsity, one model), e.g. en=tickets/en/sparsity-0.90; 'base' for the pruned base."})
    transfers: list[str] = field(default_factory=list, metadata={
        "help": "UP-DOWN=DIR: ticket UP fine-tuned on DOWN (run_transfer.py output), in which the ablation zeroes UP's weights the other tickets prune and tests on DOWN."})
    upstream_models: list[str] = field(default_factory=list, metadata={"help": "LABEL=DIR: the dense fine-tuned model each ticket was pruned from (CKA ticket vs upstream; probes)."})
    base_model: Optional[str] = field(default=None, metadata={"help": "The pretrained base (CKA ticket vs base; probes)."})
    languages: list[str] = field(default_factory=list, metadata={"help": "Test sets of CKA and the language-ID probe (default: every language of --tickets and --transfers)."})
    analyses: list[str] = field(default_factory=lambda: list(ANALYSES[:3]), metadata={
        "help": f"Which of {', '.join(ANALYSES)} to run (phones: a frame-level phone probe, needing phone timings: the generated corpus makes them)."})
    control_seeds: int = field(default=3, metadata={"help": "Random-control draws per ablation (each as many of the ticket's kept weights per tensor)."})
    ablation_groups: bool = field(default=True, metadata={"help": "Also ablate per encoder layer and per module type."})
    layers: Optional[list[int]] = field(default=None, metadata={"help": "Layers of CKA and probes (0 = the encoder's input; default: all)."})
    frames_per_utterance: int = field(default=50, metadata={"help": "Frames per utterance in frame-level CKA and the phone probe (evenly spaced)."})
    probe_seeds: int = field(default=3, metadata={"help": "Repetitions of the probes' cross-validation."})
    probe_folds: int = field(default=5, metadata={"help": "Folds of the probes' stratified cross-validation."})


SCRIPTS = ("run_finetune.py", "run_prune.py", "run_transfer.py", "run_iou.py", "run_pretrain.py", "run_imp.py", "run_analysis.py")


def script_arguments(script: str) -> tuple[type, ...]:
    """The dataclasses ``script`` parses. The training scripts' include transformers'
    ``TrainingArguments`` (which imports torch), so they are imported only when asked for."""
    if script == "run_analysis.py":
        from .training import CTCTrainingArguments

        return (AnalysisArguments, DataArguments, CTCTrainingArguments)
    if script in ("run_finetune.py", "run_transfer.py", "run_imp.py"):
        from .training import CTCTrainingArguments

        own = {"run_finetune.py": (ParpArguments,), "run_transfer.py": (TransferArguments,), "run_imp.py": (ImpArguments,)}[script]
        return (*own, ModelArguments, DataArguments, CTCTrainingArguments)
    if script == "run_pretrain.py":
        from .pretraining import PretrainingArguments

        return (PretrainModelArguments, MixtureArguments, DataArguments, PretrainingArguments)
    return {"run_prune.py": (PruneArguments, DataArguments), "run_iou.py": (IoUArguments,)}[script]


def flag_names(script: str) -> set[str]:
    """Every flag ``script`` accepts (without the leading dashes)."""
    from dataclasses import fields

    return {f.name for cls in script_arguments(script) for f in fields(cls)}


def script_parser(script: str, description: Optional[str] = None):
    """``script``'s argument parser; ``--help`` starts with ``description`` (the script's docstring,
    whose example is a realistic command)."""
    import argparse

    from transformers import HfArgumentParser

    return HfArgumentParser(script_arguments(script), prog=script, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)


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
