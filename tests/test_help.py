"""Every script's ``--help`` prints its usage and exits 0 (a ``%`` in a help string once made
argparse fail on it)."""

import pytest

from tests.conftest import run_in_process

SCRIPTS = ["run_pretrain.py", "run_finetune.py", "run_prune.py", "run_transfer.py", "run_iou.py", "run_grid.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_prints_the_usage(script, capsys):
    assert run_in_process(script, ["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {script}") and "--output_dir" in out, out[:500]
