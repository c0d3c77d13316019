"""Pruning a checkpoint from its safetensors files, without building the model.

The scope and the tie rule's order come from the family table (``pruning.prunable_names``), each
in-scope tensor is read on its own (its file mapped only while that tensor is copied out), and the
ticket's weights are written shard by shard, out-of-scope tensors copied through. Memory stays
near one shard (``SHARD_BYTES``) whatever the model's size. The ticket equals what pruning the
loaded model writes, tensor for tensor and bit for bit (tests/test_ticket_files.py); a checkpoint
this path cannot read the same way (not safetensors, not a CTC model of this transformers, not
float32) is refused with the reason, and ``tickets.build_tickets`` builds the model instead.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from huggingface_hub import split_state_dict_into_shards_factory
from huggingface_hub.constants import SAFETENSORS_INDEX_FILE, SAFETENSORS_SINGLE_FILE
from safetensors import safe_open
from safetensors.torch import save_file

from .hub_client import checkpoint_file
from .masks import pack
from .pruning import Cut, cut_mask, plan_cuts, prunable_names, score_fn
from .runs import write_json_atomic
from .structure import FAMILIES

SHARD_BYTES = 256 * 2**20  # the most weight bytes held at once while a ticket is written
_SHARD_PATTERN = SAFETENSORS_SINGLE_FILE.replace(".safetensors", "{suffix}.safetensors")  # model-00001-of-00005.safetensors


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a safetensors file, read when asked (``masks.as_tensor`` knows ``load``)."""

    file: Path
    name: str
    shape: tuple[int, ...]
    dtype: str

    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel() * 4  # float32: checked by CheckpointFiles.find

    def load(self) -> torch.Tensor:
        with safe_open(str(self.file), framework="pt") as f:
            return f.get_tensor(self.name)


@dataclass(frozen=True)
class CheckpointFiles:
    """A checkpoint's tensors by name, and its config (read by transformers, no model built)."""

    tensors: dict[str, StoredTensor]
    config: object

    @classmethod
    def find(cls, source: str, revision: str) -> tuple[Optional["CheckpointFiles"], str]:
        """``(files, "")`` when ``source`` (a local dir or a Hub id) can be pruned from its files,
        else ``(None, why not)``."""
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(source, revision=revision)
        architectures = getattr(config, "architectures", None) or []
        if config.model_type not in FAMILIES or len(architectures) != 1 or not architectures[0].endswith("ForCTC"):
            return None, f"it is not a CTC checkpoint (architectures {architectures}): building the model gives it a new CTC head"
        written_by = str(getattr(config, "transformers_version", "") or "0")
        if int(written_by.split(".")[0]) < 5:
            return None, f"transformers {written_by} wrote it, and loading renames some of its tensors"
        index = checkpoint_file(source, revision, SAFETENSORS_INDEX_FILE)
        if index is not None:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            paths = {file: checkpoint_file(source, revision, file) for file in sorted(set(weight_map.values()))}
        else:
            single = checkpoint_file(source, revision, SAFETENSORS_SINGLE_FILE)
            if single is None:
                return None, "it holds no safetensors weights (a pytorch_model.bin checkpoint?)"
            paths = {SAFETENSORS_SINGLE_FILE: single}
        tensors = {}
        for path in paths.values():
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    stored = f.get_slice(name)
                    tensors[name] = StoredTensor(path, name, tuple(stored.get_shape()), stored.get_dtype())
        odd = sorted({t.dtype for t in tensors.values()} - {"F32"})
        if odd:
            return None, f"it stores {', '.join(odd)} tensors, which the ticket holds as float32"
        if f"{FAMILIES[config.model_type].head}.weight" not in tensors:
            return None, "it has no CTC head weights"
        return cls(tensors, config), ""


def plan_ticket_cuts(files: CheckpointFiles, scope: str, sparsities: list[float], method: str, layerwise: bool, seed: int) -> tuple[list[str], dict[float, list[Cut]]]:
    """The in-scope names (tie-rule order) and each one's ``Cut`` per sparsity, from the files."""
    names = prunable_names(FAMILIES[files.config.model_type], files.tensors, scope)
    return names, plan_cuts([files.tensors[n] for n in names], sparsities, method, layerwise, seed)


def write_pruned_weights(files: CheckpointFiles, out: Path, names: list[str], cuts: list[Cut], method: str, seed: int) -> dict:
    """Write the ticket's weights into ``out`` shard by shard (an index when there are several):
    in-scope tensors with their pruned weights at 0, the rest copied. Returns the mask, packed,
    as ``{"packed", "shapes", "kept"}`` for ``Mask.save_packed``, in tie-rule order."""
    scores = score_fn(method, seed)
    position = {name: i for i, name in enumerate(names)}
    packed, kept = {}, {}
    split = split_state_dict_into_shards_factory(files.tensors, get_storage_size=lambda t: t.nbytes, filename_pattern=_SHARD_PATTERN,
                                                 max_shard_size=SHARD_BYTES)
    for filename, shard_names in split.filename_to_tensors.items():
        shard = {}
        for name in shard_names:
            tensor = files.tensors[name].load()
            if name in position:
                keep = cut_mask(scores(position[name], tensor), cuts[position[name]])
                tensor = torch.where(keep, tensor, 0.0)
                packed[name], kept[name] = pack(keep), int(torch.count_nonzero(keep))
            shard[name] = tensor
        save_file(shard, str(out / filename), metadata={"format": "pt"})
        del shard
    if split.is_sharded:
        write_json_atomic(out / SAFETENSORS_INDEX_FILE, {"metadata": split.metadata, "weight_map": split.tensor_to_filename})
    return {"packed": {n: packed[n] for n in names}, "shapes": {n: files.tensors[n].shape for n in names}, "kept": {n: kept[n] for n in names}}
