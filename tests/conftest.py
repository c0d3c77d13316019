"""Shared fixtures: a small generated corpus (made once per session) and the tiny model config."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TINY_CONFIG = ROOT / "configs" / "tiny-wav2vec2"


def run_in_process(script: str, args: list[str]) -> int:
    """Run a script as ``__main__`` in this process with ``sys.argv`` patched, as the Hugging Face
    example tests do (no interpreter start-up per call); returns its exit code."""
    import runpy

    argv = sys.argv
    sys.argv = [script, *args]
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = argv
    return 0


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    from utils.corpus import generate_corpus

    out = tmp_path_factory.mktemp("corpus")
    generate_corpus(str(out), ["en", "ca"], num_train=240, num_eval=24, vocab_size=60)
    return out


@pytest.fixture
def script_env(tmp_path) -> dict:
    """Environment for running a script in a fresh process: offline, quiet, own HF cache."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf_home"),
        PYTHONPATH=str(ROOT),
        TOKENIZERS_PARALLELISM="false",
    )
    return env
