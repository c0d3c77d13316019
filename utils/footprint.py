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

from .grid import Step, StudyConfig, sub_studies

CHECKPOINT_FACTOR = 3  # weights + AdamW's exp_avg and exp_avg_sq, each the size of the weights
DEFAULT_SAVE_TOTAL_LIMIT = 2  # CTCTrainingArguments / PretrainingArguments
KINDS = ("init", "pretrain", "finetune", "prune", "transfer")  # the kinds that write weights


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
    each: int  # bytes a finished step of this kind keeps
    checkpoint: int  # bytes of one of its checkpoints (0: not a training step)
    checkpoints: int  # how many it keeps while training (save_total_limit)


def study_footprint(config: StudyConfig, steps: list[Step], size_of: Callable[[str], ModelSize]) -> list[KindFootprint]:
    """Per step kind that writes weights: how many steps, what each keeps, its checkpoints."""
    models = {prefix: (config.bases.get(name, {}).get("model") if name else None) or config.model for name, _, prefix in sub_studies(config)}
    sizes = {reference: size_of(reference) for reference in set(models.values())}
    found: dict[str, list[tuple[int, int, int]]] = {}
    for step in steps:
        if step.kind not in KINDS:
            continue
        prefix = next((p for p in models if p and step.id.startswith(p)), "")
        size = sizes[models[prefix]]
        pretraining = step.kind == "pretrain" and any(arg.endswith("run_pretrain.py") for arg in step.argv)
        weights = size.pretraining_bytes if pretraining else size.ctc_bytes
        each = weights + (math.ceil(size.prunable / 8) if step.kind == "prune" else 0)
        training = step.kind in ("pretrain", "finetune", "transfer")
        limit = int(step.settings.get("save_total_limit") or DEFAULT_SAVE_TOTAL_LIMIT) if training else 0
        found.setdefault(step.kind, []).append((each, CHECKPOINT_FACTOR * weights if training else 0, limit))
    return [KindFootprint(kind, len(rows), max(r[0] for r in rows), max(r[1] for r in rows), max(r[2] for r in rows))
            for kind in KINDS if (rows := found.get(kind))]


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
             f"#   {'kind':10} {'steps':>5} {'each':>9} {'total':>9}"]
    total = kept = 0
    for row in rows:
        each = row.each + (row.checkpoints * row.checkpoint if keep_checkpoints else 0)
        lines.append(f"#   {row.kind:10} {row.steps:5d} {human(each):>9} {human(row.steps * each):>9}")
        total += row.steps * each
        kept += row.steps * (row.each + row.checkpoints * row.checkpoint)
    lines.append(f"#   {'total':10} {'':5} {'':9} {human(total):>9}")
    training = [row for row in rows if row.checkpoint]
    if training:
        biggest = max(training, key=lambda row: row.checkpoint * row.checkpoints)
        if keep_checkpoints:
            lines.append("# keep_checkpoints: true: every training step keeps its checkpoints (the totals above include them)")
        else:
            lines.append(f"# while it runs, a training step also holds up to {biggest.checkpoints + 1} checkpoints of {human(biggest.checkpoint)} "
                         f"(weights and AdamW states), removed once it succeeds; keep_checkpoints: true would make the total {human(kept)}")
    return lines

