"""A ticket's mask as one type (``Mask``), its file format, and where a mask is read from. Only
numpy and safetensors are needed to read, compare (``utils.iou``) and write masks; torch is
imported only to hand them to a model (``Mask.bools``). How masks are computed is ``utils.pruning``.

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
from typing import TYPE_CHECKING, Optional, Union

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save

from .errors import MissingInput, UsageError
from .hub_client import hub_errors, invalid_repo_id
from .layout import MASK_FILE
from .runs import atomic_open

if TYPE_CHECKING:  # torch is imported only where a mask meets a model (unpack)
    import torch

MASK_FORMAT = "language-tickets-mask"
MASK_FORMAT_VERSION = 1
TIE_RULE = "lower score pruned first; equal scores: earlier tensor (named_parameters order), then lower row-major index, pruned first"


# ---------------------------------------------------------------------------------------------
# The file format


def pack(keep: torch.Tensor) -> np.ndarray:
    return np.packbits(keep.reshape(-1).cpu().numpy(), bitorder="little")


def unpack(packed: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    import torch

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
        return Mask.save_packed(path, {name: pack(keep) for name, keep in mask.items()}, {name: tuple(keep.shape) for name, keep in mask.items()},
                                {name: int(keep.sum()) for name, keep in mask.items()}, info, compress)

    @staticmethod
    def save_packed(path: Union[str, os.PathLike], packed: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]], kept: dict[str, int],
                    info: dict, compress: bool = True) -> dict:
        """``save`` for masks already packed (``pack``) tensor by tensor, as pruning from a
        checkpoint's files makes them, with each tensor's shape and kept count."""
        import zstandard

        digest = hashlib.sha256()
        for name in sorted(packed):
            digest.update(packed[name].tobytes())
        tensors, encodings = {}, {}
        for name, bits in packed.items():
            squeezed = np.frombuffer(zstandard.ZstdCompressor(level=3).compress(bits.tobytes()), dtype=np.uint8) if compress else bits
            use_zstd = compress and squeezed.nbytes <= 0.9 * bits.nbytes
            tensors[name] = squeezed if use_zstd else bits
            encodings[name] = "zstd" if use_zstd else "packbits"
        total = sum(math.prod(shape) for shape in shapes.values())
        metadata = {
            "format": MASK_FORMAT,
            "format_version": MASK_FORMAT_VERSION,
            "shapes": {name: list(shape) for name, shape in shapes.items()},
            "kept": dict(kept),
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
