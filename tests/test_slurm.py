"""The grid on a real single-node Slurm (``tests/slurm_cluster.py``): a failed step fails its job
and Slurm cancels the jobs that need it before they start, while the independent branch and the
report still run; a fixed re-run submits only what failed or never ran; a transfer stopped ahead
of its time limit (SIGUSR1) and then requeued (SIGTERM) resumes twice and ends as an
uninterrupted run; ``--cancel`` cancels the study's jobs and no other; ``--status`` shows the
scheduler's view beside the records."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import ROOT, study_config, write_study
from utils.executors import LIVE_STATES

FAILED_FT = "seed-0/finetune/de"
BLOCKED = ("seed-0/prune/de/sparsity-0.80", "seed-0/transfer/de-ca/sparsity-0.80", "seed-0/iou/sparsity-0.80")
INDEPENDENT = ("seed-0/base-model", "seed-0/finetune/en", "seed-0/prune/en/sparsity-0.80", "seed-0/transfer/en-ca/sparsity-0.80")
TRANSFER = "seed-0/transfer/de-ca/sparsity-0.80"


def slurm_study(tmp_path: Path, data: Path) -> Path:
    """Two upstream languages (de's data missing at first), one downstream, one seed; transfers of
    3 epochs x 12 steps, long enough to be stopped inside an epoch."""
    kinds = ("init", "finetune", "prune", "transfer", "iou", "report")
    return write_study(tmp_path, upstream=["en", "de"], seeds=[0], prune_base=False, data={"data_dir": str(data / "{language}")},
                       transfer=study_config(tmp_path)["transfer"] | {"train_epochs": 2, "max_train_samples": 96},
                       resources={kind: {"cpus": 1, "mem_gb": 1, "time_min": 30} for kind in kinds})


def run_grid(config: Path, env: dict, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "run_grid.py"), "--config", str(config), *flags], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def queue(env: dict) -> dict[str, str]:
    """Job id -> state of every job Slurm knows."""
    out = subprocess.run(["squeue", "--noheader", "--states=all", "--format=%i|%T"], env=env, capture_output=True, text=True, check=True).stdout
    return dict(line.strip().split("|") for line in out.splitlines() if line.strip())


def job(job_id: str, env: dict) -> dict[str, str]:
    """``scontrol show job``'s fields (kept for MinJobAge after the job ended)."""
    out = subprocess.run(["scontrol", "--oneliner", "show", "job", job_id], env=env, capture_output=True, text=True, check=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_for(condition, timeout: float, what: str, poll: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"not within {timeout:.0f} s: {what}")


def drained(job_ids, env: dict, timeout: float) -> float:
    """Wait until none of ``job_ids`` is queued or running; returns the seconds waited."""
    start = time.time()
    wait_for(lambda: not [j for j, state in queue(env).items() if j in job_ids and state in LIVE_STATES], timeout, f"jobs {sorted(job_ids)} ended")
    return time.time() - start


def submitted(result: subprocess.CompletedProcess) -> tuple[dict[str, str], str]:
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(re.findall(r"^  (\S+): job (\d+)", result.stdout, re.M)), re.search(r"and the report \(job (\d+)", result.stdout).group(1)


def record(study: Path, step: str) -> dict:
    return json.loads((study / "steps" / (step.replace("/", "__") + ".json")).read_text())


@pytest.fixture(scope="module")
def failed_study(slurm, corpus_dir, tmp_path_factory):
    """A study submitted with German's training data missing, waited for until its queue drained."""
    tmp_path = tmp_path_factory.mktemp("slurm")
    data = tmp_path / "data"
    data.mkdir()
    for code in ("en", "ca"):
        (data / code).symlink_to(corpus_dir / code)
    config = slurm_study(tmp_path, data)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **slurm)
    job_of, report = submitted(run_grid(config, env, "--executor", "slurm"))
    waited = drained(set(job_of.values()) | {report}, env, timeout=420)
    jobs = {step: job(job_id, env) for step, job_id in job_of.items()} | {"report": job(report, env)}
    status = run_grid(config, env, "--status")
    return SimpleNamespace(config=config, study=tmp_path / "study", data=data, env=env, job_of=job_of, jobs=jobs, waited=waited, status=status)


def test_a_failed_step_cancels_exactly_its_dependents_and_the_report_says_why(failed_study):
    s = failed_study
    print(f"queue drained {s.waited:.0f} s after submission")
    failed = s.jobs[FAILED_FT]
    assert failed["JobState"] == "FAILED" and failed["ExitCode"] != "0:0", failed  # Slurm saw the failure
    assert record(s.study, FAILED_FT)["status"] == "failed" and record(s.study, FAILED_FT)["returncode"] == 2
    for step in BLOCKED:  # cancelled by Slurm before they started: no log, no output
        assert (s.jobs[step]["JobState"], s.jobs[step]["Reason"]) == ("CANCELLED", "DependencyNeverSatisfied"), (step, s.jobs[step])
        assert not (s.study / "logs" / (step.replace("/", "__") + ".log")).exists(), step
    for step in INDEPENDENT:
        assert s.jobs[step]["JobState"] == "COMPLETED" and record(s.study, step)["status"] == "done", step
    assert s.jobs["report"]["JobState"] == "COMPLETED"  # afterany: it ran although steps failed
    report = (s.study / "REPORT.md").read_text()
    assert "## Missing results" in report
    assert re.search(rf"`{FAILED_FT}`: failed \(exit 2; log logs/seed-0__finetune__de\.log\)", report)
    for step in BLOCKED[1:]:  # the results the report shows (a ticket is not one of them)
        assert f"`{step}`: not run: it depends on {FAILED_FT}, which failed" in report
    # --status: the failed step, the steps it blocked (naming it), and Slurm's state of each job.
    assert s.status.returncode == 0, s.status.stderr[-2000:]
    rows = {line.split()[0]: line for line in s.status.stdout.splitlines()[1:-1]}
    assert re.search(rf"\sfailed\s.*{s.job_of[FAILED_FT]}\s+FAILED \(NonZeroExitCode\)", rows[FAILED_FT]), rows[FAILED_FT]
    for step in BLOCKED:
        assert re.search(r"\sblocked\s.*CANCELLED \(DependencyNeverSatisfied\).*\(" + re.escape(FAILED_FT) + r" failed\)$", rows[step]), rows[step]
    assert s.status.stdout.strip().splitlines()[-1] == "4 done, 1 failed, 3 blocked"


def test_a_fixed_rerun_submits_only_what_did_not_run_and_a_requeued_transfer_ends_as_uninterrupted(failed_study, corpus_dir):
    s = failed_study
    (s.data / "de").symlink_to(corpus_dir / "en")
    job_of, report = submitted(run_grid(s.config, s.env, "--executor", "slurm"))
    assert sorted(job_of) == sorted([FAILED_FT, *BLOCKED])  # only the failed and the blocked steps
    out, job_id = s.study / "seed-0" / "transfer" / "de-ca" / "sparsity-0.80", job_of[TRANSFER]
    log = s.study / "logs" / (TRANSFER.replace("/", "__") + ".log")

    def checkpoints() -> list[int]:
        return sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if (p / "trainer_state.json").is_file())

    # 1. The time limit nears (Slurm's --signal=USR1@120, sent by hand): once the first epoch's checkpoint is written, the
    #    step stops at its next step with a checkpoint, and the job requeues itself.
    wait_for(lambda: checkpoints() and queue(s.env).get(job_id) == "RUNNING", 300, "the transfer's first checkpoint")
    subprocess.run(["scancel", "--signal=USR1", job_id], env=s.env, check=True)
    wait_for(lambda: record(s.study, TRANSFER)["status"] == "requeued", 60, "the transfer requeued after SIGUSR1")
    stopped_at = max(checkpoints())
    # 2. Started again, it resumes; once it has written a later checkpoint, the job is requeued (SIGTERM) in its next epoch.
    wait_for(lambda: [c for c in checkpoints() if c > stopped_at] and record(s.study, TRANSFER)["status"] == "running", 180, "a checkpoint after the restart")
    subprocess.run(["scontrol", "requeue", job_id], env=s.env, check=True)
    drained(set(job_of.values()) | {report}, s.env, timeout=420)
    text = log.read_text()
    assert text.count(f"--- job {job_id} started again") == 2 and text.count("interrupted: SIGUSR1 received") == 1, text[-3000:]
    assert text.count("interrupted: SIGTERM received") == 1 and text.count("resuming inside epoch") == 2, text[-3000:]
    assert job(job_id, s.env)["Restarts"] == "2" and record(s.study, TRANSFER)["status"] == "done"
    for step in job_of:
        assert record(s.study, step)["status"] == "done", step
    assert "## Missing results" not in (s.study / "REPORT.md").read_text()
    # The uninterrupted reference: the first submission's en -> ca transfer of the same ticket (German's folder holds the
    # English data, so both fine-tunes, both tickets and both transfer settings but the name agree). Same final weights.
    seed = s.study / "seed-0"
    assert (seed / "finetune" / "de" / "model.safetensors").read_bytes() == (seed / "finetune" / "en" / "model.safetensors").read_bytes()
    ours, theirs = (json.loads((seed / "transfer" / f"{up}-ca" / "sparsity-0.80" / "results.json").read_text()) for up in ("de", "en"))
    assert ours["ticket_mask_sha256"] == theirs["ticket_mask_sha256"] and ours["steps"] == theirs["steps"] == 36
    assert ours["final_weights_sha256"] == theirs["final_weights_sha256"] and ours["eval_loss"] == theirs["eval_loss"] and ours["test_cer"] == theirs["test_cer"]
    assert (out / "predictions_test.jsonl").read_bytes() == (seed / "transfer" / "en-ca" / "sparsity-0.80" / "predictions_test.jsonl").read_bytes()


def test_cancel_cancels_the_study_and_no_other_job(slurm, corpus_dir, tmp_path, monkeypatch):
    from utils.executors import slurm_jobs
    from utils.grid import load_config, plan, step_status

    env = dict(os.environ, HF_HUB_OFFLINE="1", **slurm)
    monkeypatch.setenv("SLURM_CONF", slurm["SLURM_CONF"])  # step_status in this process, as --status would call it
    other = subprocess.run(["sbatch", "--parsable", f"--cpus-per-task={os.cpu_count()}", "--wrap", "sleep 120"], env=env, cwd=tmp_path,
                           capture_output=True, text=True, check=True).stdout.strip()
    try:
        wait_for(lambda: queue(env).get(other) == "RUNNING", 60, "the unrelated job running")
        config = slurm_study(tmp_path, corpus_dir)
        job_of, report = submitted(run_grid(config, env, "--executor", "slurm"))
        study = load_config(str(config))
        # Slurm's view beside the records: the first step waits for the machine, the others for the steps they need.
        wait_for(lambda: [queue(env).get(j) for j in job_of.values()] == ["PENDING"] * len(job_of), 60, "every job of the study pending")
        rows = {r["step"]: r for r in step_status(study, plan(study), slurm_jobs())}
        assert (rows["seed-0/base-model"]["state"], rows["seed-0/base-model"]["scheduler"]) == ("queued", "PENDING (Resources)")
        assert {r["scheduler"] for step, r in rows.items() if step != "seed-0/base-model"} == {"PENDING (Dependency)"}
        cancel = run_grid(config, env, "--cancel")
        assert cancel.returncode == 0 and cancel.stdout.startswith(f"cancelled {len(job_of) + 1} job(s) of study test study"), cancel.stdout + cancel.stderr
        live = {j for j, state in queue(env).items() if state in LIVE_STATES}
        assert not live & (set(job_of.values()) | {report}) and other in live
        rows = step_status(study, plan(study), slurm_jobs())
        assert [(r["state"], r["scheduler"].split()[0], r["reason"]) for r in rows] == [("pending", "CANCELLED", f"job {r['job_id']} ended CANCELLED") for r in rows]
    finally:
        subprocess.run(["scancel", other], env=env)
