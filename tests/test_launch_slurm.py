"""`sbatch launch/pretrain.sh` on a real single-node Slurm cluster (issue 4 acceptance 4, issue 5 item 5).

The script's header asks for 2 nodes x 8 GPUs; the sbatch command line overrides it for this
CPU-only node, as a user would on a CPU cluster. One chain of jobs on one run directory (each job
start costs tens of seconds on 2 cores):
  job 1   `scancel --signal=TERM` mid-run   -> complete checkpoint, exit 0
  job 2   resubmitted with `sbatch --wait` on 1 task instead of 2 (issue 22: elastic resume)
                                             -> resumes from job 1's checkpoint; then the time-limit
          warning (SIGUSR1 to the batch shell) -> checkpoint, the script requeues the job, the
          requeued job resumes again and finishes with every output (job state COMPLETED, 0:0).
  Job 1 is submitted with `sbatch --wait`, which exits 0 once the signalled job has saved.
"""
from __future__ import annotations

import shlex

from tests.cluster.fixtures import slurm_cluster  # noqa: F401  (pytest fixture)
from tests.cluster.poll import wait_until
from tests.cluster.runs import complete_steps, resumed_step, tiny_args, train_log

CPU_NODE = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0", "--time=10"]
# A requeued job keeps its task count (seen with 22.05: `scontrol update NumTasks=1` on the
# pending job changes neither SLURM_NTASKS nor what srun starts), and this job's comes from
# --ntasks-per-node, so it comes back smaller as a resubmission with fewer tasks, which then
# requeues itself like any job. A job with a node range and no task count (the header sets none:
# `sbatch --nodes=1-2 --gpus-per-node=0 launch/pretrain.sh`) does come back smaller when requeued
# after losing a node: tests/test_slurm_requeue_elastic.py (two-node cluster).
ONE_TASK = [*CPU_NODE[:1], "--ntasks-per-node=1", *CPU_NODE[2:]]
JOB_TIMEOUT_S = 300
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
CHECKPOINTS = ["checkpoint.every=3", "checkpoint.keep_last=100"]


def submit(cluster, repo_root, out_dir, args, wait=False, script="launch/pretrain.sh",
           node=CPU_NODE):
    job_id, proc = cluster.sbatch([*node, f"--output={out_dir}/slurm-%j.out", script, *args],
                                  cwd=repo_root, wait=wait)
    return job_id, proc, out_dir / f"slurm-{job_id}.out"


def wait_for_checkpoint_after(cluster, job_id, run_dir, step, log):
    wait_until(lambda: any(s > step for s in complete_steps(run_dir))
               or cluster.job_field(job_id, "JobState") in FINAL_STATES,
               JOB_TIMEOUT_S, f"a checkpoint after step {step}", log)
    assert cluster.job_field(job_id, "JobState") == "RUNNING", log.read_text(errors="replace")[-4000:]


def job_result(cluster, job_id) -> tuple[str, str]:
    return cluster.job_field(job_id, "JobState"), cluster.job_field(job_id, "ExitCode")


def test_sbatch_preemption_resubmission_and_requeue_resume_to_full_outputs(slurm_cluster, repo_root, tmp_path):
    runs, run_dir = tmp_path / "runs", tmp_path / "runs" / "sb"

    # Job 1: a long job, signalled like a preemption once training is under way.
    job1, sbatch_wait1, out1 = submit(slurm_cluster, repo_root, tmp_path,
                                      tiny_args(runs, "sb", 5000, *CHECKPOINTS, "run.export=false"), wait=True)
    wait_for_checkpoint_after(slurm_cluster, job1, run_dir, 0, out1)
    slurm_cluster.run(["scancel", "--signal=TERM", str(job1)])
    assert sbatch_wait1.wait(timeout=JOB_TIMEOUT_S) == 0, out1.read_text(errors="replace")[-4000:]
    slurm_cluster.wait_job_state(job1, FINAL_STATES, JOB_TIMEOUT_S)
    assert job_result(slurm_cluster, job1) == ("COMPLETED", "0:0"), out1.read_text(errors="replace")[-4000:]
    # Two Slurm tasks formed one world through the Slurm rendezvous.
    assert "on 2 rank(s) (slurm)" in train_log(run_dir)
    assert "received SIGTERM" in train_log(run_dir)
    first_stop = complete_steps(run_dir)[-1]
    assert 3 <= first_stop < 5000
    assert f"stopped on signal, checkpoint saved at step {first_stop}" in train_log(run_dir)

    # Job 2: the same run resubmitted on fewer tasks (1 instead of 2: issue 22, the allocation
    # came back smaller); it must resume from job 1's checkpoint, not start over, through the
    # universal checkpoint, with the recipe's global batch (accumulation 2 instead of 1).
    final_step = first_stop + 15  # room for the signal to land mid-run, few periodic saves after it
    job2, sbatch_wait, out2 = submit(slurm_cluster, repo_root, tmp_path,
                                     tiny_args(runs, "sb", final_step, *CHECKPOINTS), wait=True,
                                     node=ONE_TASK)
    wait_for_checkpoint_after(slurm_cluster, job2, run_dir, first_stop, out2)
    assert resumed_step(run_dir) == [first_stop]
    assert "on 1 rank(s) (slurm)" in train_log(run_dir)
    assert "written by 2 rank(s) with ZeRO-3, through" in train_log(run_dir)
    assert (run_dir / "checkpoints" / f"step_{first_stop:08d}" / "universal" / "COMPLETE").is_file()
    # Time-limit warning, as `--signal=B:USR1@180` delivers it: to the batch shell only.
    slurm_cluster.run(["scancel", "--batch", "--signal=USR1", str(job2)])
    wait_until(lambda: slurm_cluster.job_field(job2, "Restarts") == "1", JOB_TIMEOUT_S, "the job to requeue", out2)
    second_stop = max(complete_steps(run_dir))
    assert first_stop < second_stop < final_step
    slurm_cluster.release_requeued(job2)
    # `sbatch --wait` may return at the requeue itself (Slurm reports the interim exit then, and
    # whether it does depends on its polling), so the job's final state is what is asserted.
    sbatch_wait.wait(timeout=JOB_TIMEOUT_S)
    slurm_cluster.wait_job_state(job2, FINAL_STATES, JOB_TIMEOUT_S)

    log2 = out2.read_text(errors="replace")
    assert job_result(slurm_cluster, job2) == ("COMPLETED", "0:0"), log2[-4000:]
    assert "received SIGUSR1" in log2 and f"requeueing job {job2}" in log2
    assert resumed_step(run_dir) == [first_stop, second_stop]
    assert complete_steps(run_dir)[-1] == final_step
    for path in ("config.yaml", "train.log", "tokenizer", "export/config.json", "export/model.safetensors"):
        assert (run_dir / path).exists(), f"{path} missing; job log:\n{log2[-4000:]}"
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    # The launcher said where everything goes before training started.
    assert f"run directory : {run_dir}" in log2 and "tensorboard --logdir" in log2


def deepspeed_job_script(path, repo_root, args) -> str:
    """The documented way to use DeepSpeed's launcher in an allocation (README, "Slurm")."""
    from tests.test_launch_deepspeed import deepspeed_command

    path.write_text("#!/bin/bash\nset -euo pipefail\n"
                    f"cd {repo_root}\n"
                    f"{' '.join(deepspeed_command())} $(bash launch/deepspeed_slurm_args.sh) "
                    f"launch/pretrain.sh {shlex.join(args)}\n")
    return str(path)


def test_deepspeed_launcher_in_an_sbatch_job_trains_across_two_tasks_and_stops_on_sigterm(
        slurm_cluster, repo_root, tmp_path):
    """DeepSpeed's Slurm back-end starts the ranks as 2 tasks of one srun step; they meet through
    the Slurm environment. A preemption (`scancel --signal=TERM`) reaches every task: each saves
    at the next step boundary and the job completes with exit 0."""
    runs, run_dir = tmp_path / "runs", tmp_path / "runs" / "dsjob"
    script = deepspeed_job_script(tmp_path / "job.sh", repo_root,
                                  tiny_args(runs, "dsjob", 5000, *CHECKPOINTS, "run.export=false"))
    job, proc, out = submit(slurm_cluster, repo_root, tmp_path, [], wait=True, script=script)
    wait_for_checkpoint_after(slurm_cluster, job, run_dir, 0, out)
    slurm_cluster.run(["scancel", "--signal=TERM", str(job)])
    assert proc.wait(timeout=JOB_TIMEOUT_S) == 0, out.read_text(errors="replace")[-4000:]
    slurm_cluster.wait_job_state(job, FINAL_STATES, JOB_TIMEOUT_S)
    log = out.read_text(errors="replace")
    assert job_result(slurm_cluster, job) == ("COMPLETED", "0:0"), log[-4000:]
    assert "cmd = srun -n 2" in log, log[-4000:]
    assert "on 2 rank(s) (slurm)" in train_log(run_dir)
    stopped_at = complete_steps(run_dir)[-1]
    assert 3 <= stopped_at < 5000
    assert f"stopped on signal, checkpoint saved at step {stopped_at}" in train_log(run_dir)


def test_srun_of_the_launcher_runs_one_rank_per_task(slurm_cluster, repo_root, tmp_path):
    """`srun launch/pretrain.sh` inside an allocation: each task is a rank (rank mode)."""
    runs, run_dir = tmp_path / "runs", tmp_path / "runs" / "srun"
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\nset -euo pipefail\n"
                      f"cd {repo_root}\n"
                      f"srun bash launch/pretrain.sh {shlex.join(tiny_args(runs, 'srun', 2, 'run.export=false'))}\n")
    job, proc, out = submit(slurm_cluster, repo_root, tmp_path, [], wait=True, script=str(script))
    assert proc.wait(timeout=JOB_TIMEOUT_S) == 0, out.read_text(errors="replace")[-4000:]
    assert job_result(slurm_cluster, job) == ("COMPLETED", "0:0"), out.read_text(errors="replace")[-4000:]
    assert "on 2 rank(s) (slurm)" in train_log(run_dir)
    assert complete_steps(run_dir) == [2]
