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
from typing import Callable, Optional

import torch
from transformers import AutoFeatureExtractor, AutoModelForCTC, AutoProcessor, set_seed

from .errors import MissingInput
from .hub import write_ticket_card
from .hub_client import resolved_commit
from .layout import MASK_FILE, sparsity_dirname, ticket_dir
from .masks import Mask
from .pruning import apply_mask, compute_masks, prunable_parameters
from .runs import claim_output_dir, write_json_atomic
from .ticket_files import CheckpointFiles, plan_ticket_cuts, write_pruned_weights

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
    source: str, revision: str, targets: dict[float, Path], spec: PruneSpec, language: Optional[str], compress: bool = True, from_files: bool = True
) -> dict[float, dict]:
    """Write one ticket per ``{sparsity: directory}``; returns each mask's metadata.

    Directories already holding the same ticket are reused; holding another run, refused. A
    safetensors CTC checkpoint is pruned from its files (``utils.ticket_files``: no model built,
    memory near one shard); anything else, or ``from_files=False``, by loading the model. Both
    write the same ticket. All masks come from one plan over the weights; each ticket is written to
    a temporary directory and renamed into place, so an interrupted run leaves no half ticket."""
    todo = []
    for sparsity, out in sorted(targets.items()):
        claim_output_dir(str(out), ticket_signature(source, revision, spec, sparsity))
        if (out / MASK_FILE).is_file():
            logger.info("%s already holds this ticket: reusing it", out)
        else:
            todo.append(sparsity)
    if not todo:
        return {}

    files, why = CheckpointFiles.find(source, revision) if from_files else (None, "asked to build the model")
    if files is None:
        logger.info("pruning %s by loading the model: %s", source, why)
        return _build_from_model(source, revision, targets, todo, spec, language, compress)
    start = time.perf_counter()
    names, cuts = plan_ticket_cuts(files, spec.scope, todo, spec.method, spec.layerwise, spec.seed)
    logger.info("thresholds for %s over %d tensors (%d weights) from the files of %s in %.1f s", todo, len(names),
                sum(files.tensors[n].numel() for n in names), source, time.perf_counter() - start)
    processor = _load_processor(source, revision)
    info = mask_info(spec, language, source, resolved_commit(source, revision), files.config.model_type)

    def write(tmp: Path, sparsity: float) -> dict:
        mask = write_pruned_weights(files, tmp, names, cuts[sparsity], spec.method, spec.seed)
        files.config.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        metadata = Mask.save_packed(tmp / MASK_FILE, mask["packed"], mask["shapes"], mask["kept"], info | {"sparsity": sparsity}, compress=compress)
        return _finish_ticket(tmp, metadata, source, revision, spec, sparsity)

    return {sparsity: _stage(targets[sparsity], lambda tmp, s=sparsity: write(tmp, s)) for sparsity in todo}


def _build_from_model(source: str, revision: str, targets: dict[float, Path], todo: list[float], spec: PruneSpec, language: Optional[str],
                      compress: bool) -> dict[float, dict]:
    """The tickets of ``todo`` from the loaded model (base models, .bin and older checkpoints)."""
    set_seed(spec.seed)  # a base model gets a fresh, seeded CTC head
    model = AutoModelForCTC.from_pretrained(source, revision=revision, dtype=torch.float32)
    processor = _load_processor(source, revision)
    params = prunable_parameters(model, spec.scope)
    start = time.perf_counter()
    masks = compute_masks(params, todo, method=spec.method, layerwise=spec.layerwise, seed=spec.seed)
    logger.info("masks for %s over %d tensors (%d weights) in %.1f s", todo, len(params), sum(p.numel() for p in params.values()), time.perf_counter() - start)
    info = mask_info(spec, language, source, resolved_commit(source, revision), model.config.model_type)

    def write(tmp: Path, sparsity: float) -> dict:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        metadata = Mask.save(tmp / MASK_FILE, masks[sparsity], info | {"sparsity": sparsity}, compress=compress)
        return _finish_ticket(tmp, metadata, source, revision, spec, sparsity)

    infos = {}
    # Ascending sparsity: each mask prunes a superset of the previous one (one total order), so
    # zeroing in place yields every ticket from one copy of the model.
    for sparsity in todo:
        apply_mask(model, masks[sparsity])
        infos[sparsity] = _stage(targets[sparsity], lambda tmp, s=sparsity: write(tmp, s))
    return infos


def _load_processor(source: str, revision: str):
    try:
        return AutoProcessor.from_pretrained(source, revision=revision)
    except (OSError, ValueError, TypeError):  # base models ship a feature extractor but no tokenizer
        return AutoFeatureExtractor.from_pretrained(source, revision=revision)


def mask_info(spec: PruneSpec, language: Optional[str], source: str, source_revision: Optional[str], model_type: str) -> dict:
    """What a ticket's mask records besides its bits (its sparsity is added per ticket)."""
    return {
        "scope": spec.scope,
        "method": spec.method,
        "layerwise": spec.layerwise,
        "seed": spec.seed,
        "language": language,
        "source_model": source,
        "source_revision": source_revision,
        "model_type": model_type,
    }


def _finish_ticket(tmp: Path, metadata: dict, source: str, revision: str, spec: PruneSpec, sparsity: float) -> dict:
    write_ticket_card(tmp, metadata)
    write_json_atomic(tmp / "run_signature.json", ticket_signature(source, revision, spec, sparsity))
    return metadata


def _stage(out: Path, write: Callable[[Path], dict]) -> dict:
    """Run ``write`` on a staging folder beside ``out``, then rename it into place: a full disk,
    say, leaves no half ticket (tickets already renamed into place are whole)."""
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # what a killed run left
    tmp.mkdir(parents=True)
    try:
        metadata = write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():  # the same ticket, interrupted before its mask was written
        shutil.rmtree(out)
    tmp.rename(out)
    logger.info("ticket %s: %d of %d weights kept (%.4f sparsity)", out, metadata["kept_total"], metadata["total"], metadata["actual_sparsity"])
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
