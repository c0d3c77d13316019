"""Where a study's steps run, through submitit: on this machine (its local executor, ``--slots N``
steps at a time, each GPU step pinned to its own GPUs) or on a Slurm cluster (its Slurm executor:
the whole grid submitted at once, each step depending ``afterok`` on the steps it needs, so the
runner may exit). Either way a step is one job that runs the step's command and writes its log and
its record, exactly as a sequential run does.

On Slurm a job ends with its step's outcome: a failed command fails the job, and Slurm cancels the
jobs that need it (``--kill-on-invalid-dep=yes``) before they start; the report job runs
``afterany``, whatever happened. Jobs are ``--requeue``-able and get SIGUSR1 ``SIGNAL_AHEAD_S``
seconds before their time limit: the training script saves a checkpoint and stops
(``utils.preemption``) and the job requeues itself; on SIGTERM (preemption, ``scontrol requeue``,
``scancel``) the script does the same and Slurm decides whether the job runs again. Either way the
step's command resumes from its checkpoint when the job starts again.

Resources come per step kind from the study config::

    resources:
      finetune: {gpus: 4, cpus: 16, mem_gb: 64, time_min: 600}
      transfer: {gpus: 1, cpus: 8, mem_gb: 32, time_min: 120}
    slurm: {partition: gpu, account: myproject, qos: normal, constraint: a100, additional: {mail-type: FAIL}}

``gpus`` are per node; a training step with several GPUs (or ``nodes`` > 1) runs under
``accelerate launch`` on them. This module imports no ML library: a job starts in a fraction of a
second and its own command does the heavy imports.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Optional

from .errors import EXIT_INTERRUPTED, UsageError
from .records import StepRecord

ROOT = Path(__file__).resolve().parents[1]
EXECUTORS = ("local", "slurm")
STEP_KINDS = ("corpus", "init", "pretrain", "finetune", "prune", "imp", "parp", "transfer", "iou", "analysis", "report")
TRAINING_KINDS = ("pretrain", "finetune", "imp", "parp", "transfer")
SLURM_KEYS = ("partition", "account", "qos", "constraint", "additional")
SIGNAL_AHEAD_S = 120  # SIGUSR1 this long before a Slurm job's time limit: time to finish a step and save
RELAYED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# squeue states of a job that has not ended (it may still run, or run again)
LIVE_STATES = frozenset({"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING",
                         "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD"})


@dataclass(frozen=True)
class Resources:
    """What one step of a kind gets. ``gpus`` per node; ``cpus`` per node (None: on this machine a
    fair share of the cores, ``cores // slots``; on Slurm 1)."""

    gpus: int = 0
    cpus: Optional[int] = None
    mem_gb: float = 16.0
    time_min: int = 120
    nodes: int = 1


def parse_resources(raw: Any) -> dict[str, Resources]:
    """``resources:`` of a study config, validated: one clear error naming the bad value."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UsageError(f"grid config resources {raw!r}: expected a mapping of step kinds ({', '.join(STEP_KINDS)}) to resources")
    out = {}
    for kind, values in raw.items():
        if kind not in STEP_KINDS:
            raise UsageError(f"grid config resources.{kind}: unknown step kind, expected one of {', '.join(STEP_KINDS)}")
        if not isinstance(values, dict):
            raise UsageError(f"grid config resources.{kind} {values!r}: expected a mapping such as {{gpus: 1, cpus: 8, mem_gb: 32, time_min: 120}}")
        known = {f.name for f in fields(Resources)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UsageError(f"grid config resources.{kind} has unknown key(s) {unknown}: expected some of {sorted(known)}")
        for key, value in values.items():
            whole = isinstance(value, int) and not isinstance(value, bool)
            if key == "gpus" and not (whole and value >= 0):
                raise UsageError(f"grid config resources.{kind}.gpus {value!r}: expected a non-negative integer")
            if key in ("cpus", "nodes", "time_min") and not (whole and value >= 1):
                raise UsageError(f"grid config resources.{kind}.{key} {value!r}: expected a positive integer")
            if key == "mem_gb" and not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
                raise UsageError(f"grid config resources.{kind}.mem_gb {value!r}: expected a positive number of GB")
        if (values.get("gpus", 0) > 1 or values.get("nodes", 1) > 1) and kind not in TRAINING_KINDS:
            raise UsageError(f"grid config resources.{kind}: several GPUs or nodes only help training steps ({', '.join(TRAINING_KINDS)})")
        out[kind] = Resources(**values)
    return out


def parse_slurm(raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UsageError(f"grid config slurm {raw!r}: expected a mapping with some of {', '.join(SLURM_KEYS)}")
    unknown = sorted(set(raw) - set(SLURM_KEYS))
    if unknown:
        raise UsageError(f"grid config slurm has unknown key(s) {unknown}: expected some of {list(SLURM_KEYS)}")
    if not isinstance(raw.get("additional", {}), dict):
        raise UsageError(f"grid config slurm.additional {raw['additional']!r}: expected a mapping of sbatch options")
    return dict(raw)


def launch_command(launcher: str, resources: Resources) -> list[str]:
    """The command prefix of a training step: ``python``, or ``accelerate launch`` over all the
    step's GPUs and nodes (machine rank and main address are added on each node at run time)."""
    if launcher == "python":
        if resources.gpus > 1 or resources.nodes > 1:
            raise UsageError(f"{resources.gpus} GPU(s) on {resources.nodes} node(s) need launcher: accelerate launch, not python")
        return [sys.executable]
    launch = shlex.split(launcher)
    processes = max(1, resources.gpus) * resources.nodes
    if launch[:2] == ["accelerate", "launch"] and processes > 1:
        launch += ["--num_processes", str(processes), "--num_machines", str(resources.nodes), "--multi_gpu"]
    return launch


def node_command(argv: list[str], launch_len: int, environment) -> list[str]:
    """The command one node of a multi-node Slurm job runs: the step's ``accelerate launch``
    command with this node's rank (``SLURM_NODEID``), the first host of ``SLURM_JOB_NODELIST`` as
    the main process address, and a port derived from the job id, read from submitit's job
    environment."""
    port = 29500 + int(str(environment.job_id).split("_")[0]) % 10000
    node = ["--machine_rank", str(environment.node), "--main_process_ip", environment.hostnames[0], "--main_process_port", str(port)]
    return [*argv[:launch_len], *node, *argv[launch_len:]]


@dataclass(frozen=True)
class JobSpec:
    """Everything a job needs, as plain data (it is pickled into the job)."""

    id: str
    argv: list[str]
    launch_len: int  # argv[:launch_len] is the launcher; node options go after it
    done: str
    record: str
    log: str
    record_base: StepRecord  # what the plan knows of the step; the job's reports are added to it
    needs: tuple[str, ...] = ()
    resources: Resources = Resources()
    threads: Optional[int] = None

    @property
    def multinode(self) -> bool:
        return self.resources.nodes > 1


def read_record(path: str | Path) -> Optional[StepRecord]:
    """A step's record, or None when the step never ran."""
    return StepRecord.read(path) if Path(path).is_file() else None


def _record(spec: JobSpec, **values) -> StepRecord:
    """Update a step's record (the runner writes it first; the job then adds to it)."""
    record = replace(read_record(spec.record) or spec.record_base, **values)
    record.write(spec.record)
    return record


def _job_id() -> Optional[str]:
    try:
        import submitit

        return str(submitit.JobEnvironment().job_id)
    except Exception:  # not inside a submitit job: run directly
        return None


class JobFailed(RuntimeError):
    """Raised at the end of a job whose step did not finish, so its scheduler sees the failure."""


def run_job(spec: JobSpec) -> Optional[StepRecord]:
    """Run one step (inside a submitit job, or directly): its command with output to its log, its
    record updated to running, then done, failed, or interrupted (stopped by SIGTERM or SIGUSR1,
    which are relayed to the command). A step that did not finish raises ``JobFailed``, so the job
    exits non-zero. On Slurm, SIGUSR1 (the time limit is near) requeues the job once the command
    has saved and stopped; a requeued job appends to its log and resumes. In a multi-node job every
    node runs the command with its own rank; node 0 keeps the record."""
    argv = list(spec.argv)
    rank0 = True
    job_id = _job_id()
    if spec.multinode:
        import submitit

        environment = submitit.JobEnvironment()
        argv = node_command(argv, spec.launch_len, environment)
        rank0 = environment.global_rank == 0
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if spec.threads:
        env |= {name: str(spec.threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    started = time.time()
    if rank0:
        _record(spec, status="running", started=started, finished=None, seconds=None, returncode=None, host=socket.gethostname(),
                pid=os.getpid(), job_id=job_id, command=shlex.join(argv))
    Path(spec.log).parent.mkdir(parents=True, exist_ok=True)
    with open(spec.log, "a" if restarts or not rank0 else "w", encoding="utf-8") as f:
        if restarts and rank0:
            f.write(f"\n--- job {job_id} started again (restart {restarts}): the command resumes from its last checkpoint ---\n")
            f.flush()
        returncode, received = _run_relaying_signals(argv, env, f)
    finished = time.time()
    done = returncode == 0 and Path(spec.done).exists()
    status = "done" if done else "interrupted" if received or returncode == EXIT_INTERRUPTED else "failed"
    if not done and signal.SIGUSR1 in received and signal.SIGTERM not in received and job_id and os.environ.get("SLURM_JOB_ID"):
        requeue = subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]], capture_output=True, text=True)
        status = "requeued" if requeue.returncode == 0 else "failed"
    if rank0:
        _record(spec, status=status, finished=finished, seconds=round(finished - started, 1), returncode=returncode, log=spec.log)
    if not done:
        raise JobFailed(f"step {spec.id}: {status} (exit {returncode}); log: {spec.log}")
    return read_record(spec.record) if rank0 else None


def _run_relaying_signals(argv: list[str], env: dict, log) -> tuple[int, list[int]]:
    """Run ``argv`` to its end, passing on SIGTERM and SIGUSR1 (a scheduler may signal only the job's
    first process); returns its exit code and the signals received. Under Slurm every process of
    the job gets them anyway; a step's training processes then all stop at the same step."""
    received: list[int] = []
    # The command starts with SIGUSR1 ignored (an ignored signal stays ignored across exec): a launcher
    # such as accelerate launch would die of it, while the training scripts catch it once they train.
    default = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    finally:
        signal.signal(signal.SIGUSR1, default)

    def relay(signum, frame):
        received.append(signum)
        if proc.poll() is None:
            proc.send_signal(signum)

    previous = {s: signal.signal(s, relay) for s in RELAYED_SIGNALS}
    try:
        return proc.wait(), received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# ---------------------------------------------------------------------------------------------
# Local: N jobs at a time, GPUs handed out per job


def local_gpu_count() -> int:
    """GPUs this machine has (``CUDA_VISIBLE_DEVICES`` respected), without importing torch."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "--list-gpus"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def check_local(jobs: list[JobSpec], gpus: int) -> None:
    """Every job must fit this machine: its GPUs, and one node."""
    for job in jobs:
        if job.resources.gpus > gpus or job.multinode:
            raise UsageError(f"step {job.id} asks for {job.resources.gpus} GPU(s) on {job.resources.nodes} node(s) but this machine has "
                             f"{gpus} GPU(s): lower its resources, or use --executor slurm")


def run_local(jobs: list[JobSpec], folder: Path, slots: int, gpus: int, on_event=print) -> tuple[dict[str, dict], dict[str, str]]:
    """Run ``jobs`` (in dependency order) on this machine, at most ``slots`` at a time, each as soon
    as the jobs it needs have finished. A failed job stops only the jobs that depend on it.
    Returns the records of the failed jobs and, for each job not run, the failure that blocked it.
    ``on_event(kind, job, detail)`` is told of every start, end and block. Check the jobs with
    ``check_local`` first."""
    ids = {job.id for job in jobs}
    pool = LocalPool(folder, slots, gpus)
    pending, finished, failed, blocked = list(jobs), set(), {}, {}
    by_id = {job.id: job for job in jobs}
    while pending or pool.running:
        for job_id in pool.finished():
            record = read_record(by_id[job_id].record) or by_id[job_id].record_base
            if record.status == "done":
                finished.add(job_id)
                on_event("done", by_id[job_id], record)
            else:
                failed[job_id] = replace(record, status="failed")
                on_event("failed", by_id[job_id], failed[job_id])
        waiting = []
        for job in pending:
            cause = next((n for n in job.needs if n in failed or n in blocked), None)
            if cause:
                blocked[job.id] = blocked.get(cause, cause)
                on_event("blocked", job, blocked[job.id])
            elif all(n not in ids or n in finished for n in job.needs) and pool.can_start(job):
                replace(job.record_base, status="queued", queued=time.time(), executor="local").write(job.record)
                pool.start(job)
                on_event("started", job, None)
            else:
                waiting.append(job)
        pending = waiting
        if pending or pool.running:
            time.sleep(0.1)
    return failed, blocked


class LocalPool:
    """Runs jobs through submitit's local executor: at most ``slots`` at once, their threads within
    the machine's cores (a job asking for all of them runs alone), each pinned to its own GPUs
    (``CUDA_VISIBLE_DEVICES``; none for CPU jobs)."""

    def __init__(self, folder: Path, slots: int, gpus: int, cores: Optional[int] = None):
        import submitit

        self.executor = submitit.LocalExecutor(folder=str(folder))
        self.slots = slots
        self.cores = cores or os.cpu_count() or 1
        self.free_gpus = list(range(gpus))
        self.running: dict[str, tuple[Any, list[int], int]] = {}

    def _cores_of(self, spec: JobSpec) -> int:
        return min(spec.threads or 1, self.cores)

    def can_start(self, spec: JobSpec) -> bool:
        busy = sum(cores for _, _, cores in self.running.values())
        return len(self.running) < self.slots and spec.resources.gpus <= len(self.free_gpus) and busy + self._cores_of(spec) <= self.cores

    def start(self, spec: JobSpec) -> str:
        n = spec.resources.gpus
        gpus, self.free_gpus = self.free_gpus[:n], self.free_gpus[n:]
        self.executor.update_parameters(timeout_min=spec.resources.time_min, gpus_per_node=len(gpus), visible_gpus=tuple(gpus))
        job = self.executor.submit(run_job, spec)
        self.running[spec.id] = (job, gpus, self._cores_of(spec))
        return str(job.job_id)

    def finished(self) -> list[str]:
        """Ids of the jobs that ended since the last call; their GPUs and cores are free again."""
        ended = [job_id for job_id, (job, _, _) in self.running.items() if job.done()]
        for job_id in ended:
            self.free_gpus += self.running.pop(job_id)[1]
        self.free_gpus.sort()
        return ended


# ---------------------------------------------------------------------------------------------
# Slurm: every job submitted at once, dependencies as afterok


def slurm_executor(folder: Path):
    if shutil.which("sbatch") is None:
        raise UsageError("--executor slurm needs Slurm's sbatch, which is not on this machine's PATH: use --executor local, or --dry_run for the commands")
    import submitit

    return submitit.SlurmExecutor(folder=str(folder / "%j"))


def submit_slurm(executor, spec: JobSpec, slurm: dict[str, Any], after: list[str], dependency: str = "afterok") -> str:
    """Submit one step as an sbatch job: its resources, the cluster settings, ``dependency`` (afterok:
    run once they succeeded; afterany: once they ended) on the job ids of the steps it needs that
    are queued or running, cancelled by Slurm when that can never hold; its record says queued."""
    resources = spec.resources
    parameters: dict[str, Any] = {
        "job_name": spec.id.replace("/", "_"),
        "nodes": resources.nodes,
        "ntasks_per_node": 1,  # one task per node: accelerate launch starts the GPU processes
        "cpus_per_task": resources.cpus or 1,
        "mem": f"{resources.mem_gb:g}GB",
        "time": resources.time_min,
        # every key on every call: the executor keeps parameters between submissions
        "gpus_per_node": resources.gpus or None,
        "dependency": f"{dependency}:" + ":".join(after) if after else None,
        "additional_parameters": {"signal": f"USR1@{SIGNAL_AHEAD_S}", "requeue": True, "kill-on-invalid-dep": "yes", **slurm.get("additional", {})},
    }
    for key in ("partition", "account", "qos", "constraint"):
        parameters[key] = slurm.get(key) or None
    executor.update_parameters(**parameters)
    job_id = str(executor.submit(run_job, spec).job_id)
    record = read_record(spec.record)
    if record is None or record.job_id != job_id or record.status not in ("running", "done", "failed", "interrupted", "requeued"):  # unless the job already began
        replace(spec.record_base, status="queued", job_id=job_id, executor="slurm", queued=time.time()).write(spec.record)
    return job_id


def slurm_jobs() -> Optional[dict[str, tuple[str, str]]]:
    """This user's jobs that Slurm still knows (running, queued, or recently ended): job id ->
    (state, reason), e.g. ``("PENDING", "Dependency")``; None where squeue is missing or fails."""
    if shutil.which("squeue") is None:
        return None
    try:
        out = subprocess.run(["squeue", "--me", "--noheader", "--states=all", "--format=%i|%T|%r"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    jobs = {}
    for line in out.stdout.splitlines():
        job_id, _, rest = line.strip().partition("|")
        state, _, reason = rest.partition("|")
        jobs[job_id] = (state, reason if reason not in ("None", "") else "")
    return jobs


def cancel_slurm(job_ids: list[str]) -> None:
    """``scancel`` these jobs (a running training step saves a checkpoint first: SIGTERM)."""
    if job_ids:
        subprocess.run(["scancel", *job_ids], check=True, capture_output=True, text=True, timeout=120)
