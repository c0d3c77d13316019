"""Tickets on disk: making them from a source model (shared by run_prune.py and the on-the-spot
pruning of run_transfer.py) and finding the ticket of an (upstream, sparsity) pair.

Local layout (``--tickets_dir``, default ``tickets``)::

    tickets/<upstream>/sparsity-0.80/   config.json, model.safetensors, mask.safetensors, README.md, ...

which is what ``run_prune.py --sparsity 0.7 0.8 0.9 --output_dir tickets/<upstream>`` writes.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from transformers import AutoFeatureExtractor, AutoModelForCTC, AutoProcessor, set_seed

from .errors import MissingInput
from .hub import write_ticket_card
from .layout import sparsity_dirname, ticket_dir
from .masks import MASK_FILE, Mask, apply_mask, compute_masks, prunable_parameters
from .runs import claim_output_dir, write_json_atomic

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PruneSpec:
    """How a ticket is cut: scope, method, global or layerwise, seed."""

    scope: str = "encoder_linear"
    method: str = "magnitude"
    layerwise: bool = False
    seed: int = 0


def ticket_signature(source: str, revision: str, spec: PruneSpec, sparsity: float) -> dict:
    """What defines a ticket directory (recorded as its run_signature.json)."""
    return {
        "script": "run_prune.py",
        "model_name_or_path": source,
        "model_revision": revision,
        "prune_scope": spec.scope,
        "method": spec.method,
        "layerwise": spec.layerwise,
        "seed": spec.seed,
        "sparsity": sparsity,
    }


def build_tickets(
    source: str, revision: str, targets: dict[float, Path], spec: PruneSpec, language: Optional[str], compress: bool = True
) -> dict[float, dict]:
    """Write one ticket per ``{sparsity: directory}``; returns each mask's metadata.

    Directories already holding the same ticket are reused; holding another run, refused. All
    masks come from one pass over the weights; each ticket is written to a temporary directory
    and renamed into place, so an interrupted run leaves no half ticket."""
    todo = []
    for sparsity, out in sorted(targets.items()):
        claim_output_dir(str(out), ticket_signature(source, revision, spec, sparsity))
        if (out / MASK_FILE).is_file():
            logger.info("%s already holds this ticket: reusing it", out)
        else:
            todo.append(sparsity)
    if not todo:
        return {}

    set_seed(spec.seed)  # a base model gets a fresh, seeded CTC head
    model = AutoModelForCTC.from_pretrained(source, revision=revision, dtype=torch.float32)
    try:
        processor = AutoProcessor.from_pretrained(source, revision=revision)
    except (OSError, ValueError, TypeError):  # base models ship a feature extractor but no tokenizer
        processor = AutoFeatureExtractor.from_pretrained(source, revision=revision)

    params = prunable_parameters(model, spec.scope)
    start = time.perf_counter()
    masks = compute_masks(params, todo, method=spec.method, layerwise=spec.layerwise, seed=spec.seed)
    logger.info("masks for %s over %d tensors (%d weights) in %.1f s", todo, len(params), sum(p.numel() for p in params.values()), time.perf_counter() - start)

    infos = {}
    # Ascending sparsity: each mask prunes a superset of the previous one (one total order), so
    # zeroing in place yields every ticket from one copy of the model.
    for sparsity in todo:
        apply_mask(model, masks[sparsity])
        out = targets[sparsity]
        tmp = out.with_name(f".{out.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)  # what a killed run left
        try:
            infos[sparsity] = _write_ticket(tmp, model, processor, masks[sparsity], source, revision, spec, sparsity, language, compress)
        except BaseException:  # a full disk, say: no half ticket stays behind; tickets already renamed into place are whole
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if out.exists():  # the same ticket, interrupted before its mask was written
            shutil.rmtree(out)
        tmp.rename(out)
        logger.info("ticket %s: %d of %d weights kept (%.4f sparsity)", out, infos[sparsity]["kept_total"], infos[sparsity]["total"], infos[sparsity]["actual_sparsity"])
    return infos


def _write_ticket(tmp: Path, model, processor, mask: dict, source: str, revision: str, spec: PruneSpec, sparsity: float,
                  language: Optional[str], compress: bool) -> dict:
    """A ticket's files in the staging folder ``tmp``: model, processor, mask, card, signature."""
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    info = {
        "sparsity": sparsity,
        "scope": spec.scope,
        "method": spec.method,
        "layerwise": spec.layerwise,
        "seed": spec.seed,
        "language": language,
        "source_model": source,
        "source_revision": getattr(model.config, "_commit_hash", None),
        "model_type": model.config.model_type,
    }
    metadata = Mask.save(tmp / MASK_FILE, mask, info, compress=compress)
    write_ticket_card(tmp, metadata)
    write_json_atomic(tmp / "run_signature.json", ticket_signature(source, revision, spec, sparsity))
    return metadata


def ticket_dirs(output_dir: str | Path, sparsities: list[float]) -> dict[float, Path]:
    """Where ``run_prune.py --output_dir`` puts each ticket: one sparsity straight into the
    directory, several into its ``sparsity-0.70/``, ``sparsity-0.80/``, ..."""
    if len(sparsities) == 1:
        return {sparsities[0]: Path(output_dir)}
    return {s: Path(output_dir) / sparsity_dirname(s) for s in sparsities}


def hub_ticket_exists(repo_id: str) -> bool:
    from huggingface_hub import HfApi

    try:
        return HfApi().file_exists(repo_id, MASK_FILE)
    except Exception:  # offline, no such repo, no access: not found here
        return False


def find_ticket(
    upstream: str,
    sparsity: float,
    tickets_dir: str,
    ticket_repo_pattern: Optional[str],
    upstream_model: Optional[str],
    spec: PruneSpec,
    revision: str = "main",
) -> tuple[str, str]:
    """``(reference, how)`` of the ticket for ``upstream`` at ``sparsity``: a local ticket
    directory, else a Hub repo from the pattern, else one pruned now from ``upstream_model``."""
    looked = []
    local = ticket_dir(tickets_dir, upstream, sparsity)
    if (local / MASK_FILE).is_file():
        return str(local), "local"
    looked.append(f"{local}/{MASK_FILE}")
    if ticket_repo_pattern:
        repo = ticket_repo_pattern.format(upstream=upstream, sparsity=sparsity)
        if hub_ticket_exists(repo):
            return repo, "hub"
        looked.append(f"Hub repo {repo}")
    if upstream_model:
        build_tickets(upstream_model, revision, {sparsity: local}, spec, language=upstream)
        return str(local), "pruned now"
    available = sorted(p.name for p in (Path(tickets_dir) / upstream).glob("sparsity-*") if (p / MASK_FILE).is_file())
    hint = f" ({upstream} has {', '.join(available)})" if available else ""
    raise MissingInput(
        f"no {upstream} ticket at sparsity {sparsity:.2f}{hint}: looked in {'; '.join(looked)}. "
        "Pass --ticket, run run_prune.py, or give --upstream_model to prune one now"
    )
