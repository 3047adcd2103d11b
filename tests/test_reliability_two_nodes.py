"""Issue 5, promise 7: two Slurm nodes on this one machine.

Each node is a network namespace (`rmtN_n1`, `rmtN_n2`, addresses 10.250.0.1/.2) joined by a
bridge that lives in a third namespace, so nothing touches the host's own network. munged runs
once (its socket is a file, shared by both nodes); slurmctld runs on n1; each node runs its own
`slurmd -N nX`, started with `nsenter --net=...` (`ip netns exec` would remount /sys and hide the
cgroup tree slurmd reads); spool, pid and log files are per node through `%n`. Gloo is told its
interface with GLOO_SOCKET_IFNAME. Jobs are the project's `sbatch launch/pretrain.sh`.
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
from pathlib import Path

import pytest

from tests.cluster.env import clean_launch_env
from tests.cluster.fixtures import require
from tests.cluster.poll import wait_steady, wait_until
from tests.cluster.slurm import SLURM_CONF_TEMPLATE, _binary, missing_binaries
from tests.test_reliability_helpers import REPO, TINY, console, launch_torchrun, train_losses

SUBNET = "10.250.0"
NODES = ("n1", "n2")
IFACE = "eth0"



def two_node_conf(root: Path, cpus: int = 1) -> str:
    """The single-node test cluster's slurm.conf with the controller on n1's address and two
    nodes of `cpus` CPUs each: the one place that knows how these daemons are configured stays
    tests/cluster/slurm.py. slurmctld insists on running on the host it is configured for: the
    real hostname."""
    conf = SLURM_CONF_TEMPLATE.format(host=socket.gethostname(), ctld_port=6817, slurmd_port=6818,
                                      root=root, munge_socket=root / "munge" / "munge.socket",
                                      cpus=cpus)
    kept = [line for line in conf.splitlines()
            if not line.startswith(("SlurmctldHost=", "NodeName=", "PartitionName=", "KillWait=",
                                    "SlurmdTimeout="))]
    # SlurmdTimeout bounds how long a job step waits for a dead node's tasks; JobRequeue lets
    # a job whose node failed be requeued (launch/pretrain.sh asks for --requeue).
    return "\n".join([*kept, f"SlurmctldHost={socket.gethostname()}({SUBNET}.1)", "KillWait=5",
                      "SlurmdTimeout=10", "JobRequeue=1",
                      *(f"NodeName={n} NodeAddr={SUBNET}.{i} CPUs={cpus} State=UNKNOWN"
                        for i, n in enumerate(NODES, start=1)),
                      f"PartitionName=debug Nodes={','.join(NODES)} Default=YES "
                      "MaxTime=INFINITE State=UP OverSubscribe=NO"]) + "\n"


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True)


class TwoNodeCluster:
    def __init__(self, root: Path, cpus: int = 1):
        self.root = root
        self.cpus = cpus
        self.prefix = f"rmt{os.getpid()}"
        self.procs: dict[str, subprocess.Popen] = {}
        self.netns_made: list[str] = []

    def ns(self, node: str) -> str:
        return f"{self.prefix}_{node}"

    def nsenter(self, node: str) -> list[str]:
        return ["nsenter", f"--net=/var/run/netns/{self.ns(node)}"]

    @property
    def env(self) -> dict[str, str]:
        return clean_launch_env(SLURM_CONF=str(self.root / "slurm.conf"),
                                GLOO_SOCKET_IFNAME=IFACE, OMP_NUM_THREADS="1")

    # -- network
    def make_network(self) -> None:
        switch = self.ns("sw")
        for name in (switch, *(self.ns(n) for n in NODES)):
            sh("ip", "netns", "add", name)
            self.netns_made.append(name)
            sh("ip", "-n", name, "link", "set", "lo", "up")
        sh("ip", "-n", switch, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", switch, "link", "set", "br0", "up")
        for i, node in enumerate(NODES, start=1):
            host_end, switch_end = f"{self.prefix[:8]}h{i}", f"{self.prefix[:8]}s{i}"
            sh("ip", "link", "add", host_end, "netns", self.ns(node), "type", "veth",
               "peer", "name", switch_end, "netns", switch)
            sh("ip", "-n", self.ns(node), "link", "set", host_end, "name", IFACE)
            sh("ip", "-n", self.ns(node), "addr", "add", f"{SUBNET}.{i}/24", "dev", IFACE)
            sh("ip", "-n", self.ns(node), "link", "set", IFACE, "up")
            sh("ip", "-n", switch, "link", "set", switch_end, "master", "br0")
            sh("ip", "-n", switch, "link", "set", switch_end, "up")

    # -- daemons
    def spawn(self, key: str, cmd: list[str]) -> None:
        out = open(self.root / f"{key}.out", "ab")
        self.procs[key] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                           env=self.env, start_new_session=True)

    def start_slurmd(self, node: str) -> None:
        self.spawn(f"slurmd_{node}", [*self.nsenter(node), _binary("slurmd"), "-D", "-N", node,
                                      "-f", str(self.root / "slurm.conf")])

    def start(self) -> "TwoNodeCluster":
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> "TwoNodeCluster":
        for sub in ("state", "spool", "munge"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "slurm.conf").write_text(two_node_conf(self.root, self.cpus))
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        (self.root / "munge").chmod(0o700)
        m = self.root / "munge"
        self.spawn("munged", [_binary("munged"), "--foreground", "--force", f"--key-file={key}",
                              f"--socket={m}/munge.socket", f"--pid-file={m}/munged.pid",
                              f"--log-file={m}/munged.log", f"--seed-file={m}/munged.seed"])
        wait_until((m / "munge.socket").exists, 30, "munged's socket")
        self.make_network()
        self.spawn("slurmctld", [*self.nsenter("n1"), _binary("slurmctld"), "-D", "-i", "-f",
                                 str(self.root / "slurm.conf")])
        wait_until(lambda: self.client(["scontrol", "ping"]).returncode == 0, 60,
                   "slurmctld", self.root / "slurmctld.log")
        for node in NODES:
            self.start_slurmd(node)
        wait_until(lambda: self.idle_nodes() == set(NODES), 90, "both nodes IDLE",
                   self.root / "slurmctld.log")
        return self

    def client(self, cmd: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run([*self.nsenter("n1"), *cmd], env=self.env, capture_output=True,
                              text=True, timeout=60, **kw)

    def idle_nodes(self) -> set[str]:
        out = self.client(["sinfo", "-h", "-N", "-o", "%N %T"]).stdout.split("\n")
        return {line.split()[0] for line in out if line.strip() and
                line.split()[1].rstrip("*").upper() == "IDLE"}

    def wait_settled(self, seconds: float, timeout_s: float = 120) -> None:
        """Both nodes IDLE and nothing allocated, continuously for `seconds`."""
        wait_steady(lambda: self.idle_nodes() == set(NODES), seconds, timeout_s,
                    "both nodes IDLE and settled", self.root / "slurmctld.log")

    def job_field(self, job_id: int, name: str) -> str:
        out = self.client(["scontrol", "show", "job", "-o", str(job_id)]).stdout
        for field in out.split():
            if field.startswith(f"{name}="):
                return field.split("=", 1)[1]
        return ""

    def kill_node(self, node: str) -> list[int]:
        """SIGKILL every process in the node's namespace: slurmd, its stepd and the rank."""
        pids = [int(p) for p in subprocess.run(["ip", "netns", "pids", self.ns(node)],
                                               capture_output=True, text=True).stdout.split()]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids

    def stop(self) -> None:
        for node in NODES:
            self.kill_node(node)
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        for name in reversed(self.netns_made):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)



STEPS = 10
# The node loss must fail the job within 120 s: should rank 0 not see the broken connection, the
# training collective timeout (default 900 s, for real clusters) has to end its wait.
JOB_ARGS = [*TINY, f"run.max_steps={STEPS}", "checkpoint.every=2", "checkpoint.keep_last=2",
            "distributed.timeout_s=60"]
TWO_NODES = ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--gpus-per-node=0",
             "--time=15"]
FAILED = ("FAILED", "NODE_FAIL", "CANCELLED", "TIMEOUT")


def can_make_namespaces() -> list[str]:
    probe = subprocess.run(["ip", "netns", "add", f"rmtprobe{os.getpid()}"], capture_output=True)
    subprocess.run(["ip", "netns", "del", f"rmtprobe{os.getpid()}"], capture_output=True)
    return [] if probe.returncode == 0 else ["ip netns (needs root / CAP_SYS_ADMIN)"]


def started_two_node_cluster(tmp_path_factory, cpus: int = 1):
    """A module fixture's body: the cluster (skipped without the software or root), then stopped."""
    require(missing_binaries() + [b for b in ("ip", "nsenter") if shutil.which(b) is None],
            "bash launch/setup.sh --test")
    require(can_make_namespaces(), "run as root")
    c = TwoNodeCluster(tmp_path_factory.mktemp("two_nodes"), cpus).start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from started_two_node_cluster(tmp_path_factory)


@pytest.fixture(scope="module")
def one_node_losses(tmp_path_factory) -> dict[int, float]:
    """The reference curve: the same run on one node (2 ranks under torchrun)."""
    single = tmp_path_factory.mktemp("single") / "run"
    proc = launch_torchrun(single, *JOB_ARGS)
    assert proc.wait(timeout=300) == 0, console(single)[-3000:]
    return train_losses(single)


def complete(run_dir: Path) -> list[int]:
    return sorted(int(d.name[5:]) for d in (run_dir / "checkpoints").glob("step_*")
                  if (d / "COMPLETE").is_file())


def test_zero3_across_two_nodes_matches_one_node_and_survives_a_node_loss(cluster, one_node_losses,
                                                                         tmp_path):
    """One ZeRO-3 job, one rank per node. Once it has a checkpoint, every process of node n2 is
    SIGKILLed (slurmd included): the job must fail fast. The node comes back, the job is requeued
    and resumes from the newest complete checkpoint. The stitched loss curve equals the curve of
    the same run on one node (2 ranks under torchrun) within 1e-4."""
    run_dir = tmp_path / "two" / "run"
    out = tmp_path / "job.out"
    submit = cluster.client(["sbatch", "--parsable", *TWO_NODES, f"--output={out}",
                             "launch/pretrain.sh", f"run.runs_dir={run_dir.parent}",
                             f"run.name={run_dir.name}", *JOB_ARGS], cwd=REPO)
    assert submit.returncode == 0, submit.stderr
    job = int(submit.stdout.strip().split(";")[0])
    log = lambda: out.read_text(errors="replace")[-4000:] if out.exists() else ""  # noqa: E731
    wait_until(lambda: (run_dir / "checkpoints").is_dir() and complete(run_dir)
               or cluster.job_field(job, "JobState") in FAILED + ("COMPLETED",), 300,
               "the first checkpoint of the two-node job", out)
    assert cluster.job_field(job, "JobState") == "RUNNING", log()
    assert "on 2 rank(s) (slurm)" in (run_dir / "train.log").read_text()
    assert complete(run_dir)[-1] < STEPS

    killed_at = time.monotonic()
    assert cluster.kill_node("n2")
    # Rank 0 fails at its next collective (connection reset); srun's step then waits for the
    # dead node's task until slurmctld declares n2 down (SlurmdTimeout) and requeues the job.
    wait_until(lambda: cluster.job_field(job, "Restarts") == "1", 120,
               "the job to be requeued after node n2 died", out)
    failed_after = time.monotonic() - killed_at
    assert failed_after < 120, failed_after
    assert "Exited with exit code 1" in out.read_text(errors="replace")  # rank 0 gave up itself
    newest = complete(run_dir)[-1]
    assert newest < STEPS

    # The requeued job keeps its id. It is held until the old instance is cleaned up everywhere
    # and n2 is back and has stayed IDLE: allocated while the old instance's clean-up is still
    # arriving, slurmctld (22.05) drops n2 from the new allocation and the step waits forever
    # ("Requested nodes are busy").
    assert cluster.client(["scontrol", "hold", str(job)]).returncode == 0
    wait_until(lambda: not cluster.client(["squeue", "-h", "-s"]).stdout.strip(), 120,
               "the failed instance's steps to end", out)
    cluster.start_slurmd("n2")  # ReturnToService=2: back in service when it registers
    cluster.wait_settled(seconds=5)
    assert cluster.client(["scontrol", "release", str(job)]).returncode == 0
    cluster.client(["scontrol", "update", f"JobId={job}", "StartTime=now"])  # no requeue delay
    wait_until(lambda: cluster.job_field(job, "JobState") in FAILED + ("COMPLETED",), 400,
               "the requeued job to finish", out)
    assert cluster.job_field(job, "JobState") == "COMPLETED", log()
    train_log = (run_dir / "train.log").read_text()
    assert f"(step {newest})" in train_log.split("resumed from")[-1].splitlines()[0]
    assert complete(run_dir)[-1] == STEPS

    a, b = one_node_losses, train_losses(run_dir)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    assert max(abs(a[s] - b[s]) for s in a) <= 1e-4, (a, b)


def test_deepspeed_launcher_spans_both_nodes_and_matches_one_node(cluster, one_node_losses,
                                                                  tmp_path):
    """The users' command inside an allocation of both nodes (README, "Slurm"): DeepSpeed's runner
    on n1 starts one rank per node through its Slurm back-end; the curve equals one node's."""
    from tests.test_launch_deepspeed import deepspeed_command

    cluster.wait_settled(seconds=5)
    run_dir = tmp_path / "ds" / "run"
    script = tmp_path / "job.sh"
    args = shlex.join([f"run.runs_dir={run_dir.parent}", f"run.name={run_dir.name}", *JOB_ARGS])
    script.write_text(f"#!/bin/bash\nset -euo pipefail\ncd {REPO}\n"
                      f"export RMT_HOSTFILE={tmp_path / 'hostfile'}\n"
                      f"{' '.join(deepspeed_command())} $(bash launch/deepspeed_slurm_args.sh) "
                      f"launch/pretrain.sh {args}\n")
    out = tmp_path / "job.out"
    submit = cluster.client(["sbatch", "--parsable", *TWO_NODES, f"--output={out}", str(script)],
                            cwd=REPO)
    assert submit.returncode == 0, submit.stderr
    job = int(submit.stdout.strip().split(";")[0])
    wait_until(lambda: cluster.job_field(job, "JobState") in FAILED + ("COMPLETED",), 400,
               "the DeepSpeed-launched two-node job to finish", out)
    log = out.read_text(errors="replace")
    assert cluster.job_field(job, "JobState") == "COMPLETED", log[-4000:]
    assert (tmp_path / "hostfile").read_text().split("\n") == ["n1 slots=1", "n2 slots=1", ""]
    assert "cmd = srun -n 2" in log, log[-4000:]  # DeepSpeed's Slurm back-end
    assert "on 2 rank(s) (slurm)" in (run_dir / "train.log").read_text()
    assert complete(run_dir)[-1] == STEPS
    b = train_losses(run_dir)
    assert sorted(b) == list(range(1, STEPS + 1))
    assert max(abs(one_node_losses[s] - b[s]) for s in b) <= 1e-4, (one_node_losses, b)


if __name__ == "__main__":  # manual bring-up: python -m tests.test_reliability_two_nodes DIR
    c = TwoNodeCluster(Path(sys.argv[1])).start()
    print("up", c.idle_nodes())
    input("enter to stop")
    c.stop()
