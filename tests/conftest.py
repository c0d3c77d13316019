"""Shared fixtures: a small generated corpus (made once per session) and the tiny model config."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TINY_CONFIG = ROOT / "configs" / "tiny-wav2vec2"


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
