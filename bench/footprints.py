#!/usr/bin/env python
"""The disk footprint of every shipped study config, as ``run_grid.py --dry_run`` prints it,
written to docs/footprint.md:

    python bench/footprints.py            # rewrites docs/footprint.md

This machine cannot reach the Hub, so the Hub models the configs name are stood in for by configs
of their published shapes (``SHAPES`` of bench/bench_prune.py, CTC vocabulary 32) in an offline
Hub cache under a temporary folder; the dry run itself is the one users run. Configs with local
models (the demo's tiny one) use those.
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_prune import SHAPES  # bench/ is the script directory

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.hub_cache import add_offline_repo  # noqa: E402

HUB_SHAPES = {"facebook/wav2vec2-xls-r-300m": "300m", "facebook/wav2vec2-xls-r-1b": "1b", "facebook/w2v-bert-2.0": "w2v-bert-600m"}
HEADER = """# Disk footprint of the shipped study configs

What `python run_grid.py --config <config> --dry_run` prints for each shipped config: the bytes
each kind of step keeps once it has succeeded, in total, and what keeping the Trainer checkpoints
(`keep_checkpoints: true`) would take instead (the paper study before and after its checkpoints
are removed). Sizes come from each model's config (weights in float32, built on the meta device),
so they hold for any machine; the data and feature caches under `~/.cache` are not counted
([clusters.md](clusters.md#disk)).

The Hub models are stood in for by configs of their published shapes (`bench/bench_prune.py`,
CTC vocabulary 32: a head of a few thousand weights out of hundreds of millions). Re-rendered by
`python bench/footprints.py`.
"""


def stand_in_cache(folder: Path) -> None:
    from transformers import AutoConfig

    for repo, shape in HUB_SHAPES.items():
        sizes = dict(SHAPES[shape])
        config = AutoConfig.for_model(sizes.pop("model_type"), vocab_size=32, **sizes)
        add_offline_repo(folder, repo, "model", {"config.json": config.to_json_string().encode()})


def main():
    with tempfile.TemporaryDirectory() as tmp:
        stand_in_cache(Path(tmp))
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=tmp)
        sections = []
        for config in sorted((ROOT / "configs").glob("*.yaml")):
            result = subprocess.run([sys.executable, "run_grid.py", "--config", str(config.relative_to(ROOT)), "--dry_run"], cwd=ROOT, env=env,
                                    capture_output=True, text=True, timeout=600)
            if result.returncode != 0:
                raise RuntimeError(f"{config.name}: {result.stderr[-2000:]}")
            lines = result.stdout.splitlines()
            start = next(i for i, line in enumerate(lines) if line.startswith("# disk footprint"))
            block = [line.removeprefix("# ") for line in lines[start:-1]]  # up to the count of steps to run
            sections.append(f"## `configs/{config.name}`\n\n```text\n" + "\n".join(block) + "\n```\n")
            print(f"{config.name}: {next(line for line in block if line.strip().startswith('total')).split()[-2:]}", flush=True)
    (ROOT / "docs" / "footprint.md").write_text(HEADER + "\n" + "\n".join(sections), encoding="utf-8")


if __name__ == "__main__":
    main()
