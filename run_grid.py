#!/usr/bin/env python
"""Run a whole study from one config file: fine-tune, prune (and prune the base), transfer every
ticket to every downstream language, compare masks, and write REPORT.md.

    python run_grid.py --config configs/paper.yaml             # the paper's study (GPUs, FLEURS)
    python run_grid.py --config configs/demo.yaml              # what `make demo` runs (CPU, minutes)
    python run_grid.py --config configs/paper.yaml --dry_run   # print the commands still to run
    python run_grid.py --config configs/paper.yaml --rerun_stale   # after editing a setting

Steps whose result exists are skipped, so a killed grid resumes where it stopped. Each step run
records its command, settings, identity, status and time in <output_dir>/steps/, its output in
logs/. A finished step whose settings (or a step it needs) changed since it ran is stale: the grid
names it and stops before any work until --rerun_stale re-runs it and everything downstream of it.
"""

import argparse
import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path

from utils.grid import StepFailed, collect, load_config, move_aside, plan, run_step, step_states
from utils.report import RESULT_COLUMNS, result_rows, write_csv_atomic, write_report
from utils.runs import run_cli


def check_flags(config) -> None:
    """Extra flags in the config must be options of the scripts that receive them."""
    from run_finetune import CTCTrainingArguments, DataArguments, ModelArguments
    from run_prune import PruneArguments
    from run_transfer import TransferArguments

    def names(*classes):
        return {f.name for cls in classes for f in dataclasses.fields(cls)}

    allowed = {
        "data": names(DataArguments),
        "finetune": names(ModelArguments, DataArguments, CTCTrainingArguments),
        "prune": names(PruneArguments),
        "pretrain": names(ModelArguments, DataArguments, CTCTrainingArguments) | {"mixture", "num_train"},
        "transfer": names(TransferArguments, ModelArguments, DataArguments, CTCTrainingArguments),
    }
    for section, valid in allowed.items():
        unknown = sorted(set(getattr(config, section)) - valid)
        if unknown:
            raise ValueError(f"grid config section {section!r} has unknown flag(s) {unknown}: expected options of its script (see --help)")


def main():
    # 1. The study: read and validate the whole config before any work starts.
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="study config (YAML or JSON), e.g. configs/paper.yaml")
    parser.add_argument("--dry_run", action="store_true", help="print the stale steps and the commands still to run, in order, and stop")
    parser.add_argument("--rerun_stale", action="store_true", help="move the outputs of stale steps aside (to <output_dir>/stale/) and run them again")
    args = parser.parse_args()
    config = load_config(args.config)
    check_flags(config)
    steps = plan(config)

    # 2. Where the study stands: finished, stale (settings changed since they ran) or still to run.
    states = step_states(config, steps)
    stale = [step for step in steps if states[step.id].state == "stale"]
    todo = [step for step in steps if states[step.id].state != "done"]
    if args.dry_run:
        for step in stale:
            print(f"# stale: {step.id} ({states[step.id].reason})")
        if stale:
            print(f"# {len(stale)} stale step(s): `--rerun_stale` moves their outputs aside and runs them again")
        for step in todo:
            print(f"# {step.id}" + (f" (after {', '.join(step.needs)})" if step.needs else "") + f"\n{shlex.join(step.argv)}")
        print(f"# {len(todo)} of {len(steps)} steps to run ({len(stale)} of them stale)")
        return
    if stale and not args.rerun_stale:
        changed = [step for step in stale if not states[step.id].reason.startswith("needs ")]
        names = "; ".join(f"{step.id} ({states[step.id].reason})" for step in changed[:5]) + ("; ..." if len(changed) > 5 else "")
        downstream = f" and {len(stale) - len(changed)} step(s) that depend on them" if len(stale) > len(changed) else ""
        raise ValueError(f"{len(stale)} finished step(s) are stale: {names}{downstream}. "
                         "Re-run with --rerun_stale (their outputs are moved aside, not deleted), or restore the config")
    if args.rerun_stale:
        if not stale:
            print("--rerun_stale: no step is stale; running the unfinished steps as usual", flush=True)
        else:
            moved = move_aside(config, stale, time.strftime("%Y%m%d-%H%M%S"))
            print(f"--rerun_stale: moved the outputs of {len(stale)} stale step(s) to {moved}", flush=True)

    # 3. Run what is not done yet, with progress.
    print(f"study {config.name}: {len(steps)} steps, {len(steps) - len(todo)} already done -> {config.output_dir}", flush=True)
    started, ran = time.time(), 0
    for i, step in enumerate(steps, 1):
        prefix = f"[{i:>3}/{len(steps)}] {step.id}"
        if step.done.exists():
            print(f"{prefix}: done already", flush=True)
            continue
        print(f"{prefix} ...", end="", flush=True)
        record = run_step(config, step)
        ran += 1
        detail = ""
        if step.kind == "transfer":
            result = json.loads(step.done.read_text())
            detail = f", test CER {100 * result['test_cer']:.1f}%"
        print(f" {record['seconds']:.1f} s{detail}", flush=True)

    # 4. Aggregate: every transfer result in one table (with its interval), and the report.
    rows, ious, seed_ious = collect(config, steps)
    write_csv_atomic(Path(config.output_dir) / "results.csv", result_rows(rows), RESULT_COLUMNS)
    upstreams = config.upstream + (["base"] if config.transfer_base and config.prune_base else [])
    report = write_report(config.output_dir, rows, ious, upstreams, config.downstream, f"Study: {config.name}", config.note, seed_ious)
    print(f"ran {ran} step(s), skipped {len(steps) - len(todo)}, in {time.time() - started:.0f} s")
    print(f"report: {report}")


if __name__ == "__main__":
    try:
        run_cli(main)
    except StepFailed as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
