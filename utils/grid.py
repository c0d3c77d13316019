"""The study as a grid of steps: fine-tune each upstream language, prune each (and the base model)
at each sparsity, transfer every ticket to every downstream language, compare masks by IoU.

A study is a small YAML (or JSON) file; ``configs/paper.yaml`` is the paper's. Every step is a
command of ours with a file that marks it done, so a killed grid resumes where it stopped and
``--dry_run`` can hand the commands to other machines or a scheduler. Where each step's output
lives is ``utils.layout``'s (one folder per step: its id is that folder relative to the study);
the grid adds, under the output directory, ``steps/<step>.json`` (command, settings, identity,
status and time of each step run), ``logs/<step>.log``, and ``stale/<time>/<step>/`` (outputs of
stale steps moved aside by ``--rerun_stale``).

With several bases (``bases:``), each base is a study of its own under ``base-<name>/``, started per
seed from its model, or pretrained by ``run_pretrain.py`` from the same initial weights (the
checkpoint, or a config dir's random weights drawn from the seed), and the top-level report
compares them (``utils.bases``).

**Stale steps.** A step's identity is the flags the grid passes it (runtime-only flags such as
logging or output paths left out, see ``utils.runs.RUNTIME_FIELDS``) together with the identities
of the steps it needs. It is recorded when the step runs. A finished step whose recorded identity
differs from the plan's (a config edit changed one of its settings, or one of a step it needs) is
*stale*: the runner refuses to mix it with new results until ``--rerun_stale`` moves its outputs
aside and runs it again. A config edit that changes nothing a step depends on leaves it done.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

from .arguments import GENERATED_CORPUS_DIR, fill_language
from .errors import MissingInput, UsageError
from .executors import LIVE_STATES, TRAINING_KINDS, JobSpec, Resources, launch_command, parse_resources, parse_slurm, read_record
from .languages import resolve_language
from .layout import (ANALYSIS_FILE, IOU_FILE, MASK_FILE, ONE_SHOT, RESULTS_FILE, TRAINER_RESULTS_FILE, StudyLayout, has_local_config_only, imp_round_records,
                     sparsity_dirname)
from .mixture import parse_mixture
from .records import AnalysisSummary, ImpRound, IoUSummary, StepRecord, StudyResults, TransferResult
from .runs import RUNTIME_FIELDS, SECRET_FLAGS, first_difference, hide_token
from .structure import FINDING_METHODS, check_sparsity, method_label

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class StudyConfig:
    """What a study runs. Keys of ``data`` are dataset flags shared by every training step;
    ``finetune``, ``prune`` and ``transfer`` hold extra flags of those scripts. ``{language}`` in a
    ``data`` value is replaced by each step's language.

    The base the upstream languages are fine-tuned from is ``model`` itself, or (``ctc_pretrain``)
    a CTC stand-in trained on a generated mixture (the demo's), or (``bases``) several
    self-supervised bases, each ``{mixture: {en: 0.7, ...}, other run_pretrain.py flags}`` (pretrained
    by ``run_pretrain.py`` with the ``ssl_pretrain`` flags) or ``{model: ORG/NAME}`` (a published
    base of any supported family, or a config directory), the whole study run per base, and the
    bases compared on the advantage of ``dominant`` (default: the language with the largest share
    in any base's mixture). With ``shared_base``, every seed starts from one base made with the
    first seed (as every seed of an XLS-R study starts from the one published checkpoint), so the
    seeds differ only in fine-tuning, pruning and transfer.

    ``methods`` lists how each language's tickets are found: ``oneshot`` (the paper's: fine-tune,
    then run_prune.py), ``imp`` (run_imp.py from the base, with the ``finetune`` flags and the
    ``imp`` ones over them) and ``parp`` (run_finetune.py ``--parp_sparsity`` from the base, with the
    ``finetune`` flags and the ``parp`` ones over them). Every method's tickets are transferred to
    every downstream language and compared by IoU with the others'; ``oneshot`` is always one of
    them, the reference the others are compared with.

    ``analysis`` (any mapping, ``{}`` included, turns it on) runs run_analysis.py on each seed's
    one-shot tickets at each sparsity, with these flags: the causal ablation in every transfer, CKA
    and probes on every study language; the report then pools the seeds, and (``typology``, default
    true) correlates the transfer CER and mask IoU with the languages' typological distances."""

    name: str
    output_dir: str
    upstream: list[str]
    downstream: list[str]
    sparsities: list[float]
    model: Optional[str] = None  # needed unless every base names its own model
    seeds: list[int] = field(default_factory=lambda: [42])
    data: dict[str, Any] = field(default_factory=dict)
    prune_base: bool = True
    transfer_base: bool = False
    launcher: str = "python"
    finetune: dict[str, Any] = field(default_factory=dict)
    prune: dict[str, Any] = field(default_factory=dict)
    transfer: dict[str, Any] = field(default_factory=dict)
    ctc_pretrain: dict[str, Any] = field(default_factory=dict)
    bases: dict[str, dict[str, Any]] = field(default_factory=dict)
    ssl_pretrain: dict[str, Any] = field(default_factory=dict)
    dominant: Optional[str] = None
    shared_base: bool = False  # make the base once (from the first seed) and vary only fine-tuning, pruning and transfer seeds
    resources: dict[str, Any] = field(default_factory=dict)  # step kind -> Resources (see utils.executors)
    slurm: dict[str, Any] = field(default_factory=dict)  # partition, account, qos, constraint, additional
    note: Optional[str] = None
    methods: list[str] = field(default_factory=lambda: [ONE_SHOT])  # how each language's tickets are found (FINDING_METHODS)
    imp: dict[str, Any] = field(default_factory=dict)  # run_imp.py flags over finetune's (method imp)
    parp: dict[str, Any] = field(default_factory=dict)  # run_finetune.py PARP flags over finetune's (method parp)
    keep_checkpoints: bool = False  # training steps keep their Trainer checkpoints after succeeding (removed by default)
    analysis: Optional[dict[str, Any]] = None  # run_analysis.py flags (and ``typology``): what the language-specific weights do

    def resources_of(self, kind: str) -> Resources:
        return self.resources.get(kind, Resources())


def _read_config(path: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """The settings of a config file; ``extends: other.yaml`` (relative to this file) starts from
    that file's settings and replaces the top-level keys this one gives."""
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MissingInput(f"grid config {path!r} does not exist") from None
    if not isinstance(raw, dict):
        raise UsageError(f"grid config {path!r} is not a mapping of settings")
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    parent_path = str(Path(path).parent / str(parent))
    if os.path.realpath(parent_path) in seen:
        raise UsageError(f"grid config {path!r} extends {parent!r}, which extends it again: expected a chain that ends")
    return _read_config(parent_path, seen + (os.path.realpath(path),)) | raw


FLAG_SECTIONS = ("data", "finetune", "prune", "transfer", "ctc_pretrain", "ssl_pretrain", "imp", "parp", "analysis")  # flags handed to scripts
TYPOLOGY = "typology"  # the analysis section's one key that is no run_analysis.py flag: the report's typology section
MIXTURE_KEY = "mixture"  # the one flag-section entry that is a mapping (ctc_pretrain, bases)


def _kind(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a mapping", type(None): "empty"}
    return f"{names.get(type(value), type(value).__name__)} {value!r}" if not isinstance(value, (list, dict)) else names[type(value)]


def _expected(hint: Any) -> str:
    origin, args = get_origin(hint), get_args(hint)
    if origin is Union:
        return " or ".join(_expected(a) for a in args if a is not type(None)) + " (or nothing)"
    if origin is list:
        return f"a list of {_expected(args[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict:
        return "a mapping" + ("" if args[1] is Any else f" of names to {_expected(args[1]).removeprefix('a ')}s")
    return {bool: "a boolean (true or false)", int: "an integer", float: "a number", str: "a string"}.get(hint, "a value")


def _check_type(value: Any, hint: Any, where: str) -> None:
    """``value`` has the type ``hint`` names (str, bool, int, float, list[...], dict[str, ...],
    Optional[...], Any); otherwise one line naming ``where``, what is there and what was expected."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return
    if origin is Union:
        if value is None and type(None) in args:
            return
        hint = next(a for a in args if a is not type(None))
        origin, args = get_origin(hint), get_args(hint)
    ok = {list: isinstance(value, list), dict: isinstance(value, dict)}.get(origin) if origin else {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(hint, True)
    if not ok:
        quote = " (quote it: YAML reads no, yes, on and off as booleans)" if hint is str and isinstance(value, bool) else ""
        raise UsageError(f"grid config {where} is {_kind(value)}: expected {_expected(hint)}{quote}")
    if origin is list:
        for i, item in enumerate(value):
            _check_type(item, args[0], f"{where}[{i}]")
    elif origin is dict:
        for key, item in value.items():
            _check_type(key, str, f"{where} key {key!r}")
            _check_type(item, args[1], f"{where}.{key}")


def _check_flag_section(section: dict, where: str) -> None:
    """Flags handed to a script: each a number, string or boolean, or a list of them (its mixture a mapping)."""
    for key, value in section.items():
        if key == MIXTURE_KEY and isinstance(value, (dict, list)):
            continue
        items = value if isinstance(value, list) else [value]
        if not items or not all(isinstance(v, (str, int, float)) for v in items):
            raise UsageError(f"grid config {where}.{key} is {_kind(value)}: expected a flag value (a number, string or boolean, or a non-empty list of them)")


def _check_types(raw: dict[str, Any]) -> None:
    """Every top-level setting of the type ``StudyConfig`` declares, flag sections holding flag
    values, and ``{language}`` the only template field of a data value: one line, before any work."""
    hints = get_type_hints(StudyConfig)
    for key, value in raw.items():
        _check_type(value, hints[key], key)
    for section in FLAG_SECTIONS:
        _check_flag_section(raw.get(section) or {}, section)
    for name, settings in (raw.get("bases") or {}).items():
        if ("mixture" in settings) != ("model" in settings):  # a base of neither or both kinds: _check_bases says so
            _check_flag_section(settings, f"bases.{name}")
    for key, value in (raw.get("data") or {}).items():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str):
                fill_language(item, "en", f"grid config data.{key}")


def load_config(path: str) -> StudyConfig:
    """Read and validate a study config; every problem is one clear error before any work."""
    raw = _read_config(path)
    known = {f.name for f in fields(StudyConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise UsageError(f"grid config {path!r} has unknown key(s) {unknown}: expected some of {sorted(known)}")
    bases = raw.get("bases")
    own_models = isinstance(bases, dict) and bases and all(isinstance(b, dict) and "model" in b for b in bases.values())
    required = {"name", "output_dir", "upstream", "downstream", "sparsities"} | (set() if own_models else {"model"})
    missing = sorted(f.name for f in fields(StudyConfig) if f.name in required and f.name not in raw)
    if missing:
        raise UsageError(f"grid config {path!r} lacks {missing}")
    _check_types(raw)
    config = StudyConfig(**raw)
    # A Hub token in a section goes to the environment the steps inherit, never into their
    # command lines, records or logs.
    bases = list(config.bases.values()) if isinstance(config.bases, dict) else []
    for section in (config.data, config.finetune, config.prune, config.transfer, config.ctc_pretrain, config.ssl_pretrain, config.imp, config.parp,
                    config.analysis, *bases):
        if isinstance(section, dict):
            for name in SECRET_FLAGS:
                hide_token(section.pop(name, None))
    config.resources = parse_resources(config.resources)
    config.slurm = parse_slurm(config.slurm)
    for kind in TRAINING_KINDS:
        launch_command(config.launcher, config.resources_of(kind))  # a multi-GPU step needs accelerate launch
    config.upstream = [resolve_language(code).code for code in config.upstream]
    config.downstream = [resolve_language(code).code for code in config.downstream]
    config.sparsities = sorted({check_sparsity(s) for s in config.sparsities})
    if not isinstance(config.seeds, list) or not config.seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in config.seeds):
        raise UsageError(f"grid config seeds {config.seeds!r}: expected a list of integers")
    repeated = sorted({s for s in config.seeds if config.seeds.count(s) > 1})
    if repeated:
        raise UsageError(f"grid config seeds {config.seeds!r} give seed(s) {repeated} more than once: expected distinct seeds")
    if config.ctc_pretrain:
        if config.data.get("dataset_name") != "generated" or "mixture" not in config.ctc_pretrain:
            raise UsageError("grid config 'ctc_pretrain' needs data.dataset_name: generated and a ctc_pretrain.mixture such as {en: 0.5, de: 0.25, es: 0.25}")
        config.ctc_pretrain["mixture"] = {resolve_language(code).code: float(w) for code, w in config.ctc_pretrain["mixture"].items()}
        if any(resolve_language(code).espeak_voice is None for code in config.ctc_pretrain["mixture"]):
            raise UsageError(f"ctc_pretrain.mixture {config.ctc_pretrain['mixture']} names a language without an espeak-ng voice")
    if config.bases or config.ssl_pretrain or config.dominant:
        _check_bases(config)
    _check_methods(config)
    _check_analysis(config)
    if config.data.get("dataset_name") == "generated":
        silent = [code for code in study_languages(config) if resolve_language(code).espeak_voice is None]
        if silent:
            raise UsageError(f"the generated corpus has no voice for {', '.join(sorted(set(silent)))}: use FLEURS for them or drop them from the config")
    return config


def _check_methods(config: StudyConfig) -> None:
    """``methods``: known ones, each once, one-shot among them; ``imp`` sparsities are the study's."""
    unknown = [m for m in config.methods if m not in FINDING_METHODS]
    if unknown:
        raise UsageError(f"grid config methods has unknown method {unknown[0]!r}: expected some of {', '.join(FINDING_METHODS)}")
    if len(set(config.methods)) != len(config.methods) or ONE_SHOT not in config.methods:
        raise UsageError(f"grid config methods {config.methods}: expected each method once, {ONE_SHOT} among them (the paper's method, "
                         "which the others are compared with)")
    for method, flag in (("imp", "sparsity"), ("parp", "parp_sparsity")):
        if flag in getattr(config, method):
            raise UsageError(f"grid config {method}.{flag}: the study's sparsities are every method's; expected it only in sparsities")


def _check_analysis(config: StudyConfig) -> None:
    if config.analysis is not None and len(config.upstream) + config.prune_base < 2:
        raise UsageError(f"grid config analysis compares tickets, and this study makes {len(config.upstream) + config.prune_base} per seed: "
                         "expected two upstream languages, or one with prune_base: true")


def _check_bases(config: StudyConfig) -> None:
    """``bases``: each a mixture to pretrain on (parsed like ``--mixture``) or a model to start from
    (a published checkpoint or a config directory), not mixed with ``ctc_pretrain``; ``dominant``
    one of the upstream languages (given, when no base has a mixture to infer it from)."""
    if not isinstance(config.bases, dict) or len(config.bases) < 1:
        raise UsageError(f"grid config bases {config.bases!r}: expected a mapping of names to {{mixture: {{en: 0.7, de: 0.3}}}} or {{model: ORG/NAME}} "
                         "(ssl_pretrain and dominant need it)")
    if config.ctc_pretrain:
        raise UsageError("grid config gives both 'ctc_pretrain' and 'bases': expected one way to make the base (bases: self-supervised, by run_pretrain.py)")
    for name, settings in config.bases.items():
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", str(name)):
            raise UsageError(f"base name {name!r}: expected letters, digits, '_', '.' or '-' (it names a folder)")
        if not isinstance(settings, dict) or ("mixture" in settings) == ("model" in settings):
            raise UsageError(f"base {name!r}: expected a mapping with a mixture to pretrain on, e.g. {{mixture: {{en: 0.7, de: 0.3}}}}, "
                             "or a model to start from, e.g. {model: facebook/wav2vec2-xls-r-1b}")
        if "model" in settings:
            if set(settings) != {"model"} or not isinstance(settings["model"], str):
                raise UsageError(f"base {name!r} {settings!r}: a base that starts from a model takes only model: ORG/NAME (or a local directory)")
            continue
        try:
            settings["mixture"] = parse_mixture(settings["mixture"] if isinstance(settings["mixture"], dict) else list(settings["mixture"]))
        except UsageError as err:
            raise UsageError(f"base {name!r}: {err}") from None
    shares = [(w, code) for settings in config.bases.values() for code, w in settings.get("mixture", {}).items()]
    if not config.dominant and not shares:
        raise UsageError("grid config bases all start from models: expected dominant: the language whose advantage the bases are compared on (e.g. en)")
    config.dominant = resolve_language(config.dominant).code if config.dominant else max(shares, key=lambda x: x[0])[1]
    if config.dominant not in config.upstream:
        raise UsageError(f"dominant language {config.dominant!r} is not an upstream language {config.upstream}: its ticket is what the others are compared with")


def study_languages(config: StudyConfig) -> list[str]:
    """Every language a step reads: upstream, downstream and the bases' mixtures."""
    mixtures = [code for settings in config.bases.values() for code in settings.get("mixture", {})] + list(config.ctc_pretrain.get("mixture", {}))
    return list(dict.fromkeys(config.upstream + config.downstream + mixtures))


def sub_studies(config: StudyConfig) -> list[tuple[Optional[str], Path, str]]:
    """(base name, folder, step-id prefix) of each study the config runs: the study itself, or one per base."""
    if not config.bases:
        return [(None, Path(config.output_dir), "")]
    return [(name, Path(config.output_dir) / f"base-{name}", f"base-{name}/") for name in config.bases]


class StepFailed(RuntimeError):
    """A step's command failed; the message names the step, its exit code and its log."""


@dataclass
class Step:
    id: str
    kind: str
    argv: list[str]
    done: Path  # this file exists once the step has finished
    settings: dict[str, Any]
    output: Path  # what the step writes: moved aside when a stale step is re-run
    needs: list[str] = field(default_factory=list)  # ids of the steps that must finish first
    identity: dict[str, Any] = field(default_factory=dict)
    launch_len: int = 1  # argv[:launch_len] is the launcher (python, or accelerate launch and its options)
    method: str = ONE_SHOT  # how the tickets it makes or uses were found

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()


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
    return {k: fill_language(v, language, f"grid config data.{k}") if isinstance(v, str) else v for k, v in data.items()}


class _Planner:
    """Collects steps in dependency order and gives each its identity (own settings that can
    change its result + the digests of the steps it needs)."""

    def __init__(self, keep_checkpoints: bool = False):
        self.steps: list[Step] = []
        self.by_id: dict[str, Step] = {}
        self.keep_checkpoints = keep_checkpoints

    def add(self, id: str, kind: str, argv: list[str], done: Path, settings: dict, output: Path, needs: list[str], launch_len: int = 1,
            shared: bool = False, method: str = ONE_SHOT) -> Step:
        if id in self.by_id:  # a step every seed shares (the base with shared_base): planned once
            return self.by_id[id]
        needs = [n for n in needs if n in self.by_id]
        if self.keep_checkpoints and kind in TRAINING_KINDS:  # a runtime flag: not part of the identity
            argv = [*argv, "--keep_checkpoints", "True"]
        identity = {
            "settings": {k: v for k, v in settings.items() if k not in RUNTIME_FIELDS},
            "needs": {n: self.by_id[n].digest for n in needs},
        } | ({"shared": "every seed"} if shared else {})
        step = Step(id, kind, argv, done, settings, output, needs, json.loads(json.dumps(identity, default=str)), launch_len, method)
        self.steps.append(step)
        self.by_id[id] = step
        return step


def prune_step_id(seed: int, label: str, sparsity: float, prefix: str = "") -> str:
    return f"{prefix}seed-{seed}/prune/{label}/{sparsity_dirname(sparsity)}"


def plan(config: StudyConfig) -> list[Step]:
    """Every step of the study, in an order that respects their dependencies."""
    out = Path(config.output_dir)
    python = [sys.executable]
    launch = {kind: launch_command(config.launcher, config.resources_of(kind)) for kind in TRAINING_KINDS}
    p = _Planner(config.keep_checkpoints)
    corpus = Path(config.data.get("generated_corpus_dir", GENERATED_CORPUS_DIR)).expanduser()
    sizes = {"num_train": config.data.get("generated_num_train", 2000), "num_eval": config.data.get("generated_num_eval", 200)}
    data_steps: list[str] = []
    if config.bases and config.data.get("dataset_name") == "generated":  # every language once, before the bases' steps all read them
        for code in study_languages(config):
            settings = {"languages": [code], "output_dir": str(corpus), **sizes}
            data_steps.append(p.add(f"corpus/{code}", "corpus", [*python, "-m", "utils.corpus", *_flags(settings)], corpus / code / "corpus.json", settings, corpus / code, []).id)
    if config.ctc_pretrain:  # a multilingual mixture of the generated corpus to pretrain the stand-in base on
        settings = {"mix": [f"{code}={weight}" for code, weight in config.ctc_pretrain["mixture"].items()], "output_dir": str(corpus),
                    "num_mix_train": config.ctc_pretrain.get("num_train", 2000), **sizes}
        data_steps.append(p.add("corpus/mul", "corpus", [*python, "-m", "utils.corpus", *_flags(settings)], corpus / "mul" / "corpus.json", settings, corpus / "mul", []).id)
    def base_seed(seed: int) -> tuple[Optional[int], int]:
        """(the folder's seed, None when shared; the seed the base is made with)."""
        return (None, config.seeds[0]) if config.shared_base else (seed, seed)

    initial: dict[int, tuple[str, Optional[str]]] = {}
    for seed in config.seeds:
        initial[seed] = (config.model, None)
        folder, made_with = base_seed(seed)
        # A tiny model with no pretrained weights: initialise the study's base. (run_pretrain.py
        # starts from the config itself, seeded: every base of a seed starts from the same weights.)
        if config.model and has_local_config_only(config.model) and not config.bases:
            base = str(StudyLayout(out).base_model(folder))
            settings = {"init_from_config": config.model, "output_dir": base, "seed": made_with}
            initial[seed] = (base, p.add(StudyLayout(out).step_id(Path(base)), "init", [*python, "-m", "utils.model", *_flags(settings)], Path(base) / "config.json", settings, Path(base), [],
                                    shared=config.shared_base).id)
    for name, root, prefix in sub_studies(config):
        layout = StudyLayout(root)
        for seed in config.seeds:
            base, base_step = initial[seed]
            folder, made_with = base_seed(seed)
            target = layout.pretrain(folder)
            script, needs = None, [base_step]
            if name is not None and "model" in config.bases[name]:  # a base to start from as it is (a config dir: seeded random weights)
                base, base_step, needs = config.bases[name]["model"], None, [*data_steps]
                if has_local_config_only(base):
                    init = str(layout.base_model(folder))
                    settings = {"init_from_config": base, "output_dir": init, "seed": made_with}
                    base_step = p.add(layout.step_id(Path(init), prefix), "init", [*python, "-m", "utils.model", *_flags(settings)], Path(init) / "config.json",
                                      settings, Path(init), [], shared=config.shared_base).id
                    base = init
                needs.append(base_step)
            elif config.ctc_pretrain:
                extra = {k: v for k, v in config.ctc_pretrain.items() if k not in ("mixture", "num_train")}
                settings = {"language": "mul", "data_dir": str(corpus / "mul"), "model_name_or_path": base, "output_dir": str(target), "seed": made_with, **extra}
                script = "run_finetune.py"
            elif name is not None:  # self-supervised, on this base's mixture, from the seed's shared initial weights
                extra = {k: v for k, v in config.bases[name].items() if k != "mixture"}
                settings = {"model_name_or_path": base, "mixture": [f"{code}={w}" for code, w in config.bases[name]["mixture"].items()], "output_dir": str(target),
                            "seed": made_with, **config.data, **config.ssl_pretrain, **extra}
                script = "run_pretrain.py"
            if script:
                base_step = p.add(layout.step_id(target, prefix), "pretrain", [*launch["pretrain"], str(ROOT / script), *_flags(settings)], target / TRAINER_RESULTS_FILE,
                                  settings, target, [*data_steps, base_step], len(launch["pretrain"]), shared=config.shared_base).id
                base, needs = str(target), [base_step]
            _plan_seed(p, config, launch, layout, prefix, seed, base, base_step, needs)
        _plan_seed_iou(p, config, layout, prefix)
    return p.steps


def _plan_seed(p: _Planner, config: StudyConfig, launch: dict, layout: StudyLayout, prefix: str, seed: int, base: str, base_step: Optional[str],
               needs: list[Optional[str]]) -> None:
    """One seed of one study: fine-tune each upstream language from ``base`` (after ``needs``),
    prune them (and the base), transfer every ticket to every downstream language, compare the masks."""
    python = [sys.executable]
    for up in config.upstream:
        target = layout.finetune(seed, up)
        settings = {"language": up, "model_name_or_path": base, "output_dir": str(target), "seed": seed, **_data_flags(config.data, up), **config.finetune}
        p.add(layout.step_id(target, prefix), "finetune", [*launch["finetune"], str(ROOT / "run_finetune.py"), *_flags(settings)], target / TRAINER_RESULTS_FILE,
              settings, target, needs, len(launch["finetune"]))
    sources = [("base", base, base_step)] if config.prune_base else []
    sources += [(up, str(layout.finetune(seed, up)), layout.step_id(layout.finetune(seed, up), prefix)) for up in config.upstream]
    for label, source, parent in sources:
        for s in config.sparsities:  # one step per ticket, so adding a sparsity leaves the others done
            target = layout.ticket(seed, label, s)
            settings = {"model_name_or_path": source, "language": label, "sparsity": s, "output_dir": str(target), "seed": seed, **config.prune}
            p.add(prune_step_id(seed, label, s, prefix), "prune", [*python, str(ROOT / "run_prune.py"), *_flags(settings)], target / MASK_FILE,
                  settings, target, [parent])
    ticket_steps = {(ONE_SHOT, label, s): prune_step_id(seed, label, s, prefix) for label, _, _ in sources for s in config.sparsities}
    ticket_steps |= _plan_other_methods(p, config, launch, layout, prefix, seed, base, needs)
    for method in config.methods:
        tickets_from = config.upstream + (["base"] if method == ONE_SHOT and config.transfer_base and config.prune_base else [])
        for up in tickets_from:
            for down in config.downstream:
                for s in config.sparsities:
                    target = layout.transfer(seed, up, down, s, method)
                    settings = {"upstream": up, "downstream": down, "sparsity": s, "tickets_dir": str(layout.tickets(seed, method)), "output_dir": str(target),
                                "seed": seed, **_data_flags(config.data, down), **config.transfer}
                    p.add(layout.step_id(target, prefix), "transfer", [*launch["transfer"], str(ROOT / "run_transfer.py"), *_flags(settings)],
                          target / RESULTS_FILE, settings, target, [ticket_steps[(method, up, s)]], len(launch["transfer"]), method=method)
    labels = config.upstream + (["base"] if config.prune_base else [])
    for s in config.sparsities:
        if len(labels) < 2:
            continue
        target = layout.iou(seed, s)
        masks = [f"{label}={layout.ticket(seed, label, s)}" for label in config.upstream]
        settings = {"masks": masks, "output_dir": str(target)} | ({"base": str(layout.ticket(seed, "base", s))} if config.prune_base else {})
        p.add(layout.step_id(target, prefix), "iou", [*python, str(ROOT / "run_iou.py"), *_flags(settings)], target / IOU_FILE,
              settings, target, [prune_step_id(seed, label, s, prefix) for label in labels])
    if config.analysis is not None:
        _plan_analysis(p, config, layout, prefix, seed, base, base_step, sources)
    if len(config.methods) < 2:
        return
    for s in config.sparsities:  # every method's ticket of every language (and the one-shot base's): do the methods agree, per language?
        target = layout.methods_iou(seed, s)
        masks = [method_label(method, up) + f"={layout.ticket(seed, up, s, method)}" for method in config.methods for up in config.upstream]
        settings = {"masks": masks, "output_dir": str(target)} | ({"base": str(layout.ticket(seed, "base", s))} if config.prune_base else {})
        makers = [ticket_steps[(method, up, s)] for method in config.methods for up in config.upstream]
        p.add(layout.step_id(target, prefix), "iou", [*python, str(ROOT / "run_iou.py"), *_flags(settings)], target / IOU_FILE,
              settings, target, makers + ([prune_step_id(seed, "base", s, prefix)] if config.prune_base else []))


def _plan_analysis(p: _Planner, config: StudyConfig, layout: StudyLayout, prefix: str, seed: int, base: str, base_step: Optional[str],
                   sources: list[tuple[str, str, Optional[str]]]) -> None:
    """run_analysis.py on one seed's one-shot tickets at each sparsity: the ablation in every
    transfer, CKA and probes with the upstream models and the base, on every study language."""
    flags = {k: v for k, v in config.analysis.items() if k != TYPOLOGY}
    for s in config.sparsities:
        target = layout.analysis(seed, s)
        transfers = [(up, down) for up in config.upstream for down in config.downstream]
        settings = {"tickets": [f"{label}={layout.ticket(seed, label, s)}" for label, _, _ in sources],
                    "transfers": [f"{up}-{down}={layout.transfer(seed, up, down, s)}" for up, down in transfers],
                    "upstream_models": [f"{up}={layout.finetune(seed, up)}" for up in config.upstream], "base_model": base,
                    "languages": list(dict.fromkeys(config.upstream + config.downstream)), "output_dir": str(target), "seed": seed, **config.data, **flags}
        needs = [base_step, *(layout.step_id(layout.finetune(seed, up), prefix) for up in config.upstream),
                 *(prune_step_id(seed, label, s, prefix) for label, _, _ in sources),
                 *(layout.step_id(layout.transfer(seed, up, down, s), prefix) for up, down in transfers)]
        p.add(layout.step_id(target, prefix), "analysis", [sys.executable, str(ROOT / "run_analysis.py"), *_flags(settings)], target / ANALYSIS_FILE,
              settings, target, needs)


def _plan_other_methods(p: _Planner, config: StudyConfig, launch: dict, layout: StudyLayout, prefix: str, seed: int, base: str,
                        needs: list[Optional[str]]) -> dict[tuple[str, str, float], str]:
    """The tickets of each upstream language found by IMP (one run_imp.py step for every sparsity)
    and PARP (one run_finetune.py --parp_sparsity step per sparsity), both from ``base``; returns
    the step that makes each (method, language, sparsity) ticket."""
    made = {}
    for up in config.upstream if "imp" in config.methods else []:
        target = layout.tickets(seed, "imp") / up
        settings = {"language": up, "model_name_or_path": base, "output_dir": str(target), "seed": seed, "sparsity": config.sparsities,
                    **_data_flags(config.data, up), **config.finetune, **config.imp}
        step = p.add(layout.step_id(target, prefix), "imp", [*launch["imp"], str(ROOT / "run_imp.py"), *_flags(settings)],
                     layout.ticket(seed, up, max(config.sparsities), "imp") / MASK_FILE, settings, target, needs, len(launch["imp"]), method="imp")
        made |= {("imp", up, s): step.id for s in config.sparsities}
    for up in config.upstream if "parp" in config.methods else []:
        for s in config.sparsities:
            target = layout.ticket(seed, up, s, "parp")
            settings = {"language": up, "model_name_or_path": base, "output_dir": str(target), "seed": seed, "parp_sparsity": s,
                        **_data_flags(config.data, up), **config.finetune, **config.parp}
            step = p.add(layout.step_id(target, prefix), "parp", [*launch["parp"], str(ROOT / "run_finetune.py"), *_flags(settings)], target / MASK_FILE,
                         settings, target, needs, len(launch["parp"]), method="parp")
            made[("parp", up, s)] = step.id
    return made


def _plan_seed_iou(p: _Planner, config: StudyConfig, layout: StudyLayout, prefix: str) -> None:
    """The noise floor: tickets of the same language from different seeds (with two seeds or more)."""
    if len(config.seeds) < 2:
        return
    labels = config.upstream + (["base"] if config.prune_base else [])
    for s in config.sparsities:
        target = layout.seeds_iou(s)
        masks = [f"{label}@{seed}={layout.ticket(seed, label, s)}" for label in labels for seed in config.seeds]
        settings = {"masks": masks, "output_dir": str(target)}
        p.add(layout.step_id(target, prefix), "iou", [sys.executable, str(ROOT / "run_iou.py"), *_flags(settings)], target / IOU_FILE,
              settings, target, [prune_step_id(seed, label, s, prefix) for label in labels for seed in config.seeds])


def report_step(config_path: str, config: StudyConfig) -> Step:
    """The report as a job of its own, after every step (what a Slurm submission ends with)."""
    settings = {"config": os.path.abspath(config_path), "report_only": True}
    argv = [sys.executable, str(ROOT / "run_grid.py"), "--config", settings["config"], "--report_only"]
    return Step("report", "report", argv, Path(config.output_dir) / "REPORT.md", settings, Path(config.output_dir) / "REPORT.md")


def _step_file(output_dir: str, folder: str, step: Step, suffix: str) -> Path:
    return Path(output_dir) / folder / (step.id.replace("/", "__") + suffix)


def step_record_path(output_dir: str, step: Step) -> Path:
    return _step_file(output_dir, "steps", step, ".json")


def step_log_path(output_dir: str, step: Step) -> Path:
    return _step_file(output_dir, "logs", step, ".log")


@dataclass
class StepState:
    state: str  # done, stale, todo
    reason: str = ""


def step_states(config: StudyConfig, steps: list[Step]) -> dict[str, StepState]:
    """Each step's state from its done file and its record: ``todo`` (not finished), ``done``, or
    ``stale`` (finished with another identity than the plan's; ``reason`` names what changed)."""
    states = {}
    for step in steps:
        if not step.done.exists():
            states[step.id] = StepState("todo")
            continue
        record = read_record(step_record_path(config.output_dir, step))
        recorded = record.identity if record else None
        if recorded is None or recorded == step.identity:
            states[step.id] = StepState("done")
            continue
        difference = first_difference(recorded.get("settings", {}), step.identity["settings"])
        if difference:
            key, old, new, count = difference
            more = f" and {count - 1} other setting(s)" if count > 1 else ""
            reason = f"{key}: {old!r} when it ran, {new!r} now{more}"
        else:
            changed = [n for n in step.identity["needs"] if recorded.get("needs", {}).get(n) != step.identity["needs"][n]]
            reason = f"needs {changed[0] if changed else 'a step'}, which changed" if changed else "the steps it needs changed"
        states[step.id] = StepState("stale", reason)
    return states


def move_aside(config: StudyConfig, steps: list[Step], stamp: str) -> Path:
    """Move the outputs of ``steps`` under ``<output_dir>/stale/<stamp>/`` (nothing is deleted),
    so they run again from scratch."""
    target = Path(config.output_dir) / "stale" / stamp
    for step in steps:
        if step.output.exists():
            dest = target / step.id.replace("/", "__")
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.rename(step.output, dest)
    return target


def job_spec(config: StudyConfig, step: Step, threads: Optional[int] = None) -> JobSpec:
    """The job that runs ``step``: its command, log and record (see ``utils.executors.run_job``)."""
    resources = config.resources_of(step.kind)
    base = StepRecord(id=step.id, kind=step.kind, command=shlex.join(step.argv), settings=step.settings, identity=step.identity, needs=step.needs)
    return JobSpec(
        id=step.id, argv=[str(a) for a in step.argv], launch_len=step.launch_len, done=str(step.done),
        record=str(step_record_path(config.output_dir, step)), log=str(step_log_path(config.output_dir, step)),
        needs=tuple(step.needs), resources=resources, record_base=base, threads=resources.cpus or threads,
    )


UNFINISHED = ("running", "queued", "failed", "interrupted", "requeued")  # what a record of a step without its done file may say


def step_status(config: StudyConfig, steps: list[Step], scheduler: Optional[dict[str, tuple[str, str]]] = None) -> list[dict]:
    """One row per step for ``--status`` and the report: done / running / queued / failed /
    interrupted / requeued / blocked / stale / pending, with elapsed time, job id, log and reason,
    read from the records. A step not run because a step it needs (or one before that) failed is
    ``blocked``, its reason naming that step. ``scheduler`` (``utils.executors.slurm_jobs``) adds
    each Slurm job's state and reason; a record that says queued or running for a job Slurm has
    ended is then ``pending``."""
    states = step_states(config, steps)
    rows: dict[str, dict] = {}
    now = time.time()
    for step in steps:
        record = read_record(step_record_path(config.output_dir, step))
        state, reason = states[step.id].state, states[step.id].reason
        job = (record and record.job_id) or ""
        queue = scheduler.get(job) if scheduler is not None and record and record.executor == "slurm" else None
        if state == "todo":
            state = record.status if record and record.status in UNFINISHED else "pending"
            if state == "running" and record.executor == "local" and not _alive(record.pid):
                state = "pending"  # its runner was killed: a re-run starts it again
            if state in ("queued", "running", "requeued") and scheduler is not None and record.executor == "slurm" and (queue is None or queue[0] not in LIVE_STATES):
                state, reason = "pending", f"job {job} " + (f"ended {queue[0]}" if queue else "is no longer known to Slurm")
        started, finished = (record.started, record.finished) if record else (None, None)
        elapsed = (finished or now) - started if started and state in ("running", "done", "stale", "failed", "interrupted") else None
        rows[step.id] = {"step": step.id, "state": state, "elapsed_s": None if elapsed is None else round(elapsed, 1), "job_id": job,
                         "log": str(step_log_path(config.output_dir, step)) if record else "", "reason": reason,
                         "scheduler": (f"{queue[0]} ({queue[1]})" if queue[1] else queue[0]) if queue else "", "returncode": record.returncode if record else None}
    for step in steps:  # plan order: the steps a step needs come first
        row = rows[step.id]
        if row["state"] in ("pending", "queued"):
            cause = next((n for n in step.needs if n in rows and rows[n]["state"] in ("failed", "blocked")), None)
            if cause:
                row["blocked_by"] = rows[cause].get("blocked_by", cause)  # the failed step itself, however far up
                row["state"], row["reason"] = "blocked", f"{row['blocked_by']} failed"
    return list(rows.values())


def missing_results(config: StudyConfig, steps: list[Step]) -> list[tuple[str, str]]:
    """The steps whose results a report shows (transfers, fine-tunes, IoU, analyses) that have not finished,
    each with why: failed (exit code, log), not run because a step it needs failed, interrupted,
    or not run yet."""
    missing = []
    for row, step in zip(step_status(config, steps), steps):
        if step.kind not in ("transfer", "finetune", "iou", "analysis") or row["state"] in ("done", "stale"):
            continue
        log = os.path.relpath(row["log"], config.output_dir) if row["log"] else ""
        why = {"failed": f"failed (exit {row['returncode']}; log {log})", "blocked": f"not run: it depends on {row.get('blocked_by')}, which failed",
               "interrupted": f"interrupted (exit {row['returncode']}; the same command resumes it)"}.get(row["state"], f"not finished ({row['state']})")
        missing.append((step.id, why))
    return missing


def _alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
        return True
    except (TypeError, ValueError, OSError):
        return False


def publish(config: StudyConfig, steps: list[Step], target: str | os.PathLike) -> int:
    """Copy what the report reads (each finished transfer's and fine-tune's results and test
    predictions, each IoU summary, each IMP round's record, each analysis record) from the study into ``target``, in the same layout, so the
    report can be re-rendered there (``--report_only --output_dir target``). Returns the number of files."""
    import shutil

    from .metrics import predictions_path

    source, target = Path(config.output_dir).resolve(), Path(target).resolve()
    if source == target:
        raise UsageError(f"--publish {target}: expected a folder other than the study's own output_dir")
    count = 0
    for step in steps:
        if step.kind not in ("transfer", "finetune", "iou", "imp", "analysis") or not step.done.is_file():
            continue
        files = imp_round_records(step.output) if step.kind == "imp" else [step.done] + ([predictions_path(step.output, "test")] if step.kind in ("transfer", "finetune") else [])
        for path in files:
            dest = target / Path(path).resolve().relative_to(source)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)
            count += 1
    return count


def collect(config: StudyConfig, steps: list[Step], prefix: str = "") -> StudyResults:
    """What the finished steps of one study (``prefix``: its base's, see ``sub_studies``) wrote:
    transfer results and upstream fine-tunes (each with its per-utterance test rows, checked
    against the result), IoU summaries per sparsity (matrices averaged over seeds), the
    seed-to-seed IoU summaries per sparsity, the analyses of each seed's tickets per sparsity, and
    the results still missing, with why."""
    from .metrics import predictions_path, read_predictions

    planned, steps = steps, [st for st in steps if st.id.startswith(prefix) and (prefix or not st.id.startswith("base-"))]
    layout = StudyLayout(next(folder for _, folder, p in sub_studies(config) if p == prefix))
    rows, own, imp_rounds = [], [], []
    analyses: dict[float, list[dict]] = {}
    by_method: dict[str, list[dict]] = {method: [] for method in config.methods}
    for step in steps:
        if step.kind == "transfer" and step.done.is_file():
            result = TransferResult.read(step.done).to_dict()
            result["utterances"] = read_predictions(predictions_path(step.output, "test"), result["test_cer"], result["test_samples"])
            by_method.setdefault(step.method, []).append(result)
            if step.method == ONE_SHOT:
                rows.append(result)
        elif step.kind == "finetune" and step.done.is_file():
            metrics = json.loads(step.done.read_text(encoding="utf-8"))
            if "test_cer" not in metrics:  # a fine-tune without a test split: no own CER to show
                continue
            utterances = read_predictions(predictions_path(step.output, "test"), metrics["test_cer"], metrics["test_samples"])
            own.append({"upstream": step.settings["language"], "seed": step.settings["seed"], "test_cer": metrics["test_cer"], "utterances": utterances})
        elif step.kind == "analysis" and step.done.is_file():
            summary = AnalysisSummary.read(step.done)
            analyses.setdefault(summary.sparsity, []).append(summary.to_dict())
        elif step.kind == "imp" and (records := imp_round_records(step.output)):  # the rounds finished so far (a published study has no ticket files)
            imp_rounds.append({"upstream": step.settings["language"], "seed": step.settings["seed"],
                               "rounds": [ImpRound.read(path).to_dict() for path in records]})
    ious: dict[float, dict] = {}
    seed_ious: dict[float, dict] = {}
    method_ious: dict[float, dict] = {}
    for s in config.sparsities:
        for merged_into, folder in ((ious, layout.iou), (method_ious, layout.methods_iou)):
            per_seed = {folder(seed, s) for seed in config.seeds}
            found = [IoUSummary.read(st.done).to_dict() for st in steps if st.kind == "iou" and st.output in per_seed and st.done.is_file()]
            if found:
                merged_into[s] = _averaged(found)
        across = [st for st in steps if st.kind == "iou" and st.output == layout.seeds_iou(s) and st.done.is_file()]
        if across:
            seed_ious[s] = IoUSummary.read(across[0].done).to_dict()
    ours = {st.id for st in steps}
    return StudyResults(rows, ious, seed_ious, own, config.shared_base, [m for m in missing_results(config, planned) if m[0] in ours],
                        by_method if len(config.methods) > 1 else {}, method_ious, imp_rounds, analyses)


def _averaged(found: list[dict]) -> dict:
    """IoU summaries of the seeds of one comparison: matrices averaged, each seed's kept (``per_seed``)."""
    merged = dict(found[0])
    n = len(merged["labels"])
    for key in ("matrix", "random_matrix"):
        merged[key] = [[sum(f[key][i][j] for f in found) / len(found) for j in range(n)] for i in range(n)]
    merged["seeds"] = len(found)
    merged["per_seed"] = found
    return merged
