"""Shared fixtures and helpers: a small generated corpus (made once per session), the tiny model
config, running scripts and studies, hand-made results, a FLEURS-shaped offline Hub repo."""

import csv
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

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


@pytest.fixture(scope="session")
def slurm() -> dict:
    """A real single-node Slurm (``tests/slurm_cluster.py``), started once per test run; the client
    environment to reach it. Skipped, with the reason, where it cannot be started, except under CI."""
    from tests.slurm_cluster import Unavailable, start

    try:
        return start()
    except Unavailable as err:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but no Slurm could be started for the Slurm tests: {err}")
        pytest.skip(f"no single-node Slurm here ({err})")


def pytest_sessionfinish(session):
    """Stop the test Slurm if this run started it (the controller process, once every worker is done)."""
    if not hasattr(session.config, "workerinput"):
        from tests.slurm_cluster import stop_if_started

        stop_if_started()


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


GRID_TRAIN = {"per_device_train_batch_size": 8, "learning_rate": 2.0e-3, "freeze_feature_encoder": False, "use_cpu": True, "disable_tqdm": True}


def study_config(tmp_path, **overrides) -> dict:
    """A small study config: one upstream and one downstream language, two seeds, the tiny model."""
    return {
        "name": "test study",
        "output_dir": str(tmp_path / "study"),
        "model": str(TINY_CONFIG),
        "upstream": ["en"],
        "downstream": ["ca"],
        "sparsities": [0.8],
        "seeds": [0, 1],
        "data": {"data_dir": "UNUSED"},
        "finetune": {"num_train_epochs": 1, "max_train_samples": 48, **GRID_TRAIN},
        "transfer": {"freeze_epochs": 1, "train_epochs": 1, "max_train_samples": 24, **GRID_TRAIN},
        "resources": {kind: {"cpus": 1} for kind in ("init", "finetune", "prune", "transfer", "iou")},  # one thread: runs comparable across --slots
    } | overrides


def write_study(tmp_path, name="study.yaml", **overrides):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(study_config(tmp_path, **overrides), sort_keys=False))
    return path


def grid(path, *flags, timeout=600, **kw):
    """run_grid.py in a fresh process, offline."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, str(ROOT / "run_grid.py"), "--config", str(path), *flags], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, **kw)


def utterances(edits, lengths):
    from utils.metrics import Utterance

    return [Utterance(f"{i}.wav", "x" * n, "", e, n, 1, 1) for i, (e, n) in enumerate(zip(edits, lengths))]


def result_row(up, down, s, edits, lengths, seed=0):
    """A transfer result as the grid collects it, from per-utterance edits and reference lengths."""
    return {"upstream": up, "downstream": down, "sparsity": s, "seed": seed, "test_cer": sum(edits) / sum(lengths), "utterances": utterances(edits, lengths)}


FAST = ["--model_name_or_path", str(TINY_CONFIG), "--use_cpu", "--per_device_train_batch_size", "8", "--learning_rate", "2e-3",
        "--adam_beta2", "0.98", "--warmup_steps", "20", "--freeze_feature_encoder", "False", "--disable_tqdm", "True", "--seed", "1"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A small 'fine-tuned' CTC model directory (random weights) with its feature extractor: what
    run_prune.py prunes in the tests."""
    import torch
    from transformers import AutoConfig, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

    out = tmp_path_factory.mktemp("source")
    torch.manual_seed(0)
    Wav2Vec2ForCTC(AutoConfig.from_pretrained(TINY_CONFIG)).save_pretrained(out)
    Wav2Vec2FeatureExtractor.from_pretrained(TINY_CONFIG).save_pretrained(out)
    return out


def run_script(args, env, script="run_finetune.py"):
    return subprocess.run([sys.executable, str(ROOT / script), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)


def _tar_gz(files: dict[str, Path]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for arcname, path in files.items():
            tar.add(path, arcname=arcname)
    return buf.getvalue()


def make_fleurs_repo(hub_cache: Path, corpus: Path, language: str = "ca", config: str = "ca_es") -> None:
    """A tiny google/fleurs-shaped repo in an offline Hub cache, made from the generated corpus."""
    from tests.hub_cache import add_offline_repo

    files = {}
    for split, fleurs_split in (("train", "train"), ("validation", "dev"), ("test", "test")):
        with open(corpus / language / split / "metadata.csv", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        lines, audio = [], {}
        for i, row in enumerate(rows):
            name = f"{1000 + i}.wav"
            raw = row["transcription"].capitalize() + "."
            lines.append("\t".join([str(i), name, raw, row["transcription"], "x", "16000", "FEMALE"]))
            audio[f"{fleurs_split}/{name}"] = corpus / language / split / row["file_name"]
        files[f"data/{config}/{fleurs_split}.tsv"] = ("\n".join(lines) + "\n").encode()
        files[f"data/{config}/audio/{fleurs_split}.tar.gz"] = _tar_gz(audio)
    add_offline_repo(hub_cache, "google/fleurs", "dataset", files)


def files_containing(root: Path, secret: str) -> list[Path]:
    """Every file under ``root`` whose bytes contain ``secret`` (pickles, safetensors and logs included)."""
    needle = secret.encode()
    return [p for p in Path(root).rglob("*") if p.is_file() and not p.is_symlink() and needle in p.read_bytes()]
