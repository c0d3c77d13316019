"""Every script's ``--help`` prints its usage, starts with what the script does and a realistic
example command, and that example parses with the script's own parser (a ``%`` in a help string
once made argparse fail on ``--help``)."""

import pytest

from tests.conftest import run_in_process
from tests.doc_checks import SCRIPTS, command_problem, commands


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_prints_the_usage_and_an_example_that_parses(script, capsys):
    assert run_in_process(script, ["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {script}") and "--output_dir" in out, out[:500]
    examples = [(name, args) for name, args in commands(out) if name == script]
    assert examples, f"{script} --help shows no example command"
    assert [problem for name, args in examples if (problem := command_problem(name, args))] == []


def test_a_model_or_dataset_that_cannot_be_found_is_one_line_and_writes_nothing(tmp_path):
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    cases = [
        (["run_prune.py", "--model_name_or_path", "someone/not-a-model", "--sparsity", "0.8"], "cannot load the model 'someone/not-a-model'"),
        (["run_finetune.py", "--language", "en", "--model_name_or_path", "configs/tiny-wav2vec2", "--use_cpu",
          "--dataset_name", "someone/not-a-dataset"], "cannot load split 'train' of dataset 'someone/not-a-dataset'"),
    ]
    for i, (argv, message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        result = subprocess.run([sys.executable, str(ROOT / argv[0]), *argv[1:], "--output_dir", str(out)], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, result.stderr[-2000:]
        assert "Traceback" not in result.stderr and result.stderr.strip().splitlines()[-1].startswith(f"error: {message}"), result.stderr[-2000:]
        if "someone/not-a-model" in argv:
            assert not out.exists()  # refused before anything was written


HEAVY = ("torch", "transformers.modeling_utils", "datasets", "matplotlib")
MODULES_AFTER = """
import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit:
    pass
print("loaded:", *sorted(m for m in {heavy!r} if m in sys.modules), file=sys.stderr)
"""


@pytest.mark.parametrize("argv", [
    ["run_prune.py", "--help"],
    ["run_iou.py", "--help"],
    ["run_grid.py", "--help"],
    ["run_grid.py", "--config", "configs/demo.yaml", "--status"],
])
def test_the_command_line_answers_without_loading_torch(argv):
    """--help of the scripts that need no TrainingArguments, and the grid's --status, import
    neither torch nor transformers' models nor datasets nor matplotlib (checked in a fresh
    interpreter: nothing else this test process imported counts)."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    result = subprocess.run([sys.executable, "-c", MODULES_AFTER.format(heavy=HEAVY), *argv], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode == 0 and result.stdout.strip(), result.stderr[-2000:]
    assert [line for line in result.stderr.splitlines() if line.startswith("loaded:")] == ["loaded:"], result.stderr[-500:]
