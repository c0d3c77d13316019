"""Run directories: atomic writes, and the signature that stops one run from overwriting another.

Each script writes ``run_signature.json`` (what defines the run: script, language, data, model,
...) into its output directory. Re-running the same command resumes from the last checkpoint; a
directory that holds a different run, or files no script of ours wrote, is refused before
anything is written.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

from transformers.trainer_utils import get_last_checkpoint

SIGNATURE_FILE = "run_signature.json"


def write_json_atomic(path: str | os.PathLike, payload: Any) -> None:
    """Write JSON to a temporary file, then rename it over ``path``: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, ensure_ascii=False, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def replace_dir_atomic(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Move a fully written directory ``src`` to ``dst``; if another process won the race, keep its copy."""
    try:
        os.rename(src, dst)
    except OSError:
        if not Path(dst).is_dir():
            raise
        shutil.rmtree(src, ignore_errors=True)


def claim_output_dir(output_dir: str, signature: dict[str, Any], is_main_process: bool = True) -> Optional[str]:
    """Check that ``output_dir`` is empty or holds this same run; return its last checkpoint, if any.

    Raises ``FileExistsError`` naming the differing settings when the directory belongs to another
    run. The main process records the signature.
    """
    path = Path(output_dir)
    signature_path = path / SIGNATURE_FILE
    if signature_path.is_file():
        recorded = json.loads(signature_path.read_text(encoding="utf-8"))
        differences = {k: (recorded.get(k), v) for k, v in signature.items() if recorded.get(k) != v}
        if differences:
            detail = "; ".join(f"{k}: {old!r} there, {new!r} now" for k, (old, new) in differences.items())
            raise FileExistsError(f"output_dir {output_dir!r} holds a different run ({detail}): choose another --output_dir")
    elif path.is_dir() and any(path.iterdir()):
        raise FileExistsError(
            f"output_dir {output_dir!r} is not empty and has no {SIGNATURE_FILE}: expected an empty or new directory"
        )
    if is_main_process:
        write_json_atomic(signature_path, signature)
    return get_last_checkpoint(output_dir) if path.is_dir() else None


def run_cli(main) -> None:
    """Run a script's ``main``; a bad input or Hub failure ends with one ``error: ...`` line, exit code 2."""
    import sys

    from .hub import HubError

    try:
        main()
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, HubError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


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
