#!/usr/bin/env python
"""Run a whole study from one config file: fine-tune, prune (and prune the base), transfer every
ticket to every downstream language, compare masks, and write REPORT.md.

    python run_grid.py --config configs/paper.yaml             # the paper's study (GPUs, FLEURS)
    python run_grid.py --config configs/demo.yaml              # what `make demo` runs (CPU, minutes)
    python run_grid.py --config configs/paper.yaml --dry_run   # print the commands still to run
    python run_grid.py --config configs/paper.yaml --rerun_stale   # after editing a setting
    python run_grid.py --config configs/paper.yaml --executor slurm   # submit the whole study to Slurm
    python run_grid.py --config configs/paper.yaml --status    # where it stands, without starting anything
    python run_grid.py --config configs/paper.yaml --cancel    # cancel the study's queued and running Slurm jobs

Steps run through submitit: on this machine (``--executor local``, ``--slots N`` at a time, each as
soon as the steps it needs have finished) or on Slurm (``--executor slurm``: every step submitted at
once with afterok dependencies and per-kind resources from the config, the report after them all).
Steps whose result exists are skipped, so a killed grid resumes where it stopped; a failed step
stops only the steps that depend on it (on Slurm, their jobs are cancelled before they start), and
the report says which results are missing and why. Re-running submits only what has not finished
and is not queued already. Each step run
records its command, settings, identity, status and time in <output_dir>/steps/, its output in
logs/. A finished step whose settings (or a step it needs) changed since it ran is stale: the grid
names it and stops before any work until --rerun_stale re-runs it and everything downstream of it.
"""

import argparse
import dataclasses
import os
import shlex
import sys
import time
from pathlib import Path

from utils.arguments import DataArguments, flag_names
from utils.errors import UsageError
from utils.executors import EXECUTORS, LIVE_STATES, cancel_slurm, check_local, local_gpu_count, read_record, run_local, slurm_executor, slurm_jobs, submit_slurm
from utils.grid import TYPOLOGY, StepFailed, collect, job_spec, load_config, move_aside, plan, publish, report_step, step_log_path, step_record_path, step_states, step_status, sub_studies
from utils.records import TransferResult
from utils.runs import lock_folder, run_cli


def check_flags(config) -> None:
    """Extra flags in the config must be options of the scripts that receive them."""
    allowed = {
        "data": {f.name for f in dataclasses.fields(DataArguments)},
        "finetune": flag_names("run_finetune.py"),
        "prune": flag_names("run_prune.py"),
        "ctc_pretrain": flag_names("run_finetune.py") | {"mixture", "num_train"},
        "ssl_pretrain": flag_names("run_pretrain.py"),
        "transfer": flag_names("run_transfer.py"),
        "imp": flag_names("run_imp.py"),
        "parp": flag_names("run_finetune.py"),
        "analysis": flag_names("run_analysis.py") | {TYPOLOGY},
    }
    sections = {section: (getattr(config, section) or {}, valid) for section, valid in allowed.items()}
    if "imp" in config.methods:  # run_imp.py's rounds are fine-tunes with the finetune flags
        sections["finetune (used by imp)"] = (config.finetune, allowed["finetune"] & allowed["imp"])
    sections |= {f"bases.{name}": (settings, allowed["ssl_pretrain"]) for name, settings in config.bases.items() if "mixture" in settings}  # overrides ssl_pretrain flags
    for section, (settings, valid) in sections.items():
        unknown = sorted(set(settings) - valid)
        if unknown:
            raise UsageError(f"grid config section {section!r} has unknown flag(s) {unknown}: expected options of its script (see --help)")


def aggregate(config, steps) -> Path:
    """Every transfer result in one table (with its interval), and the report; with several bases,
    each base's own report and the comparison of the bases above them."""
    from utils.bases import write_comparison  # matplotlib and scipy: only once there is a report to write
    from utils.analysis import analysis_markdown
    from utils.report import RESULT_COLUMNS, result_rows, write_csv_atomic, write_report

    upstreams = config.upstream + (["base"] if config.transfer_base and config.prune_base else [])
    per_base, table = {}, []
    for name, folder, prefix in sub_studies(config):
        results = collect(config, steps, prefix)
        every_method = [r for rows in results.method_rows.values() for r in rows] if results.method_rows else results.rows
        csv_rows = result_rows(every_method)  # each with its bootstrap interval: computed once
        write_csv_atomic(folder / "results.csv", csv_rows, RESULT_COLUMNS)
        title = f"Study: {config.name}" + (f", base {name}" if name else "")
        sections = [analysis_markdown(results, upstreams, config.downstream, folder / "figures", config.analysis.get(TYPOLOGY, True))] if config.analysis is not None else []
        report = write_report(folder, results, upstreams, config.downstream, title, config.note, sections)
        per_base[name] = results
        table += [row | {"base": name} for row in csv_rows]
    if not config.bases:
        return report
    write_csv_atomic(Path(config.output_dir) / "results.csv", table, ["base"] + RESULT_COLUMNS)
    path, _ = write_comparison(config.output_dir, per_base, config.sparsities, config.upstream, config.downstream, config.dominant, config.bases,
                               f"Study: {config.name}: pretraining bases compared", config.note)
    return path


def dry_run_footprint(config, steps) -> list[str]:
    """The study's disk footprint per step kind, from its models' configs (one line if one cannot be read)."""
    from utils.footprint import footprint_lines, model_size, study_footprint

    try:
        return footprint_lines(study_footprint(config, steps, model_size), config.keep_checkpoints)
    except (OSError, ValueError) as err:  # a Hub model's config out of reach (offline), say
        return [f"# disk footprint: unknown here, the model's config cannot be read ({type(err).__name__}: {str(err).splitlines()[0]})"]


def print_status(rows: list[dict]) -> None:
    width = max(len(r["step"]) for r in rows)
    slurm = any(r["scheduler"] for r in rows)
    print(f"{'step':<{width}}  {'state':<11} {'elapsed':>9}  {'job':<10} " + (f"{'slurm':<24} " if slurm else "") + "log")
    for r in rows:
        elapsed = f"{r['elapsed_s']:.0f} s" if r["elapsed_s"] is not None else ""
        print(f"{r['step']:<{width}}  {r['state']:<11} {elapsed:>9}  {r['job_id']:<10} " + (f"{r['scheduler']:<24} " if slurm else "") + r["log"]
              + (f"  ({r['reason']})" if r["reason"] else ""))
    states = ("done", "running", "queued", "requeued", "interrupted", "failed", "blocked", "stale", "pending")
    print(", ".join(f"{n} {state}" for state in states if (n := sum(r["state"] == state for r in rows))))


def live_jobs(config, steps, scheduler: dict) -> dict[str, str]:
    """Step id -> job id of the steps (the report among them) whose Slurm job is still queued or running."""
    live = {}
    for step in steps:
        record = read_record(step_record_path(config.output_dir, step))
        if record and record.executor == "slurm" and record.job_id in scheduler and scheduler[record.job_id][0] in LIVE_STATES:
            live[step.id] = record.job_id
    return live


def build_parser() -> argparse.ArgumentParser:
    """The command line; ``--help`` starts with this file's docstring and its examples."""
    parser = argparse.ArgumentParser(prog="run_grid.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="study config (YAML or JSON), e.g. configs/paper.yaml")
    parser.add_argument("--executor", default="local", choices=EXECUTORS, help="local: this machine; slurm: submit every step to Slurm")
    parser.add_argument("--slots", type=int, default=1, help="local: steps run at the same time (CPU threads are shared between them)")
    parser.add_argument("--dry_run", action="store_true", help="print the stale steps and the commands still to run, in dependency order, and stop")
    parser.add_argument("--rerun_stale", action="store_true", help="move the outputs of stale steps aside (to <output_dir>/stale/) and run them again")
    parser.add_argument("--status", action="store_true", help="print every step's state from its record (and, on Slurm, its job's), start nothing")
    parser.add_argument("--cancel", action="store_true", help="cancel every queued or running Slurm job of this study (and no other job)")
    parser.add_argument("--report_only", action="store_true", help="write REPORT.md and results.csv from the finished steps (the last Slurm job)")
    parser.add_argument("--output_dir", help="the study's folder instead of the config's output_dir (e.g. --report_only on a published "
                        "study: python run_grid.py --config configs/bias.yaml --output_dir docs/bias-study/study --report_only)")
    parser.add_argument("--publish", metavar="DIR", help="copy the files the report is computed from (results, test predictions, IoU) "
                        "into DIR and write the report there: a folder anyone can re-render with --output_dir DIR --report_only")
    return parser


def main():
    # 1. The study: read and validate the whole config before any work starts.
    args = build_parser().parse_args()
    if args.slots < 1:
        raise UsageError(f"--slots {args.slots}: expected a positive number of steps at a time")
    config = load_config(args.config)
    if args.output_dir:
        config.output_dir = args.output_dir
    steps = plan(config)
    if args.status:  # records only: answers without torch, even for a config whose flags would be refused
        print_status(step_status(config, steps, slurm_jobs()))
        return
    check_flags(config)  # the training scripts' flags come from transformers' TrainingArguments, which imports torch
    if args.cancel:
        scheduler = slurm_jobs()
        if scheduler is None:
            raise UsageError("--cancel needs Slurm's squeue and scancel, which do not answer on this machine")
        live = live_jobs(config, steps + [report_step(args.config, config)], scheduler)
        cancel_slurm(list(live.values()))
        print(f"cancelled {len(live)} job(s) of study {config.name}" + (f": {', '.join(f'{k} ({v})' for k, v in live.items())}" if live else " (none was queued or running)"))
        return
    if not args.dry_run:  # one runner per study: a second one is refused, a killed one's lock taken over
        lock_folder(config.output_dir, "the study's output_dir")
    if args.publish:
        count = publish(config, steps, args.publish)
        config.output_dir = args.publish
        print(f"published {count} file(s); report: {aggregate(config, plan(config))}")
        return
    if args.report_only:
        print(f"report: {aggregate(config, steps)}")
        return

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
        print("\n".join(dry_run_footprint(config, steps)))
        print(f"# {len(todo)} of {len(steps)} steps to run ({len(stale)} of them stale)")
        return
    if stale and not args.rerun_stale:
        changed = [step for step in stale if not states[step.id].reason.startswith("needs ")]
        names = "; ".join(f"{step.id} ({states[step.id].reason})" for step in changed[:5]) + ("; ..." if len(changed) > 5 else "")
        downstream = f" and {len(stale) - len(changed)} step(s) that depend on them" if len(stale) > len(changed) else ""
        raise UsageError(f"{len(stale)} finished step(s) are stale: {names}{downstream}. "
                         "Re-run with --rerun_stale (their outputs are moved aside, not deleted), or restore the config")
    # Refused before any work: Slurm without sbatch, a local step this machine cannot hold.
    executor = slurm_executor(Path(config.output_dir) / "submitit") if args.executor == "slurm" else None
    jobs = [job_spec(config, step, max(1, (os.cpu_count() or 1) // args.slots)) for step in todo]
    if executor is None:
        gpus = local_gpu_count()
        check_local(jobs, gpus)
    if args.rerun_stale:
        if not stale:
            print("--rerun_stale: no step is stale; running the unfinished steps as usual", flush=True)
        else:
            moved = move_aside(config, stale, time.strftime("%Y%m%d-%H%M%S"))
            print(f"--rerun_stale: moved the outputs of {len(stale)} stale step(s) to {moved}", flush=True)

    # 3a. Slurm: submit every unfinished step at once, each after the steps it needs, then the report.
    print(f"study {config.name}: {len(steps)} steps, {len(steps) - len(todo)} already done -> {config.output_dir}", flush=True)
    if executor is not None:
        scheduler = slurm_jobs() or {}
        queued = live_jobs(config, todo, scheduler)  # from an earlier submission, still queued or running: not submitted twice
        job_ids: dict[str, str] = {}
        for step, spec in zip(todo, jobs):
            after = [job_ids[n] for n in step.needs if n in job_ids]
            if step.id in queued:
                job_ids[step.id] = queued[step.id]
                print(f"  {step.id}: job {queued[step.id]} already {scheduler[queued[step.id]][0].lower()}", flush=True)
                continue
            job_ids[step.id] = submit_slurm(executor, spec, config.slurm, after)
            print(f"  {step.id}: job {job_ids[step.id]}" + (f" after {', '.join(after)}" if after else ""), flush=True)
        report = report_step(args.config, config)
        cancel_slurm(list(live_jobs(config, [report], scheduler).values()))  # an earlier report job would not wait for the new steps
        report_job = submit_slurm(executor, job_spec(config, report), config.slurm, list(job_ids.values()), dependency="afterany")
        submitted = len(job_ids) - len(queued)
        print(f"submitted {submitted} step(s)" + (f" ({len(queued)} already queued)" if queued else "") + f" and the report (job {report_job}, after them "
              f"whatever their outcome); follow with: python run_grid.py --config {args.config} --status")
        return

    # 3b. Here: run what is not done yet, --slots at a time, each as soon as what it needs is done.
    started, index = time.time(), {step.id: i for i, step in enumerate(steps, 1)}

    def progress(event: str, job, detail) -> None:
        prefix = f"[{index[job.id]:>3}/{len(steps)}] {job.id}"
        if event == "started":
            print(f"{prefix} started", flush=True)
        elif event == "done":
            extra = ""
            if job.record_base.kind == "transfer":
                extra = f", test CER {100 * TransferResult.read(job.done).test_cer:.1f}%"
            print(f"{prefix} done in {detail.seconds or 0:.1f} s{extra}", flush=True)
        elif event == "failed":
            print(f"{prefix} FAILED (exit {detail.returncode}; see {job.log})", flush=True)
        else:
            print(f"{prefix} not run: it needs {detail}, which failed", flush=True)

    for step in steps:
        if step.done.exists():
            print(f"[{index[step.id]:>3}/{len(steps)}] {step.id}: done already", flush=True)
    failed, blocked = run_local(jobs, Path(config.output_dir) / "submitit", args.slots, gpus, progress)
    ran = len(todo) - len(blocked)

    # 4. Aggregate: every transfer result in one table (with its interval), and the report (which names what is missing, and why).
    report = aggregate(config, steps)
    if failed:
        lines = [f"  {job_id}: exit {record.returncode}, log {record.log or step_log_path(config.output_dir, next(s for s in steps if s.id == job_id))}" for job_id, record in failed.items()]
        raise StepFailed(f"{len(failed)} step(s) failed and {len(blocked)} step(s) that need them did not run; the others finished and the report "
                         f"of what did is {report} (re-run the same command to retry only these):\n" + "\n".join(lines))
    print(f"ran {ran} step(s), skipped {len(steps) - len(todo)}, in {time.time() - started:.0f} s")
    print(f"report: {report}")


if __name__ == "__main__":
    try:
        run_cli(main)
    except StepFailed as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
