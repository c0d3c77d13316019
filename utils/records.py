"""The records one step writes and another reads, as typed records shared by writer and reader:
``TransferResult`` (run_transfer.py's ``results.json``: one cell of the study's grid),
``ImpRound`` (each round of run_imp.py), ``IoUSummary`` (run_iou.py's ``iou.json``),
``AnalysisSummary`` (run_analysis.py's ``analysis.json``) and ``StepRecord`` (the grid's record of each step it
ran). Each is written atomically and read back checked: a file missing a field, or holding one the
record does not know, is refused in one line naming the file and the fields."""

from __future__ import annotations

import json
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, TypeVar, Union

from .errors import UsageError
from .runs import write_json_atomic

R = TypeVar("R", bound="_Record")


class _Record:
    """JSON round trip of a dataclass record, every field checked on reading."""

    COMPACT = False  # one line instead of indented JSON (records of long number lists)

    def write(self, path: Union[str, os.PathLike]) -> None:
        write_json_atomic(path, asdict(self), self.COMPACT)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls: type[R], values: dict[str, Any], source: str = "record") -> R:
        known = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        missing, unknown = sorted(required - set(values)), sorted(set(values) - known)
        if missing or unknown:
            raise UsageError(f"{source} is not a {cls.__name__}: " + "; ".join(
                part for part in (f"missing {missing}" if missing else "", f"unknown {unknown}" if unknown else "") if part))
        return cls(**values)

    @classmethod
    def read(cls: type[R], path: Union[str, os.PathLike]) -> R:
        try:
            values = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise UsageError(f"{path} is not JSON ({err}): expected a {cls.__name__} written by this suite") from None
        if not isinstance(values, dict):
            raise UsageError(f"{path} holds a {type(values).__name__}: expected a JSON object ({cls.__name__})")
        return cls.from_dict(values, str(path))


@dataclass
class TransferResult(_Record):
    """One transfer run: which ticket, on which language, how it scored, and how it was run."""

    upstream: str
    downstream: str
    sparsity: float
    ticket: str
    ticket_found: str
    ticket_source_model: Optional[str]
    ticket_mask_sha256: str
    prune_scope: str
    prune_method: str
    dense_transfer: bool
    new_head: bool
    test_cer: float
    test_wer: float
    test_samples: int
    test_loss: float
    eval_loss: float
    eval_cer: float
    best_checkpoint: Optional[str]
    freeze_epochs: int
    frozen_in_epochs: list[int]
    epochs: float
    steps: int
    train_samples: int
    seed: int
    learning_rate: float
    per_device_train_batch_size: int
    world_size: int
    dataset: Optional[str]
    measured_sparsity: float
    mask_held: bool
    final_weights_sha256: str
    wall_time_s: float
    transformers_version: str
    command: str
    transfer_args: dict
    suite_version: Optional[str] = None  # language-tickets' version (None in results written before 0.9.0)


@dataclass
class ImpRound(_Record):
    """One round of run_imp.py (``round.json`` in its folder): the mask it trained with (none in
    round 0), the in-scope weights it started from after the rewind, and how it scored."""

    round: int
    sparsity: float  # of the mask held in this round (0.0: round 0, dense)
    kept: int
    total: int
    mask_sha256: Optional[str]
    start_weights_sha256: str  # the in-scope weights after the rewind, before the first step
    eval_loss: float
    eval_cer: float
    test_cer: float
    steps: int
    seconds: float
    suite_version: Optional[str] = None


@dataclass
class IoUSummary(_Record):
    """One comparison of masks: labels, the IoU matrix and its random baseline, every pair's row
    and the per-layer / per-module rows (see ``utils.iou``)."""

    labels: list[str]
    references: dict[str, str]
    sparsity: float
    scope: str
    density: float
    random_baseline: float
    matrix: list[list[float]]
    random_matrix: list[list[float]]
    vs_base: dict[str, float]
    pairs: list[dict]
    layers: list[dict]
    suite_version: Optional[str] = None  # language-tickets' version (None in summaries written before 0.9.0)


@dataclass
class AnalysisSummary(_Record):
    """What run_analysis.py measured on the tickets of one sparsity (and study seed). Ablation rows
    keep each utterance's edit counts (``edits``, ``lengths``: the report's intervals pair them by
    utterance); CKA rows one value per (language, model pair, layer); probe rows the accuracy of each
    (seed, fold) and of its shuffled-label control. Written on one line: the edit counts are long."""

    COMPACT = True
    sparsity: float
    seed: int
    tickets: dict[str, str]
    analyses: list[str]
    layers: list[int]
    ablation: list[dict]
    cka: list[dict]
    probes: list[dict]
    probe_folds: int
    suite_version: str


@dataclass
class StepRecord(_Record):
    """What the grid knows of one step it ran: the command and identity the plan gave it, then what
    its job reported (queued, running with host and pid, done or failed with the exit code)."""

    id: str
    kind: str
    command: str
    settings: dict
    identity: dict
    needs: list[str]
    status: Optional[str] = None  # queued, running, done, failed, interrupted (stopped by a signal), requeued
    executor: Optional[str] = None
    job_id: Optional[str] = None
    queued: Optional[float] = None
    started: Optional[float] = None
    finished: Optional[float] = None
    seconds: Optional[float] = None
    host: Optional[str] = None
    pid: Optional[int] = None
    returncode: Optional[int] = None
    log: Optional[str] = None


@dataclass
class StudyResults:
    """What the finished steps of one study wrote, as the report reads it (``utils.grid.collect``):
    transfer runs and upstream fine-tunes (each a dict with its per-utterance test rows under
    ``utterances``), IoU summaries per sparsity (matrices averaged over seeds, ``per_seed`` kept),
    the seed-to-seed IoU per sparsity, whether every seed started from one shared base, the
    steps whose results are missing (step id, why), with several ticket-finding methods each
    one's transfer runs and the IoU of every method's tickets, and the analyses of the tickets."""

    rows: list[dict]
    ious: dict[float, dict]
    seed_ious: dict[float, dict]
    own: list[dict]  # upstream fine-tunes: {"upstream", "seed", "test_cer", "utterances"}
    shared_base: bool = False
    missing: list[tuple[str, str]] = field(default_factory=list)
    method_rows: dict[str, list[dict]] = field(default_factory=dict)  # with several methods: each one's transfer runs (one-shot's too)
    method_ious: dict[float, dict] = field(default_factory=dict)  # every method's tickets compared, per sparsity (matrices averaged over seeds)
    imp_rounds: list[dict] = field(default_factory=list)  # each IMP run: {"upstream", "seed", "rounds": [ImpRound as a dict, ...]}
    analyses: dict[float, list[dict]] = field(default_factory=dict)  # run_analysis.py's AnalysisSummary (as a dict) of each seed, per sparsity
