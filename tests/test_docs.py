"""The manual cannot drift: links, fences, documented commands, quoted study numbers and config
keys are checked against the files and parsers they describe, and the code users are told to copy
runs. Each check is also shown failing on a broken page (``tests/doc_checks.py``)."""

import dataclasses
import re
import shutil
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, TINY_CONFIG
from tests.doc_checks import (
    broken_links,
    documented_command_problems,
    fence_problems,
    fences,
    markdown_files,
    unsourced_numbers,
)

PAGES = markdown_files()
RESULTS = ["demo", "demo-seeds", "bias-study", "methods-study", "analysis-study"]


def _id(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("page", PAGES, ids=_id)
def test_links_images_and_anchors_resolve(page):
    assert broken_links(page, page.read_text(encoding="utf-8")) == []


@pytest.mark.parametrize("page", PAGES, ids=_id)
def test_code_fences_close_and_hold_no_heading(page):
    assert fence_problems(page, page.read_text(encoding="utf-8")) == []


@pytest.mark.parametrize("page", PAGES, ids=_id)
def test_documented_commands_parse_with_their_scripts_parsers(page):
    assert documented_command_problems(page, page.read_text(encoding="utf-8")) == []


@pytest.mark.parametrize("study", RESULTS)
def test_a_study_reading_quotes_only_numbers_its_files_print(study):
    assert unsourced_numbers(ROOT / "docs" / study / "README.md") == []


def test_each_check_fails_on_a_broken_page(tmp_path):
    page = ROOT / "docs" / "broken.md"  # where a page would be (never written): links resolve from docs/
    assert broken_links(page, "[the manual](scripts.md) [gone](nowhere.md) ![pic](demo/figures/none.png) [anchor](hub.md#no-such-heading)") == [
        "docs/broken.md: 'nowhere.md' names no file", "docs/broken.md: 'demo/figures/none.png' names no file",
        "docs/broken.md: 'hub.md#no-such-heading' names no heading of hub.md"]
    # The fence once 'closed' mid-line in the README: it swallowed prose and a heading.
    swallowed = "```\nerror: 9 steps are stale\n``` A config naming an unknown language is refused.\n\n### Studies with several bases\n\ntext\n"
    problems = fence_problems(tmp_path / "x.md", swallowed)
    assert any("fence marker inside" in p for p in problems) and any("heading inside" in p for p in problems) and any("never closed" in p for p in problems)
    assert fence_problems(tmp_path / "x.md", "```bash\n# a comment\npython run_iou.py\n```\n") == []
    bad = ("```bash\npython run_prune.py --model_name_or_path m --output_dir t --sparsity high\n"
           "accelerate launch run_transfer.py --upstream en --downstream ca --spasity 0.8\n"
           "python run_transfer.py --upstream en --downstream ca --freeze_epoch 1\n```\n")
    problems = documented_command_problems(ROOT / "docs" / "x.md", bad)
    assert len(problems) == 3 and "invalid float value: 'high'" in problems[0] and "--spasity" in problems[1] and "--freeze_epoch" in problems[2]
    # A reading that quotes a number no generated file prints.
    readme = ROOT / "docs" / "demo-seeds" / "README.md"
    copy = tmp_path / "demo-seeds"
    shutil.copytree(readme.parent, copy)
    text = readme.read_text(encoding="utf-8").replace("+9.37 pp", "+9.73 pp")
    (copy / "README.md").write_text(text, encoding="utf-8")
    assert unsourced_numbers(copy / "README.md") == ["9.73"]


def test_every_study_config_key_is_documented():
    from utils.executors import SLURM_KEYS, STEP_KINDS, Resources
    from utils.grid import StudyConfig

    text = (ROOT / "docs" / "configs.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"`([a-z_]+)`", text))
    keys = {f.name for f in dataclasses.fields(StudyConfig)} | {"extends"} | {f.name for f in dataclasses.fields(Resources)}
    assert keys | set(SLURM_KEYS) | set(STEP_KINDS) <= documented
    shipped = {key for path in (ROOT / "configs").glob("*.yaml") for key in yaml.safe_load(path.read_text())}
    assert shipped <= documented


def test_the_readme_is_a_front_door_and_the_version_is_one():
    from utils import __version__

    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 250
    assert yaml.safe_load((ROOT / "CITATION.cff").read_text())["version"] == __version__ == (ROOT / "VERSION").read_text().strip()
    assert f"## {__version__} " in (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")


def test_the_manual_shows_the_mask_reader_the_card_shows():
    from utils.hub import MASK_READER, _masks_dataset_card

    assert MASK_READER in (ROOT / "docs" / "mask-format.md").read_text(encoding="utf-8")
    assert MASK_READER in _masks_dataset_card("me/masks")


def test_the_mask_holding_callback_of_the_manual_holds_a_mask_in_a_trainer(tmp_path):
    import numpy as np
    import torch
    from datasets import Dataset
    from transformers import AutoConfig, Trainer, TrainingArguments, Wav2Vec2ForCTC

    code = next(f.content for f in fences((ROOT / "docs" / "hub.md").read_text(encoding="utf-8")) if "class KeepMask" in f.content)
    namespace: dict = {}
    exec(compile(code, "docs/hub.md", "exec"), namespace)
    torch.manual_seed(0)
    model = Wav2Vec2ForCTC(AutoConfig.from_pretrained(TINY_CONFIG))
    rng = np.random.default_rng(0)
    masks = {name: rng.random(tuple(p.shape)) < 0.3 for name, p in model.named_parameters() if "encoder.layers" in name and p.ndim == 2}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    data = Dataset.from_dict({"input_values": rng.standard_normal((8, 8000)).astype("float32").tolist(),
                              "labels": rng.integers(3, model.config.vocab_size, (8, 5)).tolist()})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2, use_cpu=True,
                             report_to=[], save_strategy="no", disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=data, callbacks=[namespace["KeepMask"](model, masks)]).train()
    params = dict(model.named_parameters())
    for name, keep in masks.items():
        keep = torch.from_numpy(keep)
        assert torch.all(params[name].detach()[~keep] == 0), name  # pruned: exactly zero after training
        assert not torch.equal(params[name].detach()[keep], before[name][keep]), name  # kept: trained
