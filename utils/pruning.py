"""Pruning: which weights are in scope, the exact global threshold, and applying a mask to a model.

A mask in memory is ``dict[str, torch.BoolTensor]`` keyed by state-dict name, True = kept (on
disk, and between steps, it is the ``Mask`` type of ``utils.masks``).

Pruning ranks the weights in scope by score (|w| for magnitude pruning, a seeded uniform draw for
the random control) and prunes exactly ``round(sparsity * N)`` of them. **Tie rule**: weights with
equal score are ordered by position, first by the order of their tensors in the model's
``named_parameters()``, then by row-major index inside the tensor; earlier positions are pruned
first. The threshold is found without ever concatenating the weights: a seeded sample brackets
it, one pass counts and collects the few scores inside the bracket, and a sort of those picks it.
Each tensor's share of it (a ``Cut``) is known before any mask is built, so the weights may be
tensors of a model or tensors still in a checkpoint's files (``utils.ticket_files``).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch

from .errors import UsageError
from .structure import PRUNE_METHODS, PRUNE_SCOPES, Family, check_sparsity, family_of, family_of_name


def scope_filter(family: Family, scope: str) -> Callable[[str], bool]:
    """Whether a parameter name of a ``family`` model is in ``scope``; an unknown scope, or one the
    family cannot have, is refused in one line."""
    if scope not in PRUNE_SCOPES:
        raise UsageError(f"unknown prune scope {scope!r}: expected one of {', '.join(PRUNE_SCOPES)}")
    if scope == "encoder_projection_conv" and family.feature_encoder is None:
        raise UsageError(f"prune scope {scope!r} needs a conv feature encoder, which a {family.name} model has none of: "
                         "expected encoder_linear or encoder_and_projection")
    conv = family.conv_kernel_pattern if scope == "encoder_projection_conv" else None

    def in_scope(name: str) -> bool:
        return bool(family.module_of(name) or (scope != "encoder_linear" and name == family.projection_weight) or (conv and conv.match(name)))

    return in_scope


def prunable_parameters(model: torch.nn.Module, scope: str = "encoder_linear") -> dict[str, torch.nn.Parameter]:
    """The weights a scope names, in ``named_parameters()`` order (the order the tie rule uses)."""
    in_scope = scope_filter(family_of(model), scope)
    return {name: param for name, param in model.named_parameters() if in_scope(name)}


def prunable_names(family: Family, names: Iterable[str], scope: str = "encoder_linear") -> list[str]:
    """The names of a checkpoint's tensors a scope prunes, in the order ``prunable_parameters``
    gives them for the model (from the family table: no model is built)."""
    in_scope = scope_filter(family, scope)
    return sorted((name for name in names if in_scope(name)), key=family.parameter_rank)


# ---------------------------------------------------------------------------------------------
# Scores and the exact threshold


ScoreFn = Callable[..., torch.Tensor]  # (tensor index, weight, positions=None) -> scores, of the flat positions when given


def as_tensor(weight) -> torch.Tensor:
    """A weight given as a tensor, or as a handle on a checkpoint file (anything with ``load()``,
    see ``utils.ticket_files``): pruning reads both the same way."""
    return weight.load() if hasattr(weight, "load") else weight.detach()


def score_fn(method: str, seed: int = 0) -> ScoreFn:
    """Score of each weight (lower = pruned first): |w| in float32, or a seeded uniform draw per
    tensor; with ``positions``, only those of the flattened tensor (the threshold's sample)."""
    if method == "magnitude":

        def magnitudes(index: int, weight, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
            values = as_tensor(weight)
            return (values if positions is None else values.reshape(-1)[positions]).float().abs()

        return magnitudes
    if method == "random":

        def random_scores(index: int, weight, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
            scores = torch.rand(tuple(weight.shape), generator=generator)
            return scores if positions is None else scores.reshape(-1)[positions]

        return random_scores
    raise UsageError(f"unknown prune method {method!r}: expected one of {', '.join(PRUNE_METHODS)}")


@dataclass(frozen=True)
class Cut:
    """One tensor's share of a threshold: prune every score below ``value``, and the first ``quota``
    scores equal to it (in row-major order; the tie rule, with the quota of each tensor fixed by the
    ties of the tensors before it). Known before any mask is built, so masks can be made one tensor
    at a time, in any order."""

    value: float
    quota: int = 0


KEEP_ALL = Cut(-math.inf)
PRUNE_ALL = Cut(math.nan)  # no score is >= NaN: every weight pruned, an infinite one too


def find_thresholds(
    weights: list, counts: list[int], scores: ScoreFn, sample_size: int = 1 << 20, seed: int = 0
) -> list[list[Cut]]:
    """Exact thresholds that prune ``counts[j]`` of the scores of ``weights`` (each 0 < count < N),
    as each tensor's ``Cut``; all counts share one pass over the weights per bracketing round."""
    sizes = [w.numel() for w in weights]
    total = sum(sizes)
    generator = torch.Generator().manual_seed(seed)
    sample = []
    for index, weight in enumerate(weights):
        take = max(1, math.ceil(sample_size * weight.numel() / total))
        positions = torch.randint(weight.numel(), (take,), generator=generator)
        sample.append(scores(index, weight, positions))
    sample = torch.sort(torch.cat(sample)).values
    m = sample.numel()
    results: list[Optional[list[Cut]]] = [None] * len(counts)
    widths = [4.0] * len(counts)
    while any(r is None for r in results):
        pending = [j for j, r in enumerate(results) if r is None]
        brackets = {}
        for j in pending:
            q = counts[j] / total
            centre = q * m
            margin = widths[j] * math.sqrt(m * q * (1 - q)) + 64
            lo_i, hi_i = math.floor(centre - margin), math.ceil(centre + margin)
            lo = sample[lo_i].item() if lo_i >= 0 else -math.inf
            hi = sample[hi_i].item() if hi_i < m else math.inf
            brackets[j] = (lo, hi)
        # Per bracket: the scores below it are counted; those strictly inside are collected; those
        # equal to either end are only counted, per tensor, so a score shared by most weights (the
        # zeros of a pruned model, say) is never copied.
        below = {j: 0 for j in pending}
        inside: dict[int, list[torch.Tensor]] = {j: [] for j in pending}
        at_lo: dict[int, list[int]] = {j: [] for j in pending}
        at_hi: dict[int, list[int]] = {j: [] for j in pending}
        for index, weight in enumerate(weights):
            s = scores(index, weight).reshape(-1)
            for j, (lo, hi) in brackets.items():
                below[j] += int(torch.count_nonzero(s < lo))  # count_nonzero: a bool sum widens to int64 first
                inside[j].append(s[(s > lo) & (s < hi)])
                at_lo[j].append(int(torch.count_nonzero(s == lo)))
                at_hi[j].append(int(torch.count_nonzero(s == hi)) if hi != lo else 0)
        for j in pending:
            lo, hi = brackets[j]
            values = torch.sort(torch.cat(inside[j])).values
            n_lo, n_in, n_hi = sum(at_lo[j]), values.numel(), sum(at_hi[j])
            rank = counts[j] - below[j]  # 1-based rank of the threshold among the scores from lo to hi
            if not 1 <= rank <= n_lo + n_in + n_hi:
                widths[j] *= 4  # the sample missed: widen the bracket and count again
                continue
            if rank <= n_lo:
                value, ties_left, tied = lo, rank, at_lo[j]
            elif rank <= n_lo + n_in:
                value = values[rank - n_lo - 1].item()
                ties_left = rank - n_lo - int(torch.count_nonzero(values < value))
                tied = [int(torch.count_nonzero(t == value)) for t in inside[j]]
            else:
                value, ties_left, tied = hi, rank - n_lo - n_in, at_hi[j]
            cuts = []
            for count in tied:  # the tie rule: earlier tensors' ties are pruned first
                quota = min(ties_left, count)
                ties_left -= quota
                cuts.append(Cut(value, quota))
            results[j] = cuts
    return results  # type: ignore[return-value]


def cut_mask(scores: torch.Tensor, cut: Cut) -> torch.Tensor:
    """Bool mask (True = kept) of one tensor's scores under its ``cut``."""
    keep = scores >= cut.value
    if cut.quota:
        tied = (scores == cut.value).reshape(-1).nonzero().squeeze(1)
        keep.view(-1)[tied[: cut.quota]] = False
    return keep


def within_mask(scores: ScoreFn, keeps: list[torch.Tensor]) -> ScoreFn:
    """``scores`` with every weight a mask already prunes ranked below every kept one (score -1,
    under any magnitude or uniform draw): the new mask prunes those first, so it is a subset of the
    old one whatever the weights hold (iterative pruning's rounds)."""

    def restricted(index: int, weight, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        values = scores(index, weight, positions)
        keep = keeps[index].to(values.device)
        return values.masked_fill(~(keep if positions is None else keep.reshape(-1)[positions.to(keep.device)]), -1.0)

    return restricted


def plan_cuts(weights: list, sparsities: Iterable[float], method: str = "magnitude", layerwise: bool = False, seed: int = 0,
              scores: Optional[ScoreFn] = None) -> dict[float, list[Cut]]:
    """Each tensor's ``Cut`` for every sparsity: global (one threshold over all tensors) or
    layerwise (the same sparsity in every tensor, each tensor by the same rule). ``scores``
    replaces the method's own (``within_mask``)."""
    sparsities = [check_sparsity(s) for s in sparsities]
    scores = scores or score_fn(method, seed)
    groups = [(0, list(weights))] if not layerwise else [(i, [w]) for i, w in enumerate(weights)]
    out: dict[float, list[Cut]] = {s: [] for s in sparsities}
    for offset, group in groups:
        n = sum(w.numel() for w in group)
        counts = [round(s * n) for s in sparsities]
        indexed = lambda i, w, positions=None, offset=offset: scores(offset + i, w, positions)  # noqa: E731 - the global tensor index, for random scores
        solvable = sorted({c for c in counts if 0 < c < n})
        cuts = dict(zip(solvable, find_thresholds(group, solvable, indexed, seed=seed))) if solvable else {}
        for s, c in zip(sparsities, counts):
            out[s] += [KEEP_ALL] * len(group) if c == 0 else [PRUNE_ALL] * len(group) if c == n else cuts[c]
    return out


def compute_masks(
    params: dict[str, torch.Tensor],
    sparsities: Iterable[float],
    method: str = "magnitude",
    layerwise: bool = False,
    seed: int = 0,
    within: Optional[dict[str, torch.Tensor]] = None,
) -> dict[float, dict[str, torch.Tensor]]:
    """Masks for every sparsity, from ``plan_cuts``; with ``within`` (a mask of the same tensors),
    each a subset of it: its pruned weights stay pruned and the rest of the count is cut from the
    weights it keeps, by the same rule."""
    scores = score_fn(method, seed)
    if within is not None:
        scores = within_mask(scores, [within[name] for name in params])
    plans = plan_cuts(list(params.values()), sparsities, method, layerwise, seed, scores)
    return {s: {name: cut_mask(scores(i, w), cuts[i]) for i, (name, w) in enumerate(params.items())} for s, cuts in plans.items()}


# ---------------------------------------------------------------------------------------------
# Applying


def check_mask_fits(model: torch.nn.Module, mask: dict[str, torch.Tensor]) -> None:
    """Names and shapes of ``mask`` must all exist in ``model``; one clear error otherwise."""
    params = dict(model.named_parameters())
    missing = [name for name in mask if name not in params]
    if missing:
        family, made_for = family_of(model), family_of_name(missing[0])
        if made_for is not None and made_for is not family:
            raise UsageError(f"the mask was made for a {made_for.name} model but this model is {family.name}: expected a ticket of the same family")
        raise UsageError(f"mask names {len(missing)} parameter(s) the model lacks, e.g. {missing[0]!r}: expected a mask made for this architecture")
    for name, keep in mask.items():
        if tuple(keep.shape) != tuple(params[name].shape):
            raise UsageError(f"mask shape {tuple(keep.shape)} for {name!r} does not fit the model's {tuple(params[name].shape)}")


@torch.no_grad()
def apply_mask(model: torch.nn.Module, mask: dict[str, torch.Tensor]) -> None:
    """Set every pruned weight to exactly 0, in place."""
    check_mask_fits(model, mask)
    params = dict(model.named_parameters())
    for name, keep in mask.items():
        params[name].masked_fill_(~keep.to(params[name].device), 0)


def weights_digest(model: torch.nn.Module, names: Iterable[str]) -> str:
    """sha256 of the named weights' bytes, in the order given: which weights a run started or ended with."""
    params = dict(model.named_parameters())
    digest = hashlib.sha256()
    for name in names:
        digest.update(params[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def sparsity_of(mask: dict[str, torch.Tensor]) -> float:
    total = sum(k.numel() for k in mask.values())
    return 1.0 - sum(int(k.sum()) for k in mask.values()) / total
