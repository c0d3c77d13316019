"""Pruning masks: which weights are in scope, the exact global threshold, the mask file format,
and applying a mask to a model.

A mask in memory is ``dict[str, torch.BoolTensor]`` keyed by state-dict name, True = kept.

Pruning ranks the weights in scope by score (|w| for magnitude pruning, a seeded uniform draw for
the random control) and prunes exactly ``round(sparsity * N)`` of them. **Tie rule**: weights with
equal score are ordered by position, first by the order of their tensors in the model's
``named_parameters()``, then by row-major index inside the tensor; earlier positions are pruned
first. The threshold is found without ever concatenating the weights: a seeded sample brackets
it, one pass counts and collects the few scores inside the bracket, and a sort of those picks it.

Mask file (``mask.safetensors``), format version 1:
- one ``uint8`` tensor per pruned parameter, named after its state-dict key, holding the mask
  bits packed 8 per byte, little bit order (``numpy.packbits(bitorder="little")``) over the
  row-major flattened weight, zero-padded to a whole byte; zstd-compressed when that saves at
  least 10% (then ``encodings[name] == "zstd"``);
- safetensors metadata ``mask`` = JSON with ``format`` ("language-tickets-mask"),
  ``format_version``, ``shapes``, ``kept`` (per tensor), ``encodings``, ``total``, ``kept_total``,
  ``sparsity`` (asked for) and ``actual_sparsity``, ``scope``, ``method``, ``layerwise``,
  ``tie_rule``, ``seed``, ``language``, ``source_model``, ``source_revision``, ``model_type`` (the family; absent in older masks) and ``sha256``
  (of the uncompressed packed bits, tensors in sorted name order).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save

from .errors import MissingInput, UsageError
from .hub_client import hub_errors, invalid_repo_id
from .runs import atomic_open
from .structure import family_of, family_of_name

MASK_FORMAT = "language-tickets-mask"
MASK_FORMAT_VERSION = 1
MASK_FILE = "mask.safetensors"
TIE_RULE = "lower score pruned first; equal scores: earlier tensor (named_parameters order), then lower row-major index, pruned first"

# Named scopes, read from each family's entry in ``utils.structure``. Biases, norms, positional
# convolutions, adapters and the CTC head are never pruned.
PRUNE_SCOPES = {
    "encoder_linear": "every weight of the encoder layers' attention (q/k/v/out) and feed-forward matrices, and for conformer "
    "layers (w2v-BERT) both feed-forward blocks and the convolution module: the paper's and PARP's scope",
    "encoder_and_projection": "encoder_linear plus the feature projection",
    "encoder_projection_conv": "encoder_and_projection plus the conv feature encoder kernels (raw-waveform families; for tiny "
    "models, whose compute sits in the conv stack)",
}
PRUNE_METHODS = ("magnitude", "random")


def prunable_parameters(model: torch.nn.Module, scope: str = "encoder_linear") -> dict[str, torch.nn.Parameter]:
    """The weights a scope names, in ``named_parameters()`` order (the order the tie rule uses)."""
    if scope not in PRUNE_SCOPES:
        raise UsageError(f"unknown prune scope {scope!r}: expected one of {', '.join(PRUNE_SCOPES)}")
    family = family_of(model)
    if scope == "encoder_projection_conv" and family.feature_encoder is None:
        raise UsageError(f"prune scope {scope!r} needs a conv feature encoder, which a {family.name} model has none of: "
                         "expected encoder_linear or encoder_and_projection")
    conv = family.conv_kernel_pattern if scope == "encoder_projection_conv" else None

    def in_scope(name: str) -> bool:
        return bool(family.module_of(name) or (scope != "encoder_linear" and name == family.projection_weight) or (conv and conv.match(name)))

    return {name: param for name, param in model.named_parameters() if in_scope(name)}


def check_sparsity(sparsity: float) -> float:
    if not (isinstance(sparsity, (int, float)) and 0.0 < float(sparsity) < 1.0):
        raise UsageError(f"sparsity {sparsity!r} is outside (0, 1): expected e.g. 0.7, 0.8 or 0.9")
    return float(sparsity)


# ---------------------------------------------------------------------------------------------
# Scores and the exact threshold


ScoreFn = Callable[[int, torch.Tensor], torch.Tensor]


def score_fn(method: str, seed: int = 0) -> ScoreFn:
    """Score of each weight (lower = pruned first): |w| in float32, or a seeded uniform draw per tensor."""
    if method == "magnitude":
        return lambda index, weight: weight.detach().float().abs()
    if method == "random":

        def random_scores(index: int, weight: torch.Tensor) -> torch.Tensor:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
            return torch.rand(weight.shape, generator=generator)

        return random_scores
    raise UsageError(f"unknown prune method {method!r}: expected one of {', '.join(PRUNE_METHODS)}")


@dataclass(frozen=True)
class Threshold:
    """Prune every score below ``value``, and the first ``ties`` scores equal to it (tie rule)."""

    value: float
    ties: int


def find_thresholds(
    weights: list[torch.Tensor], counts: list[int], scores: ScoreFn, sample_size: int = 1 << 20, seed: int = 0
) -> list[Threshold]:
    """Exact thresholds that prune ``counts[j]`` of the scores of ``weights`` (each 0 < count < N),
    all sparsities sharing one pass over the weights per bracketing round."""
    sizes = [w.numel() for w in weights]
    total = sum(sizes)
    generator = torch.Generator().manual_seed(seed)
    sample = []
    for index, weight in enumerate(weights):
        take = max(1, math.ceil(sample_size * weight.numel() / total))
        positions = torch.randint(weight.numel(), (take,), generator=generator)
        sample.append(scores(index, weight).reshape(-1)[positions])
    sample = torch.sort(torch.cat(sample)).values
    m = sample.numel()
    results: list[Optional[Threshold]] = [None] * len(counts)
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
        below = {j: 0 for j in pending}
        inside: dict[int, list[torch.Tensor]] = {j: [] for j in pending}
        for index, weight in enumerate(weights):
            s = scores(index, weight).reshape(-1)
            for j, (lo, hi) in brackets.items():
                below[j] += int((s < lo).sum())
                inside[j].append(s[(s >= lo) & (s <= hi)])
        for j in pending:
            values = torch.cat(inside[j])
            rank = counts[j] - below[j]  # 1-based rank of the threshold inside the bracket
            if 1 <= rank <= values.numel():
                value = torch.sort(values).values[rank - 1].item()
                strictly_below = below[j] + int((values < value).sum())
                results[j] = Threshold(value=value, ties=counts[j] - strictly_below)
            else:
                widths[j] *= 4  # the sample missed: widen the bracket and count again
    return results  # type: ignore[return-value]


def masks_from_threshold(weights: list[torch.Tensor], threshold: Threshold, scores: ScoreFn) -> list[torch.Tensor]:
    """Bool masks (True = kept) applying ``threshold`` and its tie rule across ``weights`` in order."""
    ties_left = threshold.ties
    masks = []
    for index, weight in enumerate(weights):
        s = scores(index, weight)
        keep = s > threshold.value
        if ties_left > 0:
            tied = (s == threshold.value).reshape(-1).nonzero().squeeze(1)
            flat = keep.view(-1)
            flat[tied[ties_left:]] = True  # ties after the first `ties_left` (in position order) are kept
            ties_left -= min(ties_left, tied.numel())
        else:
            keep |= s == threshold.value
        masks.append(keep)
    return masks


def compute_masks(
    params: dict[str, torch.Tensor],
    sparsities: Iterable[float],
    method: str = "magnitude",
    layerwise: bool = False,
    seed: int = 0,
) -> dict[float, dict[str, torch.Tensor]]:
    """Masks for every sparsity: global (one threshold over all tensors) or layerwise (the same
    sparsity in every tensor, each tensor by the same rule)."""
    sparsities = [check_sparsity(s) for s in sparsities]
    names, weights = list(params), list(params.values())
    scores = score_fn(method, seed)
    groups = [(0, weights)] if not layerwise else [(i, [w]) for i, w in enumerate(weights)]
    out: dict[float, list[torch.Tensor]] = {s: [] for s in sparsities}
    for offset, group in groups:
        n = sum(w.numel() for w in group)
        counts = [round(s * n) for s in sparsities]
        indexed = lambda i, w, offset=offset: scores(offset + i, w)  # noqa: E731 - keep global tensor index for random scores
        solvable = [c for c in counts if 0 < c < n]
        thresholds = dict(zip(solvable, find_thresholds(group, solvable, indexed, seed=seed))) if solvable else {}
        for s, c in zip(sparsities, counts):
            if c == 0:
                out[s] += [torch.ones(w.shape, dtype=torch.bool) for w in group]
            elif c == n:
                out[s] += [torch.zeros(w.shape, dtype=torch.bool) for w in group]
            else:
                out[s] += masks_from_threshold(group, thresholds[c], indexed)
    return {s: dict(zip(names, masks)) for s, masks in out.items()}


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


def sparsity_of(mask: dict[str, torch.Tensor]) -> float:
    total = sum(k.numel() for k in mask.values())
    return 1.0 - sum(int(k.sum()) for k in mask.values()) / total


# ---------------------------------------------------------------------------------------------
# The file format


def pack(keep: torch.Tensor) -> np.ndarray:
    return np.packbits(keep.reshape(-1).cpu().numpy(), bitorder="little")


def unpack(packed: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    n = math.prod(shape)
    return torch.from_numpy(np.unpackbits(packed, count=n, bitorder="little").astype(bool)).reshape(shape)


MAX_ZSTD_RATIO = 1 << 15  # the most a zstd frame can expand (a 4-byte RLE block holds 128 KiB): bounds what a file may claim


def _claimed_bytes(path, metadata: dict, stored: dict[str, np.ndarray]) -> dict[str, int]:
    """Packed bytes of each tensor, checked against what the file stores before anything is
    allocated: malformed metadata, tensors of another dtype or rank, extra or missing tensors, and
    shapes claiming more bits than the stored bytes can hold are refused in one line."""
    import zstandard

    shapes, encodings = metadata.get("shapes"), metadata.get("encodings")
    if not isinstance(shapes, dict) or not isinstance(encodings, dict) or not isinstance(metadata.get("kept"), dict) or not isinstance(metadata.get("sha256"), str):
        raise UsageError(f"{path}: mask metadata lacks a valid shapes, encodings, kept or sha256 entry: the file is corrupted")
    if set(shapes) != set(stored) or set(encodings) != set(shapes):
        odd = sorted(set(shapes) ^ set(stored)) or sorted(set(shapes) ^ set(encodings))
        raise UsageError(f"{path}: the metadata and the stored tensors disagree on {odd[:3]}: the file is corrupted")
    nbytes = {}
    for name, shape in shapes.items():
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise UsageError(f"{path}: tensor {name!r} has shape {shape!r}: expected a list of non-negative integers")
        data = stored[name]
        if data.dtype != np.uint8 or data.ndim != 1:
            raise UsageError(f"{path}: tensor {name!r} is {data.dtype} with {data.ndim} dimension(s): expected 1-D uint8 packed bits")
        need = math.ceil(math.prod(shape) / 8)
        if encodings[name] == "packbits":
            fits = need == data.size
        elif encodings[name] == "zstd":
            try:
                declared = zstandard.frame_content_size(data[:18].tobytes())
            except zstandard.ZstdError:
                raise UsageError(f"{path}: tensor {name!r} is not a zstd frame: the file is corrupted") from None
            fits = need <= MAX_ZSTD_RATIO * data.size and declared in (need, -1)
        else:
            raise UsageError(f"{path}: tensor {name!r} has encoding {encodings[name]!r}: expected packbits or zstd")
        if not fits:
            raise UsageError(f"{path}: tensor {name!r} claims shape {shape} ({math.prod(shape):,} weights) but stores {data.size:,} "
                             f"{encodings[name]} bytes: refused before allocating anything")
        nbytes[name] = need
    return nbytes


@dataclass
class Mask:
    """A ticket's mask as one type: the bits of every tensor in one ``uint64`` buffer, each tensor
    starting on a word boundary (zero bits pad the gaps; the layout popcount-based IoU works on
    without copies), and the file's metadata. ``Mask.load`` reads any reference (path, ticket
    directory, Hub repo or file) and verifies it; ``bools`` and ``packed`` are its two views;
    ``Mask.save`` writes the file format above. No pickle.

        mask = Mask.load("tickets/en/sparsity-0.80").bools()   # {parameter name: BoolTensor}, True = kept
    """

    words: np.ndarray
    slices: dict[str, slice]  # word range of each tensor, names in sorted order
    metadata: dict
    label: str = ""  # what reports call it (IoU tables)

    @staticmethod
    def save(path: Union[str, os.PathLike], mask: dict[str, torch.Tensor], info: dict, compress: bool = True) -> dict:
        """Write ``mask`` (True = kept) with ``info`` (sparsity, scope, method, ...) to ``path``,
        atomically. Returns the metadata written."""
        import zstandard

        packed = {name: pack(keep) for name, keep in mask.items()}
        digest = hashlib.sha256()
        for name in sorted(packed):
            digest.update(packed[name].tobytes())
        tensors, encodings = {}, {}
        for name, bits in packed.items():
            squeezed = np.frombuffer(zstandard.ZstdCompressor(level=3).compress(bits.tobytes()), dtype=np.uint8) if compress else bits
            use_zstd = compress and squeezed.nbytes <= 0.9 * bits.nbytes
            tensors[name] = squeezed if use_zstd else bits
            encodings[name] = "zstd" if use_zstd else "packbits"
        kept = {name: int(keep.sum()) for name, keep in mask.items()}
        total = sum(k.numel() for k in mask.values())
        metadata = {
            "format": MASK_FORMAT,
            "format_version": MASK_FORMAT_VERSION,
            "shapes": {name: list(keep.shape) for name, keep in mask.items()},
            "kept": kept,
            "encodings": encodings,
            "bit_order": "little",
            "total": total,
            "kept_total": sum(kept.values()),
            "actual_sparsity": 1.0 - sum(kept.values()) / total,
            "tie_rule": TIE_RULE,
            "sha256": digest.hexdigest(),
            **info,
        }
        with atomic_open(path, "wb") as f:
            f.write(save(tensors, metadata={"mask": json.dumps(metadata, sort_keys=True)}))
        return metadata

    @classmethod
    def load(cls, reference: Union[str, os.PathLike], label: str = "") -> "Mask":
        """Read and verify the mask a reference names (see ``resolve_mask``)."""
        return cls.read(resolve_mask(reference), label)

    @cached_property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(self.metadata["shapes"][name]) for name in self.slices}

    @cached_property
    def sizes(self) -> dict[str, int]:
        return {name: math.prod(shape) for name, shape in self.shapes.items()}

    @cached_property
    def kept(self) -> dict[str, int]:
        return {name: int(self.metadata["kept"][name]) for name in self.slices}

    @property
    def density(self) -> float:
        return sum(self.kept.values()) / sum(self.sizes.values())

    def packed(self, name: str) -> np.ndarray:
        """Tensor ``name``'s packed bits (a ``uint8`` view into the buffer)."""
        start = self.slices[name].start * 8
        return self.words.view(np.uint8)[start : start + math.ceil(self.sizes[name] / 8)]

    def bools(self) -> dict[str, torch.Tensor]:
        """``{parameter name: BoolTensor}``, True = kept, in the file's (sorted) name order."""
        return {name: unpack(self.packed(name), shape) for name, shape in self.shapes.items()}

    @classmethod
    def read(cls, path: Union[str, os.PathLike], label: str = "") -> "Mask":
        """Read and verify a mask file (format, sizes, checksum), decompressing straight into the buffer."""
        import zstandard

        try:
            with safe_open(str(path), framework="numpy") as f:
                header = f.metadata() or {}
                if "mask" not in header:
                    raise UsageError(f"{path} is a safetensors file but not a mask of ours (no 'mask' metadata)")
                metadata = json.loads(header["mask"])
                stored = {name: f.get_tensor(name) for name in f.keys()}
        except UsageError:
            raise
        except Exception as err:  # safetensors raises several types for truncated or garbled files; bad JSON too
            raise UsageError(f"{path} is not a readable mask file ({type(err).__name__}: {err}): expected a mask.safetensors written by run_prune.py") from err
        if not isinstance(metadata, dict) or metadata.get("format") != MASK_FORMAT or metadata.get("format_version") != MASK_FORMAT_VERSION:
            found = (metadata.get("format"), metadata.get("format_version")) if isinstance(metadata, dict) else (type(metadata).__name__, None)
            raise UsageError(f"{path} has format {found[0]!r} v{found[1]}: expected {MASK_FORMAT!r} v{MASK_FORMAT_VERSION}")
        nbytes = _claimed_bytes(path, metadata, stored)
        names = sorted(nbytes)
        slices, total = {}, 0
        for name in names:
            slices[name] = slice(total, total + -(-nbytes[name] // 8))
            total = slices[name].stop
        words = np.zeros(total, dtype=np.uint64)
        raw = words.view(np.uint8)
        digest = hashlib.sha256()
        for name in names:
            if name not in stored:
                raise UsageError(f"{path} lacks tensor {name!r} listed in its metadata: the file is corrupted")
            target = raw[slices[name].start * 8 : slices[name].start * 8 + nbytes[name]]
            data = stored[name]
            try:
                if metadata["encodings"][name] == "zstd":
                    with zstandard.ZstdDecompressor().stream_reader(memoryview(data)) as reader:
                        filled = reader.readinto(memoryview(target))
                        while filled < nbytes[name] and (more := reader.readinto(memoryview(target)[filled:])):
                            filled += more
                        overflow = bool(reader.read(1))
                else:
                    filled, overflow = data.size, data.size > nbytes[name]
                    target[: min(data.size, nbytes[name])] = data[: nbytes[name]]
            except zstandard.ZstdError as err:
                raise UsageError(f"{path}: tensor {name!r} does not decompress ({err}): the file is corrupted") from err
            if filled != nbytes[name] or overflow:
                raise UsageError(f"{path}: tensor {name!r} holds the wrong number of bytes, expected {nbytes[name]}: the file is corrupted")
            digest.update(target)
        if digest.hexdigest() != metadata["sha256"]:
            raise UsageError(f"{path} fails its checksum (sha256 {digest.hexdigest()[:12]}..., expected {metadata['sha256'][:12]}...): the file is corrupted")
        return cls(words, slices, metadata, label)


# ---------------------------------------------------------------------------------------------
# References: where a mask is read from

_REPO = r"[^/@:\s]+/[^/@:\s]+"  # then checked by huggingface_hub's own repo-id rules
_REVISION = r"refs/(?:pr/\d+|convert/[\w.-]+)|[\w.-]+"  # a branch, tag or commit; a pull request or conversion ref
REFERENCE_FORMS = ("a local path, ORG/NAME[@REV] (a ticket repo), ORG/NAME[@REV]:PATH (a file of a masks dataset repo), "
                   "or hf://[datasets/]ORG/NAME[@REV][/PATH]")


def parse_reference(reference: str) -> tuple[str, str, str, Optional[str]]:
    """``(repo_id, repo_type, path_in_repo, revision)`` of a Hub mask reference. A malformed repo
    id, revision or path is refused in one line naming the reference and the accepted forms."""
    ref, repo_type = reference.strip(), "model"
    if ref.startswith("hf://"):
        ref = ref[len("hf://") :]
        if ref.startswith("datasets/"):
            repo_type, ref = "dataset", ref[len("datasets/") :]
        match = re.fullmatch(rf"({_REPO})(?:@({_REVISION}))?(?:/(.+))?", ref)
    else:
        match = re.fullmatch(rf"({_REPO})(?:@({_REVISION}))?(?::(.+))?", ref)
        if match and match.group(3):
            repo_type = "dataset"
    if not match:
        raise UsageError(f"mask reference {reference!r} is not an existing path nor a Hub reference: expected {REFERENCE_FORMS}")
    repo_id, revision, path = match.groups()
    if why := invalid_repo_id(repo_id):
        raise UsageError(f"mask reference {reference!r} names {repo_id!r}, not a valid repo id ({why}): expected {REFERENCE_FORMS}")
    if path is not None and (path.startswith("/") or "\\" in path or any(part in ("", ".", "..") for part in path.split("/"))):
        raise UsageError(f"mask reference {reference!r} has the path {path!r}: expected a relative path inside the repo (no '..', "
                         f"empty or absolute parts); references are {REFERENCE_FORMS}")
    if repo_type == "dataset" and not path:
        raise UsageError(f"mask reference {reference!r} names a dataset repo but no file in it: expected hf://datasets/ORG/NAME/PATH")
    return repo_id, repo_type, path or MASK_FILE, revision


def resolve_mask(reference: Union[str, os.PathLike]) -> Path:
    """A local path to the mask file a reference names, downloading (and caching) Hub files.

    References: a local path (a mask file, or a ticket directory holding ``mask.safetensors``);
    ``ORG/NAME`` (a ticket model repo's ``mask.safetensors``); ``ORG/NAME:PATH`` (a file in a masks
    *dataset* repo, e.g. ``me/xlsr-masks:masks/en/sparsity-0.80.safetensors``); ``hf://ORG/NAME[/PATH]``
    (model repo) or ``hf://datasets/ORG/NAME/PATH`` (dataset repo), the URL form of
    ``huggingface_hub``'s file system. ``@REVISION`` may follow the repo name."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    local = Path(os.path.expanduser(str(reference)))
    if local.is_dir():
        if not (local / MASK_FILE).is_file():
            raise MissingInput(f"{local} holds no {MASK_FILE}: expected a ticket directory written by run_prune.py")
        return local / MASK_FILE
    if local.is_file():
        return local
    repo_id, repo_type, path, revision = parse_reference(str(reference))
    try:
        with hub_errors(repo_id, f"download {path} from"):
            return Path(hf_hub_download(repo_id, path, repo_type=repo_type, revision=revision))
    except EntryNotFoundError as err:
        raise MissingInput(f"{repo_type} repo {repo_id} has no file {path!r} (from reference {str(reference)!r})") from err
    except UsageError:
        raise
    except Exception as err:  # offline / no such local path / network: all mean "not found"
        raise MissingInput(f"mask {str(reference)!r} is neither a local path nor reachable on the Hub ({type(err).__name__}: {err})") from err
