"""The study as a grid of steps: fine-tune each upstream language, prune each (and the base model)
at each sparsity, transfer every ticket to every downstream language, compare masks by IoU.

A study is a small YAML (or JSON) file; ``configs/paper.yaml`` is the paper's. Every step is a
command of ours with a file that marks it done, so a killed grid resumes where it stopped and
``--dry_run`` can hand the commands to other machines or a scheduler. Layout::

    <output_dir>/seed-<seed>/finetune/<upstream>/            run_finetune.py output
    <output_dir>/seed-<seed>/tickets/<upstream|base>/sparsity-0.80/
    <output_dir>/seed-<seed>/transfer/<upstream>-<downstream>/sparsity-0.80/results.json
    <output_dir>/seed-<seed>/iou/sparsity-0.80/iou.json
    <output_dir>/steps/<step>.json     command, settings, status, time of each step run
    <output_dir>/logs/<step>.log       its output
    <output_dir>/REPORT.md, results.csv, figures/
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from .languages import resolve_language
from .masks import MASK_FILE, check_sparsity
from .model import has_local_config_only
from .runs import write_json_atomic
from .tickets import local_ticket_dir, sparsity_dir, ticket_dirs

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class StudyConfig:
    """What a study runs. Keys of ``data`` are dataset flags shared by every training step;
    ``finetune``, ``prune`` and ``transfer`` hold extra flags of those scripts. ``{language}`` in a
    ``data`` value is replaced by each step's language."""

    name: str
    output_dir: str
    model: str
    upstream: list[str]
    downstream: list[str]
    sparsities: list[float]
    seeds: list[int] = field(default_factory=lambda: [42])
    data: dict[str, Any] = field(default_factory=dict)
    prune_base: bool = True
    transfer_base: bool = False
    launcher: str = "python"
    finetune: dict[str, Any] = field(default_factory=dict)
    prune: dict[str, Any] = field(default_factory=dict)
    transfer: dict[str, Any] = field(default_factory=dict)
    pretrain: dict[str, Any] = field(default_factory=dict)
    note: Optional[str] = None


def load_config(path: str) -> StudyConfig:
    """Read and validate a study config; every problem is one clear error before any work."""
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"grid config {path!r} does not exist") from None
    if not isinstance(raw, dict):
        raise ValueError(f"grid config {path!r} is not a mapping of settings")
    known = {f.name for f in fields(StudyConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"grid config {path!r} has unknown key(s) {unknown}: expected some of {sorted(known)}")
    missing = sorted(f.name for f in fields(StudyConfig) if f.name in {"name", "output_dir", "model", "upstream", "downstream", "sparsities"} and f.name not in raw)
    if missing:
        raise ValueError(f"grid config {path!r} lacks {missing}")
    config = StudyConfig(**raw)
    config.upstream = [resolve_language(code).code for code in config.upstream]
    config.downstream = [resolve_language(code).code for code in config.downstream]
    config.sparsities = sorted({check_sparsity(s) for s in config.sparsities})
    if not config.seeds or not all(isinstance(s, int) for s in config.seeds):
        raise ValueError(f"grid config seeds {config.seeds!r}: expected a list of integers")
    if config.pretrain:
        if config.data.get("dataset_name") != "generated" or "mixture" not in config.pretrain:
            raise ValueError("grid config 'pretrain' needs data.dataset_name: generated and a pretrain.mixture such as {en: 0.5, de: 0.25, es: 0.25}")
        config.pretrain["mixture"] = {resolve_language(code).code: float(w) for code, w in config.pretrain["mixture"].items()}
        if any(resolve_language(code).espeak_voice is None for code in config.pretrain["mixture"]):
            raise ValueError(f"pretrain.mixture {config.pretrain['mixture']} names a language without an espeak-ng voice")
    if config.data.get("dataset_name") == "generated":
        silent = [code for code in config.upstream + config.downstream if resolve_language(code).espeak_voice is None]
        if silent:
            raise ValueError(f"the generated corpus has no voice for {', '.join(sorted(set(silent)))}: use FLEURS for them or drop them from the config")
    return config


class StepFailed(RuntimeError):
    """A step's command failed; the message names the step, its exit code and its log."""


@dataclass
class Step:
    id: str
    kind: str
    argv: list[str]
    done: Path  # this file exists once the step has finished
    settings: dict[str, Any]


def _flags(settings: dict[str, Any]) -> list[str]:
    out = []
    for key, value in settings.items():
        if isinstance(value, (list, tuple)):
            out += [f"--{key}", *map(str, value)]
        else:
            out += [f"--{key}", str(value)]
    return out


def _data_flags(data: dict[str, Any], language: str) -> dict[str, Any]:
    """Dataset flags for one language: ``{language}`` in a value becomes its code (a local
    ``data_dir`` per language, say)."""
    return {k: v.format(language=language) if isinstance(v, str) else v for k, v in data.items()}


def plan(config: StudyConfig) -> list[Step]:
    """Every step of the study, in an order that respects their dependencies."""
    out = Path(config.output_dir)
    python = [sys.executable]
    launch = shlex.split(config.launcher) if config.launcher != "python" else python
    steps = []
    pretrain = {k: v for k, v in config.pretrain.items() if k not in ("mixture", "num_train")}
    if config.pretrain:  # a multilingual mixture of the generated corpus to pretrain the base on
        corpus = Path(config.data.get("generated_corpus_dir", "~/.cache/language-tickets/generated-corpus")).expanduser()
        settings = {
            "mix": [f"{code}={weight}" for code, weight in config.pretrain["mixture"].items()],
            "output_dir": str(corpus),
            "num_mix_train": config.pretrain.get("num_train", 2000),
            "num_train": config.data.get("generated_num_train", 2000),
            "num_eval": config.data.get("generated_num_eval", 200),
        }
        steps.append(Step("corpus/mul", "corpus", [*python, "-m", "utils.corpus", *_flags(settings)], corpus / "mul" / "corpus.json", settings))
    for seed in config.seeds:
        root = out / f"seed-{seed}"
        base = config.model
        if has_local_config_only(config.model):  # a tiny model with no pretrained weights: initialise the study's base
            base = str(root / "base-model")
            steps.append(Step(f"seed-{seed}/base-model", "init", [*python, "-m", "utils.model", "--init_from_config", config.model, "--output_dir", base, "--seed", str(seed)],
                              Path(base) / "config.json", {"model": config.model, "seed": seed}))
        if config.pretrain:
            target = root / "pretrain"
            settings = {"language": "mul", "data_dir": str(corpus / "mul"), "model_name_or_path": base, "output_dir": str(target), "seed": seed, **pretrain}
            steps.append(Step(f"seed-{seed}/pretrain", "pretrain", [*launch, str(ROOT / "run_finetune.py"), *_flags(settings)], target / "all_results.json", settings))
            base = str(target)
        for up in config.upstream:
            target = root / "finetune" / up
            settings = {"language": up, "model_name_or_path": base, "output_dir": str(target), "seed": seed, **_data_flags(config.data, up), **config.finetune}
            steps.append(Step(f"seed-{seed}/finetune/{up}", "finetune", [*launch, str(ROOT / "run_finetune.py"), *_flags(settings)], target / "all_results.json", settings))
        sources = [("base", base)] if config.prune_base else []
        sources += [(up, str(root / "finetune" / up)) for up in config.upstream]
        for label, source in sources:
            # Every ticket lands in tickets/<label>/sparsity-X.XX/, whatever the number of sparsities.
            target = root / "tickets" / label
            if len(config.sparsities) == 1:
                target = sparsity_dir(target, config.sparsities[0])
            settings = {"model_name_or_path": source, "language": label, "sparsity": config.sparsities, "output_dir": str(target), "seed": seed, **config.prune}
            done = ticket_dirs(target, config.sparsities)[config.sparsities[-1]] / MASK_FILE
            steps.append(Step(f"seed-{seed}/prune/{label}", "prune", [*python, str(ROOT / "run_prune.py"), *_flags(settings)], done, settings))
        tickets_from = config.upstream + (["base"] if config.transfer_base and config.prune_base else [])
        for up in tickets_from:
            for down in config.downstream:
                for s in config.sparsities:
                    target = root / "transfer" / f"{up}-{down}" / f"sparsity-{s:.2f}"
                    settings = {"upstream": up, "downstream": down, "sparsity": s, "tickets_dir": str(root / "tickets"), "output_dir": str(target), "seed": seed, **_data_flags(config.data, down), **config.transfer}
                    steps.append(Step(f"seed-{seed}/transfer/{up}-{down}/sparsity-{s:.2f}", "transfer", [*launch, str(ROOT / "run_transfer.py"), *_flags(settings)], target / "results.json", settings))
        labels = config.upstream
        for s in config.sparsities:
            target = root / "iou" / f"sparsity-{s:.2f}"
            masks = [f"{up}={local_ticket_dir(root / 'tickets', up, s)}" for up in labels]
            settings = {"masks": masks, "output_dir": str(target)} | ({"base": str(local_ticket_dir(root / "tickets", "base", s))} if config.prune_base else {})
            if len(masks) + config.prune_base >= 2:
                steps.append(Step(f"seed-{seed}/iou/sparsity-{s:.2f}", "iou", [*python, str(ROOT / "run_iou.py"), *_flags(settings)], target / "iou.json", settings))
    return steps


def step_record_path(output_dir: str, step: Step) -> Path:
    return Path(output_dir) / "steps" / (step.id.replace("/", "__") + ".json")


def run_step(config: StudyConfig, step: Step) -> dict:
    """Run one step as a subprocess, logging its output; record command, settings and outcome."""
    log = Path(config.output_dir) / "logs" / (step.id.replace("/", "__") + ".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    record = {"id": step.id, "kind": step.kind, "command": shlex.join(step.argv), "settings": step.settings, "status": "running", "started": time.time()}
    write_json_atomic(step_record_path(config.output_dir, step), record)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(log, "w", encoding="utf-8") as f:
        result = subprocess.run(step.argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    record |= {"finished": time.time(), "returncode": result.returncode, "log": str(log)}
    record["seconds"] = round(record["finished"] - record["started"], 1)
    record["status"] = "done" if result.returncode == 0 and step.done.exists() else "failed"
    write_json_atomic(step_record_path(config.output_dir, step), record)
    if record["status"] != "done":
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:] or [""]
        raise StepFailed(f"step {step.id} failed (exit {result.returncode}; see {log}): {tail[0]}")
    return record


def collect(config: StudyConfig) -> tuple[list[dict], dict[float, dict]]:
    """Transfer results of every seed, and IoU summaries per sparsity (matrices averaged over seeds)."""
    rows = []
    for path in sorted(Path(config.output_dir).glob("seed-*/transfer/*/sparsity-*/results.json")):
        rows.append(json.loads(path.read_text(encoding="utf-8")))
    ious: dict[float, dict] = {}
    for s in config.sparsities:
        found = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(Path(config.output_dir).glob(f"seed-*/iou/sparsity-{s:.2f}/iou.json"))]
        if not found:
            continue
        merged = dict(found[0])
        n = len(merged["labels"])
        for key in ("matrix", "random_matrix"):
            merged[key] = [[sum(f[key][i][j] for f in found) / len(found) for j in range(n)] for i in range(n)]
        merged["seeds"] = len(found)
        ious[s] = merged
    return rows, ious
