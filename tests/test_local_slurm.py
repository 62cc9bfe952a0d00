"""End-to-end checks of the local Slurm cluster from scripts/local_slurm.sh.

CI starts the cluster before pytest runs, so these tests fail (they do not
skip) when SLURM_CONF is unset or the cluster does not respond:

    eval "$(scripts/local_slurm.sh start)"
    pytest -m slurm tests/test_local_slurm.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import submitit

pytestmark = pytest.mark.slurm

START_HINT = 'start it with: eval "$(sudo scripts/local_slurm.sh start)"'

# Slurm job states after which a job never runs again.
FINAL_STATES = {
    "BOOT_FAIL",
    "CANCELLED",
    "COMPLETED",
    "DEADLINE",
    "FAILED",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "TIMEOUT",
}

# Job step that mimics a checkpointing trainer. It writes started-<restart>,
# and on SIGUSR2 writes usr2-<restart>, then either requeues its job with
# `scontrol requeue` (mode "requeue") or just exits 0 (mode "exit"). After a
# requeue, the restarted run (SLURM_RESTART_COUNT >= 1) exits 0 at once.
SIGNAL_HANDLER_SCRIPT = textwrap.dedent(
    """\
    import os
    import signal
    import subprocess
    import sys
    import time

    marker_dir, mode = sys.argv[1], sys.argv[2]
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    job_id = os.environ["SLURM_JOB_ID"]


    def write_marker(name):
        with open(os.path.join(marker_dir, name), "w") as handle:
            handle.write(f"job={job_id} restart={restart}\\n")


    def on_usr2(signum, frame):
        write_marker(f"usr2-{restart}")
        if mode == "requeue":
            subprocess.run(["scontrol", "requeue", job_id], check=True)
        sys.exit(0)


    signal.signal(signal.SIGUSR2, on_usr2)
    write_marker(f"started-{restart}")
    if mode == "requeue" and restart > 0:
        sys.exit(0)
    # Safety limit: a signal that never arrives ends the job as FAILED.
    time.sleep(120)
    sys.exit(1)
    """
)


def run(*command: str, timeout: float = 30) -> str:
    """Run a Slurm client command and return its stdout, raising AssertionError with its output on failure."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} failed with exit status {result.returncode}:\n"
            f"{result.stdout}{result.stderr}"
        )
    return result.stdout


def sbatch(*arguments: str) -> str:
    """Submit a batch job and return its job id."""
    return run("sbatch", "--parsable", *arguments).strip().split(";")[0]


def sacct_states(job_id: str) -> list[str]:
    """Return the states of every run of a job, oldest first (sacct -D lists requeued runs)."""
    output = run("sacct", "-j", job_id, "-X", "-D", "-n", "-P", "-o", "State")
    # A cancelled job reads "CANCELLED by 0"; keep the state word only.
    return [line.split()[0] for line in output.splitlines() if line.strip()]


def wait_for_final_state(job_id: str, timeout: float = 60) -> list[str]:
    """Wait until sacct records a final state for the latest run of a job, and return all states."""
    deadline = time.monotonic() + timeout
    states: list[str] = []
    while time.monotonic() < deadline:
        states = sacct_states(job_id)
        if states and states[-1] in FINAL_STATES:
            return states
        time.sleep(0.5)
    raise AssertionError(
        f"job {job_id} reached no final state within {timeout:.0f}s; sacct states: {states}\n"
        + run("scontrol", "show", "job", job_id, timeout=10)
    )


def wait_for_file(path: Path, job_id: str, timeout: float = 60) -> str:
    """Wait until a job writes a marker file and return its text."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return path.read_text()
        time.sleep(0.2)
    raise AssertionError(
        f"job {job_id} did not write {path} within {timeout:.0f}s; sacct states: "
        f"{sacct_states(job_id)}; files: {sorted(p.name for p in path.parent.iterdir())}"
    )


def node_states() -> dict[str, str]:
    output = run("sinfo", "-h", "-N", "-o", "%N %T")
    # sinfo lists a node once per partition; the state is the same in each.
    return dict(line.split() for line in output.splitlines() if line.strip())


def wait_for_idle_nodes(timeout: float = 60) -> dict[str, str]:
    """Wait until no job uses a node, because jobs of an earlier test may still be completing."""
    deadline = time.monotonic() + timeout
    states = node_states()
    while time.monotonic() < deadline:
        states = node_states()
        if all(state == "idle" for state in states.values()):
            return states
        time.sleep(0.5)
    return states


@pytest.fixture(scope="module", autouse=True)
def cluster() -> str:
    """Check that SLURM_CONF is set and the local cluster responds, and return SLURM_CONF."""
    slurm_conf = os.environ.get("SLURM_CONF")
    if not slurm_conf:
        pytest.fail(f"SLURM_CONF is not set, so there is no local Slurm cluster to test; {START_HINT}")
    if not Path(slurm_conf).is_file():
        pytest.fail(f"SLURM_CONF={slurm_conf} does not exist; {START_HINT}")
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        pytest.fail(f"the Slurm client commands are not installed (no scontrol on PATH); {START_HINT}")
    if "is UP" not in ping.stdout:
        pytest.fail(f"slurmctld does not respond ({ping.stdout.strip()} {ping.stderr.strip()}); {START_HINT}")
    sacctmgr = subprocess.run(
        ["sacctmgr", "-n", "-P", "show", "cluster", "format=Cluster"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if sacctmgr.returncode != 0:
        pytest.fail(f"slurmdbd does not respond, so sacct cannot work ({sacctmgr.stderr.strip()}); {START_HINT}")
    return slurm_conf


def test_nodes_idle_and_wrap_job_completes(tmp_path: Path) -> None:
    states = wait_for_idle_nodes()
    assert states == {"node1": "idle", "node2": "idle"}, f"sinfo node states: {states}"

    output = tmp_path / "wrap.out"
    job_id = sbatch("-o", str(output), "--wrap", "echo hello from $SLURMD_NODENAME")
    states = wait_for_final_state(job_id)
    assert states[-1] == "COMPLETED", f"sacct states of job {job_id}: {states}"
    assert output.read_text().startswith("hello from node"), output.read_text()


def test_two_node_job_uses_both_nodes(tmp_path: Path) -> None:
    output = tmp_path / "two-nodes.out"
    job_id = sbatch(
        "-N", "2", "--ntasks-per-node", "1", "-o", str(output),
        "--wrap", "srun bash -c 'echo task $SLURM_PROCID on $SLURMD_NODENAME'",
    )  # fmt: skip
    states = wait_for_final_state(job_id)
    assert states[-1] == "COMPLETED", f"sacct states of job {job_id}: {states}\n{output.read_text()}"
    lines = sorted(output.read_text().split("\n"))
    assert {line.split()[-1] for line in lines if line.startswith("task")} == {"node1", "node2"}, lines


def write_signal_job(folder: Path, mode: str) -> Path:
    """Write a batch script that runs SIGNAL_HANDLER_SCRIPT as a job step, as submitit does."""
    handler = folder / "handler.py"
    handler.write_text(SIGNAL_HANDLER_SCRIPT)
    batch = folder / "job.sh"
    # The step, not the batch shell, gets the signal: sbatch --signal without
    # "B:" and scancel --signal without -b or -f signal job steps only.
    batch.write_text(f"#!/bin/bash\nsrun --ntasks=1 {sys.executable} -u {handler} {folder} {mode}\n")
    return batch


def test_scancel_signal_reaches_job_step(tmp_path: Path) -> None:
    batch = write_signal_job(tmp_path, mode="exit")
    job_id = sbatch("-p", "debug", "-N", "1", "-n", "1", "-t", "3", "-o", str(tmp_path / "job.out"), str(batch))
    wait_for_file(tmp_path / "started-0", job_id)

    run("scancel", "--signal=USR2", job_id)
    wait_for_file(tmp_path / "usr2-0", job_id, timeout=30)
    states = wait_for_final_state(job_id)
    assert states[-1] == "COMPLETED", f"sacct states of job {job_id}: {states}"


def test_preemption_signals_requeues_and_restarts(tmp_path: Path) -> None:
    wait_for_idle_nodes()
    batch = write_signal_job(tmp_path, mode="requeue")
    # --exclusive makes the low-priority job hold all of node1, so a
    # high-priority job on node1 can only start by preempting it.
    low_job = sbatch(
        "-p", "debug", "-w", "node1", "--exclusive", "-N", "1", "-n", "1", "-t", "5",
        "--signal=USR2@30", "-o", str(tmp_path / "low-%j.out"), str(batch),
    )  # fmt: skip
    wait_for_file(tmp_path / "started-0", low_job)

    high_job = sbatch(
        "-p", "high", "-w", "node1", "-N", "1", "-n", "1", "-t", "2",
        "-o", str(tmp_path / "high-%j.out"), "--wrap", "sleep 2",
    )  # fmt: skip
    assert "restart=0" in wait_for_file(tmp_path / "usr2-0", low_job, timeout=60)

    # The requeued run may start only once its begin time (cred_expire=15 s) has passed.
    assert "restart=1" in wait_for_file(tmp_path / "started-1", low_job, timeout=90)
    low_states = wait_for_final_state(low_job, timeout=60)
    high_states = wait_for_final_state(high_job, timeout=60)

    assert high_states[-1] == "COMPLETED", f"sacct states of high-priority job {high_job}: {high_states}"
    assert low_states[-1] == "COMPLETED", f"sacct states of low-priority job {low_job}: {low_states}"
    assert {"PREEMPTED", "REQUEUED"} & set(low_states[:-1]), f"sacct states of job {low_job}: {low_states}"
    assert not (tmp_path / "usr2-1").exists(), "the restarted run was signalled again"


def test_submitit_returns_function_result(tmp_path: Path) -> None:
    def multiply(a: int, b: int) -> tuple[int, str]:
        # Defined in the test, so cloudpickle sends it by value to the job.
        return a * b, os.environ["SLURM_JOB_ID"]

    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    executor.update_parameters(slurm_partition="debug", timeout_min=3, nodes=1, tasks_per_node=1, cpus_per_task=1)
    job = executor.submit(multiply, 6, 7)

    deadline = time.monotonic() + 90
    while not job.done():
        if time.monotonic() > deadline:
            pytest.fail(f"submitit job {job.job_id} did not finish within 90s; state {job.state}\n{job.stderr()}")
        time.sleep(1)
    value, job_id = job.result()
    assert value == 42
    assert job_id == str(job.job_id)
