"""Pretraining on the real local Slurm cluster: multi-node DDP, preemption, requeue, exact resume.

Needs the cluster from scripts/local_slurm.sh (scripts/test.sh starts it). Runs are tiny
(64 px, atto) so that the signals land mid-epoch within a few minutes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fcmae.checkpoint import CheckpointManager, safe_load
from jobs.status import run_status

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
RUN = ["--cluster", "slurm", "--model", "convnextv2_atto", "--data", "sample", "--input_size", "64",
       "--epochs", "8", "--warmup_epochs", "1", "--batch_size", "3", "--data_repeat", "8", "--lr", "1e-3",
       "--num_workers", "1", "--cpus_per_task", "1", "--log_every", "1", "--save_every_minutes", "0",
       "--signal_delay_s", "30", "--timeout_min", "30", "--seed", "3"]
STEPS_PER_EPOCH = 9 * 8 // 6          # 9 sample photos x data_repeat / global batch
TOTAL_STEPS = 8 * STEPS_PER_EPOCH
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster():
    if not os.environ.get("SLURM_CONF"):
        pytest.fail('SLURM_CONF is not set; start the local cluster: eval "$(scripts/local_slurm.sh start)"')
    result = subprocess.run(["sinfo", "--noheader"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"the local Slurm cluster does not answer: {result.stderr}"


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(ROOT / "run_with_submitit.py"), *args], capture_output=True,
                            text=True, timeout=600, cwd=ROOT)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def submit(output_dir: Path, *extra: str) -> str:
    cli("pretrain", "--output_dir", str(output_dir), *RUN, *extra)
    return json.loads((output_dir / "submissions.jsonl").read_text().splitlines()[-1])["job_id"]


def status(output_dir: Path) -> dict:
    """The fields of `run_with_submitit.py status --format json`, read in-process for fast polling."""
    return run_status(output_dir)


def wait_until(predicate, timeout: float, what: str, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def progress_step(output_dir: Path) -> int:
    try:
        return json.loads((output_dir / "progress.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return -1


def wait_for_step(output_dir: Path, step: int, timeout: float = 240) -> int:
    return wait_until(lambda: progress_step(output_dir) >= step and progress_step(output_dir), timeout,
                      f"step {step} in {output_dir}")


def wait_final(output_dir: Path, timeout: float = 420) -> dict:
    return wait_until(lambda: (s := status(output_dir))["state"] in FINAL and s, timeout,
                      f"a final state of {output_dir}", poll=2)


def final_weights(output_dir: Path) -> dict:
    return safe_load(CheckpointManager(output_dir).last_path)["model"]


def assert_bitwise_equal(expected: dict, actual: dict) -> None:
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory):
    """The uninterrupted 2-node x 1-task run and the 1-node x 2-task run of the same config."""
    base = tmp_path_factory.mktemp("reference")
    two_nodes, one_node = base / "two_nodes", base / "one_node"
    submit(two_nodes, "--nodes", "2", "--tasks_per_node", "1")
    submit(one_node, "--nodes", "1", "--tasks_per_node", "2")
    for folder in (two_nodes, one_node):
        assert wait_final(folder)["state"] == "COMPLETED", (folder / "logs" / "rank0.log").read_text()
    return two_nodes, one_node


def test_two_nodes_match_one_node_two_tasks(reference_runs):
    two_nodes, one_node = reference_runs
    assert (two_nodes / "logs" / "rank1.log").exists()
    assert status(two_nodes)["step"] == TOTAL_STEPS
    assert_bitwise_equal(final_weights(one_node), final_weights(two_nodes))


def test_preemption_and_user_signal_resume_exactly(reference_runs, tmp_path):
    output_dir = tmp_path / "interrupted"
    job_id = submit(output_dir, "--nodes", "2", "--tasks_per_node", "1")

    # Interruption 1: a manual preemption through the user signal, early in epoch 1.
    wait_for_step(output_dir, 3)
    assert status(output_dir)["state"] == "RUNNING"
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=60)
    wait_until(lambda: status(output_dir)["requeues"] >= 1, 120, "the first requeue")

    # Interruption 2: a real preemption, a high-priority job that needs both nodes, in epoch 3 or 4.
    wait_for_step(output_dir, 2 * STEPS_PER_EPOCH + 5)
    high = subprocess.run(["sbatch", "--parsable", "--partition", "high", "--nodes", "2", "--exclusive",
                           "--output", str(tmp_path / "high.out"), "--wrap", "sleep 3"],
                          capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    wait_until(lambda: status(output_dir)["requeues"] >= 2, 180, "the requeue after preemption")

    final = wait_final(output_dir)
    assert final["state"] == "COMPLETED"
    assert final["requeues"] == 2
    assert [e["cause"] for e in final["interruptions"]] == ["preemption", "preemption"]
    assert final["step"] == TOTAL_STEPS
    # Where the real preemption lands depends on slurmctld's scheduling pass, so either signal may
    # stop the job on an epoch boundary. The exact-resume check needs one of them mid-epoch.
    steps = [e["step"] for e in final["interruptions"]]
    assert 0 < steps[0] < steps[1] < TOTAL_STEPS, steps
    assert any(step % STEPS_PER_EPOCH for step in steps), f"both interruptions at epoch boundaries: {steps}"

    log = (output_dir / "logs" / "rank0.log").read_text()
    assert log.count("resumed from") == 2 and log.count("interrupted by SIGUSR2") == 2
    assert_bitwise_equal(final_weights(reference_runs[0]), final_weights(output_dir))
    subprocess.run(["scancel", high], timeout=60)

    printed = json.loads(cli("status", str(output_dir), "--format", "json").stdout)
    assert {k: printed[k] for k in ("job_id", "state", "requeues", "epoch", "step", "total_steps")} == \
        {"job_id": job_id, "state": "COMPLETED", "requeues": 2, "epoch": 8, "step": TOTAL_STEPS,
         "total_steps": TOTAL_STEPS}
    table = cli("status", str(output_dir)).stdout
    assert "COMPLETED" in table and f"{TOTAL_STEPS}/{TOTAL_STEPS}" in table


def test_sigkill_resumes_from_periodic_checkpoint(tmp_path):
    output_dir = tmp_path / "killed"
    job_id = submit(output_dir, "--save_every_steps", "4")
    wait_for_step(output_dir, 10)
    subprocess.run(["scancel", "--signal=KILL", job_id], check=True, timeout=60)
    killed = wait_final(output_dir)
    assert killed["state"] in {"FAILED", "CANCELLED"}

    # The same command again: the new job waits for the killed one to release the run folder.
    submit(output_dir, "--save_every_steps", "4")
    final = wait_final(output_dir)
    assert final["state"] == "COMPLETED"
    assert final["step"] == 2 * TOTAL_STEPS            # one rank: half the global batch, twice the steps
    assert len(final["job_ids"]) == 2

    log = (output_dir / "logs" / "rank0.log").read_text()
    match = re.search(r"resumed from \S+last\.pt at step (\d+)/", log)
    assert match, log[-2000:]
    assert int(match.group(1)) >= 8 and int(match.group(1)) % 4 == 0


def test_requeue_budget_stops_the_job(tmp_path):
    output_dir = tmp_path / "budget"
    job_id = submit(output_dir, "--max_requeues", "0")
    wait_for_step(output_dir, 3)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=60)

    final = wait_final(output_dir)
    assert final["state"] == "FAILED"
    assert final["requeues"] == 0
    assert len(final["interruptions"]) == 1
    stopped_at = final["interruptions"][0]["step"]
    assert safe_load(CheckpointManager(output_dir).last_path)["step"] == stopped_at
    errors = "".join(p.read_text() for p in (output_dir / "submitit").glob("*/*_0_log.err"))
    assert "more than --max_requeues 0" in errors and "submit the same command again" in errors


def test_dry_run_prints_sbatch_script(tmp_path):
    result = cli("pretrain", "--output_dir", str(tmp_path / "dry"), *RUN, "--nodes", "2", "--partition", "debug",
                 "--account", "root", "--dry_run")
    assert "#SBATCH --nodes=2" in result.stdout
    assert "#SBATCH --signal=USR2@30" in result.stdout
    assert "#SBATCH --partition=debug" in result.stdout
    assert "srun" in result.stdout
    assert not (tmp_path / "dry").exists()


def test_pending_array_task_reads_pending(tmp_path):
    from jobs.status import slurm_state

    # With a limit of one task at a time, task 1 waits while task 0 sleeps.
    submitted = subprocess.run(["sbatch", "--parsable", "--array=0-1%1", "--output", str(tmp_path / "%A_%a.out"),
                                "--wrap", "sleep 60"], capture_output=True, text=True, timeout=60, check=True)
    array_id = submitted.stdout.strip().split(";")[0]
    try:
        state, requeues, _ = slurm_state(f"{array_id}_1")
        assert state == "PENDING"
        assert requeues == 0
    finally:
        subprocess.run(["scancel", array_id], timeout=60)
