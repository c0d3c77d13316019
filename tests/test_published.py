"""Every report published under docs/ re-renders byte for byte from the files committed beside it,
with the command each folder's README gives."""

import shutil

import pytest

from tests.conftest import ROOT, run_in_process

# (folder under docs/ that is the study's output_dir, the config it was run with)
PUBLISHED = [("bias-study/study", "configs/bias.yaml"), ("demo-seeds", "configs/demo-seeds.yaml"), ("demo", "configs/demo.yaml"),
             ("methods-study", "configs/methods.yaml"), ("analysis-study", "configs/analysis.yaml")]


def rendered(folder):
    """The files the report writes (figures are checked for existence: their bytes follow matplotlib's version)."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.name in ("REPORT.md", "results.csv")}


@pytest.mark.parametrize("published,config", PUBLISHED)
def test_published_report_rerenders_from_its_files(tmp_path, published, config):
    source = ROOT / "docs" / published
    copy = tmp_path / "study"
    shutil.copytree(source, copy)
    for path in copy.rglob("*"):
        if path.name in ("REPORT.md", "results.csv") or path.suffix == ".png" and path.parent.name == "figures":
            path.unlink()  # nothing of the old rendering is left to be found
    assert run_in_process("run_grid.py", ["--config", str(ROOT / config), "--output_dir", str(copy), "--report_only"]) == 0
    committed, again = rendered(source), rendered(copy)
    assert committed and again.keys() == committed.keys()
    for name in committed:
        assert again[name] == committed[name], f"docs/{published}/{name} does not re-render from its files"
    assert all((copy / name).with_name("figures").is_dir() for name in committed if name.name == "REPORT.md")
