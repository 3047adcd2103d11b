"""Issue 22 acceptance 4: `sbatch launch/pretrain.sh` requeued after losing a node resumes on the
node left.

On the two-node cluster of tests/test_reliability_two_nodes.py (nodes of 2 CPUs here): the users'
command with a node RANGE, `sbatch --nodes=1-2 --gpus-per-node=0 launch/pretrain.sh ...`. The
script's header sets no task count and asks for whole nodes (--exclusive), so Slurm (22.05) gives
the job both nodes and the launcher lays the step out itself: one task per node (no GPUs), each
with the node's 2 CPUs (no --cpus-per-task given: the whole node, shared between its tasks). Once
it has a checkpoint, node n2 is drained, as after a hardware failure, and the job is requeued
(`scontrol requeue`). The requeued job keeps its id and gets the one node left
(SLURM_JOB_NUM_NODES=1, no SLURM_NTASKS): the launcher starts 1 rank, which resumes from the
2-rank ZeRO-3 checkpoint through DeepSpeed's universal checkpoint.

What Slurm does not do (tried with 22.05): a job with a task count keeps it when requeued.
`--nodes=1-2 --ntasks-per-node=1` makes sbatch fix the task count at 1 (min nodes x per node),
so even the first start gets one node (the same with --spread-job or --exclusive);
`--nodes=1-2 --ntasks=2 --ntasks-per-node=1` gets both nodes, but once requeued it waits for two
("ReqNodeNotAvail"): `scontrol update NumNodes=1` on the pending job is accepted and changes
nothing, and `NumTasks=1` leaves it pending as "BadConstraints". Hence the header's lack of one.
"""
from __future__ import annotations

import pytest

from tests.cluster.poll import wait_steady, wait_until
from tests.cluster.runs import complete_steps, resumed_step, train_log
from tests.test_reliability_helpers import REPO, TINY, train_losses
from tests.test_reliability_two_nodes import FAILED, TwoNodeCluster, started_two_node_cluster

# A step takes ~0.2 s: after the first checkpoint the first instance must still be running when
# the node is lost (about 7 s of steps left), and the requeued one finishes in seconds.
STEPS = 40
# The recipe's global batch stays 8 samples on either world size (accumulation 1 on 2 ranks,
# 2 on 1 rank), which a resume on another world size requires.
ARGS = [*TINY, f"run.max_steps={STEPS}", "batch.global_batch_size=8", "checkpoint.every=5",
        "checkpoint.keep_last=100", "distributed.timeout_s=60", "run.export=true"]
# What a user of a CPU cluster adds to the header: no GPUs, a time limit. No task count.
NODE_RANGE = ["--nodes=1-2", "--gpus-per-node=0", "--time=15"]
NODE_CPUS = 2


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from started_two_node_cluster(tmp_path_factory, cpus=NODE_CPUS)


def test_job_requeued_after_losing_a_node_resumes_on_the_node_left(cluster: TwoNodeCluster,
                                                                    tmp_path):
    cluster.wait_settled(seconds=3)
    run_dir, out = tmp_path / "elastic" / "run", tmp_path / "job.out"
    submit = cluster.client(["sbatch", "--parsable", *NODE_RANGE, f"--output={out}",
                             "launch/pretrain.sh", f"run.runs_dir={run_dir.parent}",
                             f"run.name={run_dir.name}", *ARGS], cwd=REPO)
    assert submit.returncode == 0, submit.stderr
    job = int(submit.stdout.strip().split(";")[0])
    log = lambda: out.read_text(errors="replace") if out.exists() else ""  # noqa: E731
    try:
        wait_until(lambda: complete_steps(run_dir)
                   or cluster.job_field(job, "JobState") in FAILED + ("COMPLETED",), 300,
                   "the first checkpoint of the two-node job", out)
        assert cluster.job_field(job, "JobState") == "RUNNING", log()[-4000:]
        assert (f"Slurm job {job} (restart 0): 2 tasks on 2 node(s) [n[1-2]], 0 GPU(s) on this "
                f"node, {NODE_CPUS} CPU(s) per task") in log(), log()[-4000:]
        assert cluster.job_field(job, "NumCPUs") == str(2 * NODE_CPUS)  # whole nodes: --exclusive
        assert "on 2 rank(s) (slurm)" in train_log(run_dir)

        # Node n2 leaves service; the job is requeued and its running instance ends.
        drain = cluster.client(["scontrol", "update", "NodeName=n2", "State=DRAIN",
                                "Reason=lost in test"])
        assert drain.returncode == 0, drain.stderr
        assert cluster.client(["scontrol", "requeue", str(job)]).returncode == 0
        wait_until(lambda: cluster.job_field(job, "Restarts") == "1", 60, "the requeue", out)
        wait_until(lambda: not cluster.client(["squeue", "-h", "-s"]).stdout.strip(), 120,
                   "the first instance's steps to end", out)
        # Started while n1 still cleans up the first instance, the step would find its node
        # busy (Slurm 22.05); a requeued job waits ~2 minutes by itself, StartTime=now skips that.
        wait_steady(lambda: cluster.idle_nodes() == {"n1"}, 3, 120, "n1 IDLE and settled")
        newest = complete_steps(run_dir)[-1]
        assert newest < STEPS, "the first instance finished before the node was lost"
        cluster.client(["scontrol", "update", f"JobId={job}", "StartTime=now"])
        wait_until(lambda: cluster.job_field(job, "JobState") in FAILED + ("COMPLETED",), 400,
                   "the requeued job to finish", out)
    finally:
        cluster.client(["scontrol", "update", "NodeName=n2", "State=RESUME"])

    text = log()
    assert (cluster.job_field(job, "JobState"), cluster.job_field(job, "ExitCode"),
            cluster.job_field(job, "Restarts")) == ("COMPLETED", "0:0", "1"), text[-4000:]
    assert (f"Slurm job {job} (restart 1): 1 tasks on 1 node(s) [n1], 0 GPU(s) on this node, "
            f"{NODE_CPUS} CPU(s) per task") in text, text[-4000:]
    after = train_log(run_dir).split("resumed from")[-1]
    assert resumed_step(run_dir) == [newest]
    assert "written by 2 rank(s) with ZeRO-3, through" in after.splitlines()[0]
    assert (run_dir / "checkpoints" / f"step_{newest:08d}" / "universal" / "COMPLETE").is_file()
    assert "on 1 rank(s) (slurm)" in train_log(run_dir).split("on 2 rank(s) (slurm)")[-1]
    assert complete_steps(run_dir)[-1] == STEPS
    assert sorted(train_losses(run_dir)) == list(range(1, STEPS + 1))
    for path in ("config.yaml", "train.log", "tokenizer", "export/config.json",
                 "export/model.safetensors"):
        assert (run_dir / path).exists(), f"{path} missing; job log:\n{text[-4000:]}"
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
