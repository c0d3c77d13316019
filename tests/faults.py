"""Run one of our scripts with a fault injected at a named point, for the fault tests:

    python -m tests.faults POINT ACTION -- SCRIPT [ARGS...]

POINT is ``module:qualname`` with an optional ``#N`` (the N-th call, default the first) of a
function or method, patched before the script starts. ACTION, on that call:

- ``kill``: SIGKILL on entering it (a preemption, an OOM kill);
- ``kill-after``: SIGKILL right after it returns;
- ``torn``: let it write, cut the file it wrote (its first path argument) to half, then SIGKILL
  (a process killed in the middle of writing that file);
- ``fsize=BYTES``: from entering it on, no file may grow past BYTES (``ulimit -f``: a full disk,
  without root);
- ``wait=PATH``: wait there until PATH exists, then go on (a run held in mid-flight while a test
  starts another one beside it);
- ``signal=NAME``: send itself that signal on entering it, then go on (a scheduler's SIGTERM or
  time-limit SIGUSR1 arriving in the middle of a step).

Nothing here imports the scripts' code before the patch: modules that bind the patched function
when they are imported (``from safetensors.torch import save_file``) then bind the patched one.
"""

from __future__ import annotations

import functools
import importlib
import os
import resource
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KILLED = -9  # the return code of a process ended by SIGKILL


def faulty(point: str, action: str, script: str, args: list[str], env: dict, **kw) -> subprocess.CompletedProcess:
    """``script`` run in a fresh process with ``action`` at ``point`` (for the tests)."""
    return subprocess.run([sys.executable, "-m", "tests.faults", point, action, "--", script, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, **kw)


def last_line(result: subprocess.CompletedProcess) -> str:
    return result.stderr.strip().splitlines()[-1]


def _first_path(args: tuple, kwargs: dict) -> Path:
    for value in [*args, *kwargs.values()]:
        if isinstance(value, (str, os.PathLike)):
            return Path(value)
    raise RuntimeError("torn: the patched function got no path argument")


def patch(point: str, action: str) -> None:
    """Wrap the function named by ``point`` so that its N-th call does ``action``."""
    target, _, nth = point.partition("#")
    module_name, _, qualname = target.partition(":")
    owner = importlib.import_module(module_name)
    *parents, name = qualname.split(".")
    for part in parents:
        owner = getattr(owner, part)
    original = getattr(owner, name)
    wanted, calls = int(nth or 1), [0]

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] != wanted:
            return original(*args, **kwargs)
        print(f"faults: {action} at call {wanted} of {point}", file=sys.stderr, flush=True)
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if action.startswith("wait="):
            deadline = time.time() + 300
            while not Path(action.split("=", 1)[1]).exists() and time.time() < deadline:
                time.sleep(0.05)
            return original(*args, **kwargs)
        if action.startswith("signal="):
            os.kill(os.getpid(), getattr(signal, action.split("=", 1)[1]))
            return original(*args, **kwargs)
        if action.startswith("fsize="):
            limit = int(action.split("=", 1)[1])
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
            return original(*args, **kwargs)
        result = original(*args, **kwargs)
        if action == "torn":
            path = _first_path(args, kwargs)
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])
        elif action != "kill-after":
            raise SystemExit(f"faults: unknown action {action!r}")
        os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(owner, name, wrapper)


def main(argv: list[str]) -> None:
    if len(argv) < 4 or argv[2] != "--":
        raise SystemExit(__doc__)
    point, action, script, *args = argv[0], argv[1], argv[3], *argv[4:]
    sys.path.insert(0, str(ROOT))
    patch(point, action)
    sys.argv = [script, *args]
    runpy.run_path(str(ROOT / script), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
