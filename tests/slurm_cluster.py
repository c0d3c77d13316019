"""A real single-node Slurm for the tests: Debian's ``slurmctld``, ``slurmd`` and ``munge``,
configured in a folder of its own (``SLURM_CONF`` points there, on ports of its own, so a Slurm the
machine already runs is left alone) and started once per test run as root.

    python -m tests.slurm_cluster start   # start it by hand; prints the SLURM_CONF to export
    python -m tests.slurm_cluster stop

The configuration is the one in ``../shared/NOTES.md`` (Slurm 22.05, as Debian 12 ships it) with
the folders moved under ``FOLDER`` and the node sized to this machine.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

FOLDER = Path(os.environ.get("LOTTERY_TEST_SLURM", f"/tmp/lottery-tickets-slurm-{os.getuid()}"))
PORTS = (16817, 16818)  # slurmctld, slurmd: not the defaults, so a machine's own Slurm keeps them
DAEMONS = ("slurmctld", "slurmd")
STARTED_HERE = "started-by-start"  # marks a cluster start() started (and stop_if_started may stop)


class Unavailable(Exception):
    """Slurm cannot be started here (not root, packages missing, a daemon that will not start)."""


def conf_text(folder: Path) -> str:
    host = socket.gethostname().split(".")[0]
    memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    return "\n".join([
        "ClusterName=lottery-tests",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={PORTS[0]}",
        f"SlurmdPort={PORTS[1]}",
        "AuthType=auth/munge",
        "AuthInfo=cred_expire=5",  # a requeued job waits for its old credential to expire: 5 s, not 120
        "MpiDefault=none",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "ReturnToService=2",
        "SlurmUser=root",
        f"SlurmdSpoolDir={folder}/slurmd",
        f"StateSaveLocation={folder}/slurmctld",
        f"SlurmctldPidFile={folder}/slurmctld.pid",
        f"SlurmdPidFile={folder}/slurmd.pid",
        f"SlurmctldLogFile={folder}/slurmctld.log",
        f"SlurmdLogFile={folder}/slurmd.log",
        "SchedulerType=sched/backfill",
        "SchedulerParameters=sched_interval=2,bf_interval=1",  # a test cluster schedules at once, not every 30-60 s
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "JobCompType=jobcomp/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "KillWait=10",  # seconds between SIGTERM and SIGKILL when a job is cancelled or requeued
        f"NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count() or 1} RealMemory={memory_mb} State=UNKNOWN",
        f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP",
        "",
    ])


def environment(folder: Path = FOLDER) -> dict[str, str]:
    """What a client (sbatch, squeue, run_grid.py) needs to talk to this cluster."""
    return {"SLURM_CONF": str(folder / "slurm.conf")}


def _answers(folder: Path) -> bool:
    """The controller answers and the node takes jobs."""
    env = dict(os.environ, **environment(folder))
    try:
        out = subprocess.run(["sinfo", "--noheader", "--format=%T"], env=env, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and out.stdout.strip().rstrip("*") in ("idle", "mixed", "allocated")


@contextmanager
def _locked(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # pytest-xdist workers: one of them starts it
        yield


def start(folder: Path = FOLDER, timeout: float = 60) -> dict[str, str]:
    """Start the cluster unless it already answers; returns the client environment. Raises
    ``Unavailable`` with the reason when it cannot be started here."""
    if os.getuid() != 0:
        raise Unavailable("starting slurmd needs root")
    missing = [tool for tool in ("munged", "slurmctld", "slurmd", "sbatch") if shutil.which(tool, path="/usr/sbin:/usr/bin:" + os.environ["PATH"]) is None]
    if missing:
        raise Unavailable(f"{', '.join(missing)} not installed (Debian: apt-get install slurmctld slurmd slurm-client munge)")
    with _locked(folder):
        conf = folder / "slurm.conf"
        if conf.is_file() and conf.read_text() == conf_text(folder) and _answers(folder):
            return environment(folder)
        stop(folder)  # not running, or running an older configuration
        for sub in ("slurmd", "slurmctld"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        conf.write_text(conf_text(folder))
        if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0:
            Path("/run/munge").mkdir(parents=True, exist_ok=True)
            shutil.chown("/run/munge", "munge", "munge")
            subprocess.run(["su", "-s", "/bin/sh", "munge", "-c", "/usr/sbin/munged"], check=False, capture_output=True)
        for daemon in DAEMONS:
            out = subprocess.run([f"/usr/sbin/{daemon}", "-f", str(conf)], capture_output=True, text=True)
            if out.returncode != 0:
                raise Unavailable(f"{daemon} did not start: {(out.stderr or out.stdout).strip()[-300:]} (log: {folder}/{daemon}.log)")
        (folder / STARTED_HERE).touch()
        deadline = time.time() + timeout
        while time.time() < deadline:
            if _answers(folder):
                return environment(folder)
            time.sleep(0.3)
        raise Unavailable(f"the node did not become idle within {timeout:.0f} s (logs: {folder}/slurmctld.log, {folder}/slurmd.log)")


def stop(folder: Path = FOLDER) -> None:
    """Stop this cluster's daemons (munged is left running: other users of munge may need it)."""
    for daemon in DAEMONS:
        pid_file = folder / f"{daemon}.pid"
        try:
            pid = int(pid_file.read_text().strip())
            os.kill(pid, signal.SIGTERM)
        except (OSError, ValueError):
            continue
        for _ in range(50):
            try:
                os.kill(pid, 0)
            except OSError:
                break
            time.sleep(0.1)


def stop_if_started(folder: Path = FOLDER) -> None:
    """Stop the cluster if ``start`` started it (a cluster that already ran is left running)."""
    marker = folder / STARTED_HERE
    if marker.is_file():
        stop(folder)
        marker.unlink(missing_ok=True)


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else "start"
    if command == "stop":
        stop()
    else:
        try:
            print(f"export SLURM_CONF={start()['SLURM_CONF']}")
            (FOLDER / STARTED_HERE).unlink(missing_ok=True)  # started by hand: a test run leaves it running
        except Unavailable as err:
            sys.exit(f"error: {err}")
