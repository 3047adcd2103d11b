"""A real single-node Slurm cluster (munged + slurmctld + slurmd from Debian) in a temp directory.

Everything the daemons write (key, sockets, state, spool, logs, pid files) lives under one
directory, and clients find it through SLURM_CONF, so nothing under /etc is touched and the
cluster disappears with the directory. Jobs inherit SLURM_CONF from the submitting process.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tests.cluster.env import clean_launch_env
from tests.cluster.poll import wait_steady, wait_until

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "scancel", "srun")
CLUSTER_CPUS = 2


class ClusterError(RuntimeError):
    pass


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def _binary(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    if Path("/usr/sbin", name).exists():
        return str(Path("/usr/sbin", name))
    raise ClusterError(f"{name} not found (apt-get install slurm-wlm munge)")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


SLURM_CONF_TEMPLATE = """\
ClusterName=rmttest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.%n.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
KillWait=30
MinJobAge=3600
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""


@dataclass
class SlurmCluster:
    """Start with `start()`, stop with `stop()`; `env` is what clients (and so jobs) need."""

    root: Path
    host: str = field(default_factory=socket.gethostname)
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        return clean_launch_env(SLURM_CONF=str(self.conf))

    def start(self, timeout_s: float = 60) -> "SlurmCluster":
        self.root.mkdir(parents=True, exist_ok=True)
        for sub in ("state", "spool", "munge"):
            (self.root / sub).mkdir(exist_ok=True)
        self._start_munge()
        ctld_port, slurmd_port = _free_ports(2)
        self.conf.write_text(SLURM_CONF_TEMPLATE.format(
            host=self.host, ctld_port=ctld_port, slurmd_port=slurmd_port, root=self.root,
            munge_socket=self.munge_socket, cpus=CLUSTER_CPUS))
        env = self.env
        self._spawn([_binary("slurmctld"), "-D", "-i", "-f", str(self.conf)], "slurmctld.out", env)
        wait_until(lambda: self._scontrol_ok(), timeout_s, "slurmctld to answer", self.root / "slurmctld.log")
        self._spawn([_binary("slurmd"), "-D", "-N", self.host, "-f", str(self.conf)], "slurmd.out", env)
        wait_until(lambda: self.node_state() in ("IDLE", "MIXED", "ALLOCATED"), timeout_s,
                  "the node to become IDLE", self.root / f"slurmd.{self.host}.log")
        return self

    @property
    def munge_socket(self) -> Path:
        return self.root / "munge" / "munge.socket"

    def _start_munge(self) -> None:
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        (self.root / "munge").chmod(0o700)
        self._spawn([_binary("munged"), "--foreground", "--force", f"--key-file={key}",
                     f"--socket={self.munge_socket}", f"--pid-file={self.root}/munge/munged.pid",
                     f"--log-file={self.root}/munge/munged.log", f"--seed-file={self.root}/munge/munged.seed"],
                    "munged.out", clean_launch_env())
        wait_until(self.munge_socket.exists, 30, "munged's socket", self.root / "munged.out")

    def _spawn(self, cmd: list[str], out_name: str, env: dict) -> None:
        out = open(self.root / out_name, "ab")
        # Own session: stopping the cluster signals the daemons, never the test runner.
        self.procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                           start_new_session=True))
        out.close()

    def _scontrol_ok(self) -> bool:
        return self.run(["scontrol", "ping"], check=False).returncode == 0

    def node_state(self) -> str:
        out = self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False).stdout.strip()
        return out.split()[0].rstrip("*").upper() if out else ""

    def run(self, cmd: list[str], check: bool = True, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
        result = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout, **kw)
        if check and result.returncode != 0:
            raise ClusterError(f"{' '.join(cmd)} -> exit {result.returncode}\n{result.stdout}\n{result.stderr}")
        return result

    # Job helpers -------------------------------------------------------------------------------

    def sbatch(self, args: list[str], cwd: Path, wait: bool = False) -> tuple[int, subprocess.Popen]:
        """Submit; returns the job id at once and the sbatch process (with `wait`, it exits with the
        job's exit code when the job is finally done, across requeues)."""
        proc = subprocess.Popen(["sbatch", "--parsable", *(["--wait"] if wait else []), *args], cwd=cwd,
                                env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first_line = proc.stdout.readline()
        match = re.match(r"(\d+)", first_line.strip())
        if match is None:
            proc.wait(timeout=30)
            raise ClusterError(f"sbatch printed no job id: {first_line}{proc.stdout.read()}\n{proc.stderr.read()}")
        return int(match.group(1)), proc

    def release_requeued(self, job_id: int, settle_s: float = 5.0) -> None:
        """Slurm holds a requeued batch job ~2 minutes before it may start again; tests skip the wait.

        The node must have been IDLE for `settle_s` first: Slurm 22.05 starts a requeued job the
        moment its node frees up, and its srun then fails with "Requested nodes are busy" while
        the previous run's step is still being cleaned up (seen here as a FAILED 1:0 job)."""
        wait_steady(lambda: self.node_state() == "IDLE", settle_s, 120, "the node to be IDLE and settled")
        self.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])

    def job_field(self, job_id: int, name: str) -> str:
        out = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False).stdout
        match = re.search(rf"\b{name}=(\S*)", out)
        return match.group(1) if match else ""

    def wait_job_state(self, job_id: int, states: tuple[str, ...], timeout_s: float) -> str:
        seen = {"state": ""}

        def reached() -> bool:
            seen["state"] = self.job_field(job_id, "JobState")
            return seen["state"] in states

        wait_until(reached, timeout_s, f"job {job_id} to reach {states} (last {seen['state']!r})")
        return seen["state"]

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()
