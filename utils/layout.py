"""Where the outputs of runs and studies live: the one place a folder or file name of the layout is
spelled. Scripts write, and the grid and reports read, through these names.

    <tickets_dir>/<upstream|base>/sparsity-0.80/           a ticket (run_prune.py): model, mask.safetensors, card
    <output_dir>/results.json                              run_transfer.py's TransferResult
    <output_dir>/iou.json                                  run_iou.py's IoUSummary
    <output_dir>/analysis.json                             run_analysis.py's AnalysisSummary
    <output_dir>/round-<r>/                                run_imp.py's round r: model, mask.safetensors, round.json
    <output_dir>/rewind/                                   run_imp.py's rewind point (model.safetensors)

A study (``run_grid.py``) under its output directory, per base ``base-<name>/`` when it has several:

    seed-<seed>/base-model/                                seeded random initialisation of a config-only model
    seed-<seed>/pretrain/                                  the base (run_pretrain.py, or the CTC stand-in)
    shared-base/base-model/, shared-base/pretrain/         the same, made once for every seed (``shared_base: true``)
    seed-<seed>/finetune/<upstream>/                       upstream model (run_finetune.py)
    seed-<seed>/tickets/<upstream|base>/sparsity-0.80/     tickets (one-shot; tickets-imp/, tickets-parp/ for the other methods)
    seed-<seed>/transfer/<upstream>-<downstream>/sparsity-0.80/   (transfer-imp/, transfer-parp/)
    seed-<seed>/iou/sparsity-0.80/
    seed-<seed>/iou-methods/sparsity-0.80/                 every method's tickets (two methods or more)
    seed-<seed>/analysis/sparsity-0.80/                    ablation, CKA and probes of the tickets (``analysis:``)
    iou-seeds/sparsity-0.80/                               every ticket of every seed (two seeds or more)
    steps/, logs/                                          each step's record and log
    REPORT.md, results.csv, figures/
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

RESULTS_FILE = "results.json"
IOU_FILE = "iou.json"
ANALYSIS_FILE = "analysis.json"
MASK_FILE = "mask.safetensors"  # a ticket's mask (format in utils/masks.py)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
IMP_ROUND_FILE = "round.json"  # run_imp.py's ImpRound, written last: a round folder without it is unfinished
TRAINER_RESULTS_FILE = "all_results.json"  # what the Trainer's save_metrics leaves when a training run is over


def has_local_config_only(path: str | Path) -> bool:
    """A local directory with a config but no weights: the caller asked for a random initialisation."""
    return Path(path).is_dir() and not any((Path(path) / f).exists() for f in WEIGHT_FILES)


def sparsity_dirname(sparsity: float) -> str:
    """``sparsity-0.80``: the folder (and Hub name part) of one sparsity."""
    return f"sparsity-{sparsity:.2f}"


def ticket_dir(tickets_dir: str | Path, label: str, sparsity: float) -> Path:
    """A language's (or the base's) ticket at one sparsity under a tickets folder."""
    return Path(tickets_dir) / label / sparsity_dirname(sparsity)


ONE_SHOT = "oneshot"  # the paper's way of finding a ticket; its folders keep their plain names


def _of_method(folder: str, method: str) -> str:
    return folder if method == ONE_SHOT else f"{folder}-{method}"


def imp_round_dir(output_dir: str | Path, round_: int) -> Path:
    """run_imp.py's folder of one round (0: the dense fine-tune)."""
    return Path(output_dir) / f"round-{round_}"


def imp_round_records(output_dir: str | Path) -> list[Path]:
    """The ``round.json`` of every finished round of a run_imp.py folder, in round order."""
    found = [p for p in Path(output_dir).glob(f"round-*/{IMP_ROUND_FILE}") if p.parent.name.removeprefix("round-").isdigit()]
    return sorted(found, key=lambda p: int(p.parent.name.removeprefix("round-")))


def rewind_dir(output_dir: str | Path) -> Path:
    """run_imp.py's rewind point: the weights every round after the first restarts from."""
    return Path(output_dir) / "rewind"


@dataclass(frozen=True)
class StudyLayout:
    """The folders of one study (one base's, with several bases) under ``root``."""

    root: Path

    def seed(self, seed: int) -> Path:
        return self.root / f"seed-{seed}"

    def _base_root(self, seed: Optional[int]) -> Path:
        return self.root / "shared-base" if seed is None else self.seed(seed)

    def base_model(self, seed: Optional[int]) -> Path:
        """A config-only model's seeded random weights; ``seed=None``: the one base every seed shares."""
        return self._base_root(seed) / "base-model"

    def pretrain(self, seed: Optional[int]) -> Path:
        """The pretrained base; ``seed=None``: the one base every seed shares."""
        return self._base_root(seed) / "pretrain"

    def finetune(self, seed: int, language: str) -> Path:
        return self.seed(seed) / "finetune" / language

    def tickets(self, seed: int, method: str = ONE_SHOT) -> Path:
        return self.seed(seed) / _of_method("tickets", method)

    def ticket(self, seed: int, label: str, sparsity: float, method: str = ONE_SHOT) -> Path:
        return ticket_dir(self.tickets(seed, method), label, sparsity)

    def transfer(self, seed: int, upstream: str, downstream: str, sparsity: float, method: str = ONE_SHOT) -> Path:
        return self.seed(seed) / _of_method("transfer", method) / f"{upstream}-{downstream}" / sparsity_dirname(sparsity)

    def methods_iou(self, seed: int, sparsity: float) -> Path:
        return self.seed(seed) / "iou-methods" / sparsity_dirname(sparsity)

    def iou(self, seed: int, sparsity: float) -> Path:
        return self.seed(seed) / "iou" / sparsity_dirname(sparsity)

    def analysis(self, seed: int, sparsity: float) -> Path:
        return self.seed(seed) / "analysis" / sparsity_dirname(sparsity)

    def seeds_iou(self, sparsity: float) -> Path:
        return self.root / "iou-seeds" / sparsity_dirname(sparsity)

    def step_id(self, path: Path, prefix: str = "") -> str:
        """A step's id: its output folder relative to the study (prefixed by its base)."""
        return prefix + path.relative_to(self.root).as_posix()
