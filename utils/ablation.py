"""Causal ablation of language tickets: which weights to zero, and zeroing them for a while.

For tickets A and B at the same sparsity, the "A-only" weights are those A keeps and B prunes.
Zeroing them in a model that carries A's mask (A's ticket, or A's ticket fine-tuned on a
downstream language) asks whether the weights only A kept matter; the control zeroes as many of
A's kept weights, tensor by tensor, chosen at random, so a loss caused merely by removing that many
weights from those tensors is not read as language-specific. ``groups`` splits a set by encoder
layer and by module type (``utils.structure.group_of``), to ask where the weights that matter sit.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from .errors import UsageError
from .masks import Mask
from .structure import group_of

Selection = dict[str, torch.Tensor]  # parameter name -> bool tensor of the weights to zero


def check_comparable(a: Mask, b: Mask) -> None:
    """Masks of one study's tickets: same family, same sparsity, same tensors and shapes; else one line."""
    info_a, info_b = a.metadata, b.metadata
    if info_a.get("model_type") != info_b.get("model_type"):
        raise UsageError(f"masks {a.label!r} ({info_a.get('model_type')}) and {b.label!r} ({info_b.get('model_type')}) come from different model families: "
                         "expected tickets of one model")
    if abs(info_a["sparsity"] - info_b["sparsity"]) > 1e-9:
        raise UsageError(f"masks {a.label!r} (sparsity {info_a['sparsity']:.2f}) and {b.label!r} (sparsity {info_b['sparsity']:.2f}): "
                         "expected tickets of the same sparsity")
    if a.shapes != b.shapes:
        odd = sorted(set(a.shapes) ^ set(b.shapes)) or sorted(n for n in a.shapes if a.shapes[n] != b.shapes[n])
        raise UsageError(f"masks {a.label!r} and {b.label!r} differ in their tensors ({', '.join(odd[:3])}): expected tickets pruned in the same scope")


def only_in(keep_a: Selection, keep_b: Selection) -> Selection:
    """The weights ``keep_a`` keeps and ``keep_b`` prunes, per tensor."""
    return {name: keep & ~keep_b[name] for name, keep in keep_a.items()}


def random_like(keep: Selection, chosen: Selection, seed: int) -> Selection:
    """As many weights per tensor as ``chosen`` holds, drawn uniformly among the weights ``keep``
    keeps (never a pruned one): the control of an ablation of ``chosen``."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, kept in keep.items():
        flat = kept.reshape(-1)
        positions = flat.nonzero().squeeze(1)
        count = int(chosen[name].sum())
        picked = torch.zeros_like(flat)
        picked[positions[torch.randperm(positions.numel(), generator=generator)[:count]]] = True
        out[name] = picked.reshape(kept.shape)
    return out


def groups(selection: Selection) -> dict[str, Selection]:
    """The selection split by encoder layer (``layer 3``) and by module type (``q``, ``ffn_in``, ...);
    weights outside the family table's layers fall in ``other``."""
    out: dict[str, Selection] = {}
    for name, chosen in selection.items():
        layer, module = group_of(name)
        for key in ([f"layer {layer}"] if layer is not None else []) + [module]:
            out.setdefault(key, {})[name] = chosen
    return out


def restricted(selection: Selection, group: Selection) -> Selection:
    """``selection`` limited to the tensors of ``group`` (empty elsewhere)."""
    return {name: chosen if name in group else torch.zeros_like(chosen) for name, chosen in selection.items()}


@contextmanager
def zeroed(model: torch.nn.Module, selection: Selection) -> Iterator[None]:
    """Inside the block the selected weights are 0; the model's own values come back after it."""
    params = dict(model.named_parameters())
    missing = sorted(set(selection) - set(params))
    if missing:
        raise UsageError(f"the mask names {missing[0]!r}, which the model lacks: expected a model of the ticket's architecture")
    saved = {}
    with torch.no_grad():
        for name, chosen in selection.items():
            where = chosen.to(params[name].device)
            saved[name] = (where, params[name][where].clone())
            params[name].masked_fill_(where, 0.0)
    try:
        yield
    finally:
        with torch.no_grad():
            for name, (where, values) in saved.items():
                params[name][where] = values


def count(selection: Selection) -> int:
    return sum(int(chosen.sum()) for chosen in selection.values())
