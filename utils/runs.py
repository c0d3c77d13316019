"""Run directories: atomic writes, and the signature that stops one run from overwriting another.

A run is defined by every setting that can change its result: all fields of its parsed argument
dataclasses except the runtime-only ones listed in ``RUNTIME_FIELDS`` (where output goes, logging,
progress bars, pushes, resuming, device and memory knobs). Each script records that signature as
``run_signature.json`` in its output directory; re-running the same command resumes from the last
checkpoint, and a directory that holds a run with other settings, or files no script of ours
wrote, is refused before anything is written, naming the first setting that differs.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import enum
import glob
import json
import logging
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Iterator, Optional

from .errors import EXIT_INTERRUPTED, Interrupted, OutputConflict, UsageError, is_disk_full

logger = logging.getLogger(__name__)

SIGNATURE_FILE = "run_signature.json"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")  # the Trainer's checkpoint folders
CHECKPOINT_DONE_FILE = "trainer_state.json"  # the Trainer writes it last: a checkpoint without it is incomplete

# Fields that decide where results go, how progress is shown, or how memory and devices are used,
# never what is computed. Everything else a script parses is part of its run's identity.
RUNTIME_FIELDS = frozenset(
    {
        # where things go, pushes, resuming
        "output_dir", "tickets_dir", "generated_corpus_dir", "resume_from_checkpoint", "restore_callback_states_from_checkpoint", "keep_checkpoints",
        "push_to_hub", "hub_token", "hub_private_repo", "hub_model_id", "hub_strategy", "hub_always_push", "hub_revision",
        "hub_mask_repo_id", "compress", "save_total_limit", "save_only_model", "save_on_each_node", "enable_jit_checkpoint",
        # logging and progress
        "logging_strategy", "logging_steps", "logging_first_step", "log_on_each_node", "logging_nan_inf_filter",
        "include_num_input_tokens_seen", "log_level", "log_level_replica", "disable_tqdm", "report_to", "run_name", "project",
        "trackio_space_id", "trackio_bucket_id", "trackio_static_space_id", "skip_memory_metrics", "debug",
        # devices, processes, memory (evaluation results do not depend on the eval batch: padded frames are blanked)
        "use_cpu", "local_rank", "ddp_find_unused_parameters", "ddp_bucket_cap_mb", "ddp_broadcast_buffers", "ddp_static_graph",
        "ddp_backend", "ddp_timeout", "average_tokens_across_devices", "dataloader_num_workers", "dataloader_pin_memory",
        "dataloader_persistent_workers", "dataloader_prefetch_factor", "dataloader_multiprocessing_context",
        "preprocessing_num_workers", "per_device_eval_batch_size", "eval_accumulation_steps", "eval_do_concat_batches",
        "eval_use_gather_object", "batch_eval_metrics", "gradient_checkpointing", "gradient_checkpointing_kwargs",
        "activation_checkpointing", "activation_checkpointing_kwargs", "torch_empty_cache_steps",
    }
)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator[Any]:
    """Open a temporary file beside ``path`` and rename it over ``path`` only once it is fully
    written and closed: readers never see half a file, and a failed write leaves the old one.
    The temporaries of earlier writers on this host that were killed before renaming are removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.tmp-{socket.gethostname()}-"
    _remove_dead_writers_temps(path.parent, prefix)
    tmp = path.with_name(f"{prefix}{os.getpid()}")
    if "b" not in mode:
        kwargs.setdefault("encoding", "utf-8")
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _remove_dead_writers_temps(folder: Path, prefix: str) -> None:
    """``<prefix><pid>`` files of processes no longer running (a temporary of another host is
    never touched: its pid means nothing here)."""
    import psutil

    for old in folder.glob(glob.escape(prefix) + "*"):
        pid = old.name[len(prefix):]
        if pid.isdigit() and int(pid) != os.getpid() and not psutil.pid_exists(int(pid)):
            old.unlink(missing_ok=True)


def write_json_atomic(path: str | os.PathLike, payload: Any, compact: bool = False) -> None:
    """Write JSON atomically (see ``atomic_open``): indented, or on one line (``compact``: records
    holding long lists of numbers, which indentation would put one per line)."""
    with atomic_open(path) as f:
        json.dump(payload, f, ensure_ascii=False, sort_keys=True, **({"separators": (",", ":")} if compact else {"indent": 2}))
        f.write("\n")


def replace_dir_atomic(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Move a fully written directory ``src`` to ``dst``; if another process won the race, keep its copy."""
    try:
        os.rename(src, dst)
    except OSError:
        if not Path(dst).is_dir():
            raise
        shutil.rmtree(src, ignore_errors=True)


def jsonable(value: Any) -> Any:
    """A JSON-comparable form of an argument value (enums by value, dataclasses as dicts)."""
    if isinstance(value, enum.Enum):
        return jsonable(value.value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def run_signature(script: str, *arguments: Any) -> dict[str, Any]:
    """What defines a run of ``script``: every init field of its argument dataclasses except
    ``RUNTIME_FIELDS``, in declaration order, taken after the script has settled their values."""
    signature: dict[str, Any] = {"script": script}
    for args in arguments:
        for f in dataclasses.fields(args):
            if f.init and not f.name.startswith("_") and f.name not in RUNTIME_FIELDS:
                signature.setdefault(f.name, jsonable(getattr(args, f.name)))
    return signature


def first_difference(recorded: dict[str, Any], current: dict[str, Any]) -> Optional[tuple[str, Any, Any, int]]:
    """``(key, recorded value, current value, number of differing keys)`` of the first key (in
    ``current``'s order, then ``recorded``'s) whose values differ, or None when they agree."""
    keys = list(current) + [k for k in recorded if k not in current]
    differing = [k for k in keys if recorded.get(k) != current.get(k)]
    if not differing:
        return None
    key = differing[0]
    return key, recorded.get(key), current.get(key), len(differing)


def describe_difference(difference: tuple[str, Any, Any, int]) -> str:
    key, old, new, count = difference
    more = f" and {count - 1} other setting(s)" if count > 1 else ""
    return f"{key}: {old!r} there, {new!r} now{more}"


# ---------------------------------------------------------------------------------------------
# One run at a time per output folder

_HELD: dict[str, Any] = {}  # lock path -> the lock this process holds until it exits


def lock_paths(folder: str | os.PathLike) -> tuple[Path, Path]:
    """The lock file of ``folder`` and the file naming its holder, beside it (not inside: nothing
    of ours enters a folder that is pushed, moved aside or replaced whole)."""
    path = Path(os.path.abspath(folder))
    return path.parent / f".{path.name}.lock", path.parent / f".{path.name}.lock.json"


def lock_folder(folder: str | os.PathLike, what: str = "output_dir") -> None:
    """Hold an exclusive lock on ``folder`` until this process ends (``filelock``'s ``flock``, which
    the kernel releases when a process dies). A folder locked by a live process is refused in one
    line naming it; the lock of a process that was killed is taken over with a message."""
    from filelock import FileLock, Timeout

    lock_path, owner_path = lock_paths(folder)
    if str(lock_path) in _HELD:
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        owner = _read_owner(owner_path)
        raise OutputConflict(f"{what} {str(folder)!r} is in use by process {owner.get('pid', '?')} on {owner.get('host', '?')} "
                             f"(started {owner.get('started', '?')}): wait for it to finish, or choose another {what}") from None
    previous = _read_owner(owner_path)
    if previous:  # its holder ended without releasing: killed
        logger.warning("took over the lock of %s left by process %s on %s (started %s), which is no longer running",
                       folder, previous.get("pid"), previous.get("host"), previous.get("started"))
    write_json_atomic(owner_path, {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    _HELD[str(lock_path)] = (lock, owner_path)


@atexit.register
def release_locks() -> None:
    """Release every folder lock this process holds (a script's end; ``run_cli`` calls it)."""
    while _HELD:
        _, (lock, owner_path) = _HELD.popitem()
        owner_path.unlink(missing_ok=True)
        lock.release()


def _read_owner(path: Path) -> dict:
    try:
        owner = json.loads(path.read_text(encoding="utf-8"))
        return owner if isinstance(owner, dict) else {}
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------------------------------------
# Claiming an output folder, resuming its last complete checkpoint


def last_complete_checkpoint(output_dir: str | os.PathLike, remove_incomplete: bool = True) -> Optional[str]:
    """The Trainer checkpoint to resume: the highest-numbered one whose ``trainer_state.json`` (the
    file the Trainer writes last) is whole. Later ones were cut short by a kill or a full disk;
    they are removed (``remove_incomplete``, the main process) so no reader takes them for complete."""
    folder = Path(output_dir)
    found = sorted((int(m.group(1)), p) for p in (folder.iterdir() if folder.is_dir() else []) if p.is_dir() and (m := CHECKPOINT_PATTERN.match(p.name)))
    for _, checkpoint in reversed(found):
        try:
            json.loads((checkpoint / CHECKPOINT_DONE_FILE).read_text(encoding="utf-8"))["global_step"]
            return str(checkpoint)
        except (OSError, ValueError, KeyError, TypeError):
            logger.warning("%s is incomplete (its writer was killed or ran out of space): %s", checkpoint, "removed" if remove_incomplete else "skipped")
            if remove_incomplete:
                shutil.rmtree(checkpoint, ignore_errors=True)
    return None


def remove_checkpoints(output_dir: str | os.PathLike) -> tuple[int, int]:
    """Remove the Trainer checkpoints of a run that has succeeded; ``(count, bytes)`` freed."""
    folders = [p for p in Path(output_dir).iterdir() if p.is_dir() and CHECKPOINT_PATTERN.match(p.name)]
    size = sum(f.stat().st_size for folder in folders for f in folder.rglob("*") if f.is_file())
    for folder in folders:
        shutil.rmtree(folder)
    return len(folders), size


def claim_output_dir(output_dir: str, signature: dict[str, Any], is_main_process: bool = True) -> Optional[str]:
    """Lock ``output_dir`` (the main process) and check that it is empty or holds this same run;
    return its last complete checkpoint, if any.

    Raises ``FileExistsError`` naming the first differing setting when the directory belongs to
    another run, or the process using it. The main process records the signature.
    """
    path = Path(output_dir)
    if is_main_process:
        lock_folder(path)
    signature_path = path / SIGNATURE_FILE
    if signature_path.is_file():
        recorded = json.loads(signature_path.read_text(encoding="utf-8"))
        difference = first_difference(recorded, signature)
        if difference:
            raise OutputConflict(
                f"output_dir {output_dir!r} holds a different run ({describe_difference(difference)}): "
                "choose another --output_dir, or re-run with the recorded settings to resume it"
            )
    elif is_main_process and path.is_dir() and any(path.iterdir()):  # other ranks may see the main one's files appear
        raise OutputConflict(
            f"output_dir {output_dir!r} is not empty and has no {SIGNATURE_FILE}: expected an empty or new directory"
        )
    if is_main_process:
        write_json_atomic(signature_path, signature)
    return last_complete_checkpoint(output_dir, remove_incomplete=is_main_process)


SECRET_FLAGS = ("hub_token",)  # moved to the environment before anything is written (see utils.arguments)
REDACTED = "<redacted>"


def redact_argv(argv: list[str]) -> list[str]:
    """``argv`` with the value of every secret flag (``--hub_token X``, ``--hub_token=X``) replaced."""
    out, hide = [], False
    for item in argv:
        name = item.lstrip("-").split("=", 1)[0]
        if hide:
            out.append(REDACTED)
        elif item.startswith("--") and name in SECRET_FLAGS and "=" in item:
            out.append(f"--{name}={REDACTED}")
        else:
            out.append(item)
        hide = item.startswith("--") and name in SECRET_FLAGS and "=" not in item
    return out


def hide_token(token: Optional[str]) -> None:
    """Hand a Hub token to ``huggingface_hub`` through ``HF_TOKEN`` (read at every call), so it never
    has to sit in arguments that are saved (``training_args.bin``), recorded or logged."""
    if token:
        os.environ["HF_TOKEN"] = token


def run_cli(main) -> None:
    """Run a script's ``main``; a bad input or Hub failure ends with one ``error: ...`` line, exit
    code 2; a full disk (or file-size limit, or quota) with one line too, exit code 1; a training
    run stopped by a signal after saving its checkpoint with one ``interrupted: ...`` line, exit
    code ``EXIT_INTERRUPTED`` (75)."""
    import sys

    from .hub_client import bound_hub_waits

    try:
        bound_hub_waits()
        main()
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as err:
        print(f"interrupted: {err}", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as err:
        if not is_disk_full(err):
            raise
        where = next((e.filename for e in (err, err.__cause__, err.__context__) if getattr(e, "filename", None)), None)
        print(f"error: out of disk space{f' writing {where}' if where else ''} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}): "
              "free space (or raise the file-size limit) and re-run the same command; complete files were kept, partial ones removed", file=sys.stderr)
        sys.exit(1)
    finally:
        release_locks()


def setup_logging(should_log: bool) -> None:
    """Script logging as in the HF examples: INFO on the main process, warnings elsewhere."""
    import logging
    import sys

    import datasets
    import transformers

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=[logging.StreamHandler(sys.stdout)])
    level = logging.INFO if should_log else logging.WARNING
    for name in ("__main__", "utils"):
        logging.getLogger(name).setLevel(level)
    datasets.utils.logging.set_verbosity_warning()
    transformers.utils.logging.set_verbosity(level)
