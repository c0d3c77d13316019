"""How much disk a study needs, before it starts: each step kind's output from the size of the
model it holds (float32 weights, the mask's packed bits for tickets), and the Trainer checkpoints
a training step holds while it runs (weights and AdamW's two moment tensors per weight, 3x the
weights), which it removes once it has succeeded unless ``keep_checkpoints`` asks to keep them.

Sizes come from the model's config alone: the model is built on torch's ``meta`` device, which
allocates nothing. Tables, predictions, cards and logs (kilobytes a step) are not counted, nor
what lives outside the study's folder (the generated corpus, the feature caches under ~/.cache).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from .executors import TRAINING_KINDS
from .grid import Step, StudyConfig, sub_studies

CHECKPOINT_FACTOR = 3  # weights + AdamW's exp_avg and exp_avg_sq, each the size of the weights
KINDS = ("init", "pretrain", "finetune", "prune", "imp", "parp", "transfer")  # the kinds that write weights


@dataclass(frozen=True)
class ModelSize:
    """What a study's base model weighs on disk."""

    ctc_bytes: int  # a *ForCTC model's state dict in float32 (fine-tuned models, tickets, transfers)
    pretraining_bytes: int  # the same for the self-supervised objective's model (quantiser included)
    prunable: int  # weights in the default prune scope: one bit each in a ticket's mask


def model_size(reference: str, revision: str = "main") -> ModelSize:
    """``ModelSize`` of a model (local folder or Hub id) from its config, built on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCTC

    from .pruning import prunable_parameters
    from .structure import family_of

    config = AutoConfig.from_pretrained(reference, revision=revision)
    with torch.device("meta"):
        ctc = AutoModelForCTC.from_config(config)
        pretraining = ctc
        if family_of(config).ssl_pretraining:
            from transformers import Wav2Vec2ForPreTraining

            pretraining = Wav2Vec2ForPreTraining(config)
    weigh = lambda model: sum(t.numel() * t.element_size() for t in model.state_dict().values())  # noqa: E731
    return ModelSize(weigh(ctc), weigh(pretraining), sum(p.numel() for p in prunable_parameters(ctc).values()))


@dataclass(frozen=True)
class KindFootprint:
    kind: str
    steps: int
    kept: int  # bytes the finished steps of this kind keep, all together
    largest: int  # bytes the largest of them keeps
    checkpoints: int  # bytes of the checkpoints they would keep besides (save_total_limit each), all together
    largest_with_checkpoints: int  # bytes the largest of them keeps with its checkpoints
    running: int  # bytes of checkpoints the largest of them holds while it runs (save_total_limit + 1 while saving)


def study_footprint(config: StudyConfig, steps: list[Step], size_of: Callable[[str], ModelSize]) -> list[KindFootprint]:
    """Per step kind that writes weights: how many steps, what each keeps, its checkpoints."""
    models = {prefix: (config.bases.get(name, {}).get("model") if name else None) or config.model for name, _, prefix in sub_studies(config)}
    sizes = {reference: size_of(reference) for reference in set(models.values())}
    found: dict[str, list[tuple[int, int, int, int]]] = {}  # kind -> (bytes kept, bytes of one checkpoint, checkpoints kept, held while running) per step
    for step in steps:
        if step.kind not in KINDS:
            continue
        prefix = next((p for p in models if p and step.id.startswith(p)), "")
        size = sizes[models[prefix]]
        pretraining = step.kind == "pretrain" and any(arg.endswith("run_pretrain.py") for arg in step.argv)
        weights = size.pretraining_bytes if pretraining else size.ctc_bytes
        # IMP trains rounds + 1 times and keeps each round's model and the rewind point (its tickets are hard links to round models)
        fine_tunes = _imp_rounds(step) + 1 if step.kind == "imp" else 1
        each = weights * (fine_tunes + (step.kind == "imp")) + (math.ceil(size.prunable / 8) if step.kind in ("prune", "parp", "imp") else 0)
        training = step.kind in TRAINING_KINDS
        limit = int(step.settings.get("save_total_limit") or _default_save_total_limit(pretraining)) if training else 0
        found.setdefault(step.kind, []).append((each, CHECKPOINT_FACTOR * weights if training else 0, limit * fine_tunes, limit + 1 if training else 0))
    return [KindFootprint(kind, len(rows), sum(r[0] for r in rows), max(r[0] for r in rows), sum(r[1] * r[2] for r in rows),
                          max(r[0] + r[1] * r[2] for r in rows), max(r[1] * r[3] for r in rows)) for kind in KINDS if (rows := found.get(kind))]


def _imp_rounds(step: Step) -> int:
    from .arguments import ImpArguments

    return int(step.settings.get("rounds") or _default(ImpArguments, "rounds"))


def _default_save_total_limit(pretraining: bool) -> int:
    """The checkpoints a training script keeps unless told otherwise (its arguments' default)."""
    if pretraining:
        from .pretraining import PretrainingArguments as arguments
    else:
        from .training import CTCTrainingArguments as arguments
    return _default(arguments, "save_total_limit")


def _default(arguments: type, name: str):
    """A script flag's default, read from its argument dataclass rather than spelled again."""
    from dataclasses import fields

    return next(f.default for f in fields(arguments) if f.name == name)


def human(size: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.3g} {unit}" if unit != "B" else f"{size:.0f} B"
        size /= 1000
    raise AssertionError


def footprint_lines(rows: list[KindFootprint], keep_checkpoints: bool) -> list[str]:
    """The table ``run_grid.py --dry_run`` prints (each line a comment of the shell script it prints)."""
    lines = ["# disk footprint of the whole study (weights in float32, from the model's config; the data and feature caches under",
             "# ~/.cache and a few kB of tables, cards and logs per step are not counted):",
             f"#   {'kind':10} {'steps':>5} {'largest':>9} {'total':>9}"]
    for row in rows:
        kept = row.kept + (row.checkpoints if keep_checkpoints else 0)
        largest = row.largest_with_checkpoints if keep_checkpoints else row.largest
        lines.append(f"#   {row.kind:10} {row.steps:5d} {human(largest):>9} {human(kept):>9}")
    total, with_checkpoints = sum(row.kept for row in rows), sum(row.kept + row.checkpoints for row in rows)
    lines.append(f"#   {'total':10} {'':5} {'':9} {human(with_checkpoints if keep_checkpoints else total):>9}")
    running = max((row.running for row in rows), default=0)
    if keep_checkpoints:
        lines.append("# keep_checkpoints: true: every training step keeps its checkpoints (included above)")
    elif running:
        lines.append(f"# while it runs, a training step also holds up to {human(running)} of checkpoints (weights and AdamW states), removed once "
                     f"it succeeds; keep_checkpoints: true would make the total {human(with_checkpoints)}")
    return lines
