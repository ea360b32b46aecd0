"""A real single-node SLURM cluster on this machine, for tests that submit with sbatch.

``SlurmCluster`` writes a slurm.conf under a temporary folder (its own ports, state, spool, logs
and pid files, so it disturbs no other cluster on the machine), starts munged (unless one is
already running), slurmctld and slurmd as plain processes, and waits for the node to be idle.
``stop`` cancels every job and ends each daemon it started by the pid in its pid file, waiting
for each to exit. Client commands find the cluster through ``SLURM_CONF``; inside a job, where
Snakemake's SLURM plugin drops every ``SLURM_*`` variable before it calls srun, through a link at
the default place, /etc/slurm/slurm.conf, made only where no other config is there and removed
at the end.

There is no accounting daemon, so ``sacct`` fails: Snakemake's SLURM plugin must poll with
``squeue``, which sees finished jobs for ``MinJobAge`` seconds (set high here).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
PROGRAMS = ("slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo", "munged")
MUNGE_PID = Path("/run/munge/munged.pid")
DEFAULT_CONF = Path("/etc/slurm/slurm.conf")


class Unavailable(RuntimeError):
    """SLURM cannot run here (no root, no apt-get, or the install failed): a reason to skip."""


def sbin(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin")


def install_packages(packages: tuple[str, ...], programs: tuple[str, ...]) -> None:
    """apt-get install the packages unless every program is already there; as root only."""
    if all(sbin(name) for name in programs):
        return
    if os.geteuid() != 0:
        raise Unavailable(f"{', '.join(packages)} missing and not root to apt-get install them")
    if not shutil.which("apt-get"):
        raise Unavailable(f"{', '.join(packages)} missing and no apt-get to install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    steps = (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
    )
    for step in steps:
        done = subprocess.run(step, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise Unavailable(f"{' '.join(step)} failed: {done.stderr[-2000:]}")
    missing = [name for name in programs if not sbin(name)]
    if missing:
        raise Unavailable(f"installed {', '.join(packages)} but still missing {missing}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def total_memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers signal 0; it has exited all the same.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(") ")[-1][:1] != "Z"


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def stop_pid(pid: int, seconds: float = 20.0) -> None:
    """TERM, wait for the process to exit, KILL if it has not."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return
        time.sleep(0.2)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    while pid_alive(pid):
        time.sleep(0.1)


class SlurmCluster:
    """One node, one partition; see the module docstring."""

    def __init__(self, base: Path, partition: str = "debug"):
        self.base = base
        self.partition = partition
        self.node = socket.gethostname().split(".")[0]
        self.conf = base / "slurm.conf"
        self.pid_files: list[Path] = []
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        """A client command against this cluster, bounded in time (and killed after it)."""
        return subprocess.run(
            ["timeout", "-k", "5", str(int(timeout)), *args],
            env=self.env,
            capture_output=True,
            text=True,
        )

    def write_conf(self) -> None:
        for name in ("state", "spool", "log"):
            (self.base / name).mkdir(parents=True, exist_ok=True)
        cpus = os.cpu_count() or 1
        memory = max(1024, total_memory_mb() - 1024)
        lines = [
            "ClusterName=gradspec-test",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            "MpiDefault=none",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "DefMemPerCPU=1024",
            "SchedulerType=sched/backfill",
            "ReturnToService=2",
            "MinJobAge=3600",
            "KillWait=5",
            "InactiveLimit=0",
            "MailProg=/bin/true",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            f"StateSaveLocation={self.base / 'state'}",
            f"SlurmdSpoolDir={self.base / 'spool'}",
            f"SlurmctldPidFile={self.base / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.base / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.base / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={self.base / 'log' / 'slurmd.log'}",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={cpus} Sockets=1 "
            f"CoresPerSocket={cpus} ThreadsPerCore=1 RealMemory={memory} State=UNKNOWN",
            f"PartitionName={self.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")
        self.link_default_conf()

    def link_default_conf(self) -> None:
        """Point /etc/slurm/slurm.conf here; a stale link (its cluster gone) is replaced."""
        if DEFAULT_CONF.is_symlink() and not DEFAULT_CONF.exists():
            DEFAULT_CONF.unlink()
        if DEFAULT_CONF.exists():
            raise Unavailable(f"{DEFAULT_CONF} belongs to another cluster; not replacing it")
        DEFAULT_CONF.parent.mkdir(parents=True, exist_ok=True)
        DEFAULT_CONF.symlink_to(self.conf)
        self.linked = True

    def unlink_default_conf(self) -> None:
        ours = DEFAULT_CONF.is_symlink() and DEFAULT_CONF.readlink() == self.conf
        if getattr(self, "linked", False) and ours:
            DEFAULT_CONF.unlink()
        self.linked = False

    def start_munge(self) -> None:
        """munged, unless one is running already (then it is not ours to stop)."""
        running = read_pid(MUNGE_PID)
        if running and pid_alive(running):
            return
        MUNGE_PID.parent.mkdir(parents=True, exist_ok=True)
        shutil.chown(MUNGE_PID.parent, "munge", "munge")
        done = subprocess.run(
            ["runuser", "-u", "munge", "--", sbin("munged")],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if done.returncode != 0:
            raise Unavailable(f"munged did not start: {done.stderr}")
        self.wait_for_file(MUNGE_PID)
        self.pid_files.append(MUNGE_PID)

    def start_daemon(self, program: str, *args: str) -> None:
        pid_file = self.base / f"{program}.pid"
        done = subprocess.run(
            [sbin(program), "-f", str(self.conf), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{program} did not start: {done.stderr}\n{self.logs()}")
        self.wait_for_file(pid_file)
        self.pid_files.append(pid_file)

    def wait_for_file(self, path: Path, seconds: float = 30.0) -> None:
        deadline = time.monotonic() + seconds
        while read_pid(path) is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no pid in {path} after {seconds:.0f} s\n{self.logs()}")
            time.sleep(0.1)

    def wait_until_idle(self, seconds: float = 60.0) -> None:
        deadline = time.monotonic() + seconds
        state = ""
        while time.monotonic() < deadline:
            done = self.run("sinfo", "-h", "-o", "%T", timeout=10)
            state = done.stdout.strip()
            if state == "idle":
                return
            time.sleep(0.5)
        raise RuntimeError(f"node not idle after {seconds:.0f} s (state {state!r})\n{self.logs()}")

    def start(self) -> SlurmCluster:
        started = time.perf_counter()
        if os.geteuid() != 0:
            raise Unavailable("the daemons run as root (SlurmUser=root) and this is not root")
        self.write_conf()
        try:
            self.start_munge()
            self.start_daemon("slurmctld", "-i")
            self.start_daemon("slurmd", "-N", self.node)
            self.wait_until_idle()
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.perf_counter() - started
        return self

    def stop(self) -> None:
        """Cancel every job, then end our daemons (slurmd, slurmctld, munged) and wait."""
        if self.conf.exists() and any(path.name == "slurmctld.pid" for path in self.pid_files):
            jobs = self.run("squeue", "-h", "-o", "%i", timeout=15).stdout.split()
            if jobs:
                self.run("scancel", *jobs, timeout=15)
        for pid_file in reversed(self.pid_files):
            pid = read_pid(pid_file)
            if pid is not None:
                stop_pid(pid)
        self.pid_files.clear()
        self.unlink_default_conf()

    def logs(self) -> str:
        texts = []
        for path in sorted((self.base / "log").glob("*.log")):
            texts.append(f"--- {path.name}\n{path.read_text()[-3000:]}")
        return "\n".join(texts)
