"""A study whose bases are models of two families (wav2vec2 and w2v-BERT 2.0, as the paper's second
open question asks of XLS-R 1B and w2v-BERT beside 300M), run through run_grid.py on the tiny
configs; the comparison report checked against its results files."""

import json
import re

from tests.conftest import ROOT, grid, write_study
from utils.masks import Mask

MODELS = {"xlsr": {"model": str(ROOT / "configs" / "tiny-wav2vec2")}, "w2vbert": {"model": str(ROOT / "configs" / "tiny-w2v-bert")}}


def test_bases_of_two_families_compared_in_one_study(corpus_dir, tmp_path):
    from utils.corpus import generate_corpus

    data = tmp_path / "data"
    data.mkdir()
    for code in ("en", "ca"):
        (data / code).symlink_to(corpus_dir / code)
    generate_corpus(str(data), ["de"], num_train=240, num_eval=24, vocab_size=60)
    path = write_study(tmp_path, bases=MODELS, dominant="en", upstream=["en", "de"], seeds=[0], data={"data_dir": str(data / "{language}")},
                       prune_base=False)
    result = grid(path, "--slots", "2", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"ran 16 step\(s\), skipped 0", result.stdout), result.stdout[-2000:]  # per base: init, 2 fine-tunes, 2 prunes, 2 transfers, IoU
    study = tmp_path / "study"
    cer = {}
    for name, model_type in (("xlsr", "wav2vec2"), ("w2vbert", "wav2vec2-bert")):
        root = study / f"base-{name}" / "seed-0"
        assert json.loads((root / "base-model" / "config.json").read_text())["model_type"] == model_type
        for label in ("en", "de"):
            assert Mask.load(root / "tickets" / label / "sparsity-0.80").metadata["model_type"] == model_type
        for up in ("en", "de"):
            cer[(name, up)] = json.loads((root / "transfer" / f"{up}-ca" / "sparsity-0.80" / "results.json").read_text())["test_cer"]
    report = (study / "REPORT.md").read_text()
    advantage = {name: cer[(name, "de")] - cer[(name, "en")] for name in MODELS}  # by hand: CER(de -> ca) - CER(en -> ca)
    for name in MODELS:
        assert f"| **{name}** | {100 * advantage[name]:+.2f} [" in report
    assert f"| w2vbert − xlsr | {100 * (advantage['w2vbert'] - advantage['xlsr']):+.2f} [" in report
