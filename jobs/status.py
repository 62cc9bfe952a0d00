"""Status and cancellation of the jobs of one run folder, from Slurm accounting and run files."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from datetime import datetime
from pathlib import Path

SUBMISSIONS_FILE = "submissions.jsonl"


class StatusError(ValueError):
    """Raised when a folder holds no run that was submitted by this tool."""


def record_submission(output_dir: Path, job_id: str, cluster: str, world_size: int) -> None:
    """Append a submitted job to OUTPUT_DIR/submissions.jsonl."""
    entry = {"job_id": str(job_id), "cluster": cluster, "world_size": world_size,
             "time": datetime.now().astimezone().isoformat(timespec="seconds")}
    with open(output_dir / SUBMISSIONS_FILE, "a") as handle:
        handle.write(json.dumps(entry) + "\n")


def submissions(output_dir: Path) -> list[dict]:
    path = output_dir / SUBMISSIONS_FILE
    if not path.is_file():
        raise StatusError(f"{output_dir} contains no submitted run ({SUBMISSIONS_FILE} is missing); pass the "
                          f"--output_dir of a run submitted with run_with_submitit.py")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def sacct_records(job_id: str) -> list[dict]:
    """Return every accounting record of a job, requeued attempts included (sacct -D), oldest first."""
    if not shutil.which("sacct"):
        return []
    try:
        output = subprocess.run(["sacct", "-j", job_id, "-X", "-D", "-P", "-n",
                                 "--format=JobIDRaw,State,ExitCode,Start,End,NodeList"],
                                capture_output=True, text=True, timeout=60, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    keys = ("job_id", "state", "exit_code", "start", "end", "nodes")
    return [dict(zip(keys, line.split("|"))) for line in output.splitlines() if line.strip()]


def slurm_state(job_id: str) -> tuple[str, int, str | None]:
    """Return (state, requeue count, exit code) of a Slurm job from accounting."""
    records = sacct_records(job_id)
    if not records:
        # sacct lists the pending tasks of an array under one record such as 327_[4-5%2], so a
        # task id like 327_5 has no record of its own until it starts, but squeue lists it.
        return squeue_state(job_id), 0, None
    requeues = sum(1 for r in records[:-1] if r["state"].split()[0] in ("REQUEUED", "PREEMPTED", "NODE_FAIL",
                                                                           "TIMEOUT"))
    last = records[-1]
    return last["state"].split()[0], requeues, last["exit_code"]


def squeue_state(job_id: str) -> str:
    """Return the squeue state of a queued or running job, or UNKNOWN if squeue does not list it."""
    if not shutil.which("squeue"):
        return "UNKNOWN"
    try:
        output = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True,
                                timeout=60).stdout
    except (subprocess.SubprocessError, OSError):
        return "UNKNOWN"
    states = output.split()
    return states[0] if states else "UNKNOWN"


def local_job_alive(output_dir: Path, job_id: str) -> bool:
    """Check that the PID of a local-executor job still runs that job, because PIDs are reused."""
    try:
        cmdline = Path(f"/proc/{int(job_id)}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, ValueError):
        return False
    return "submitit" in cmdline and str(output_dir.resolve()) in cmdline


def local_state(output_dir: Path, job_id: str) -> str:
    """State of a local-executor job, whose id is the PID of its process."""
    if local_job_alive(output_dir, job_id):
        return "RUNNING"
    if (output_dir / "final_metrics.json").is_file():
        return "COMPLETED"
    return "STOPPED"


EXCEPTION_LINE = re.compile(r"^[\w.]*(Error|Exception|Interrupt)\b.*:")


def last_error_line(path: Path) -> str | None:
    """Return the last Python exception line of a log, else its last line mentioning an error."""
    if not path.is_file():
        return None
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    for line in reversed(lines):
        if EXCEPTION_LINE.match(line):
            return line[:400]
    for line in reversed(lines):
        if "error" in line.lower():
            return line[:400]
    return None


def newest_checkpoint(output_dir: Path) -> tuple[str | None, float | None]:
    folder = output_dir / "checkpoints"
    files = sorted(folder.glob("checkpoint-*.pt")) if folder.is_dir() else []
    if not files:
        return None, None
    newest = files[-1]
    return str(newest), time.time() - newest.stat().st_mtime


def run_status(output_dir: str | Path) -> dict:
    """Collect the status fields of the newest job of a run folder."""
    output_dir = Path(output_dir)
    entries = submissions(output_dir)
    latest = entries[-1]
    job_id = latest["job_id"]
    run_info = _read_json(output_dir / "run_info.json")
    progress = _read_json(output_dir / "progress.json")

    if latest["cluster"] == "slurm":
        state, requeues, exit_code = slurm_state(job_id)
    else:
        state, exit_code = local_state(output_dir, job_id), None
        requeues = len(run_info.get("interruptions", []))
    checkpoint, age = newest_checkpoint(output_dir)
    logs = sorted(str(p) for p in (output_dir / "submitit" / job_id).glob("*_log.*"))
    reason = None
    if state not in ("RUNNING", "PENDING", "REQUEUED", "COMPLETED", "UNKNOWN"):
        errors = [line for p in logs if p.endswith("_0_log.err") and (line := last_error_line(Path(p)))]
        reason = errors[0] if errors else None
    return {
        "output_dir": str(output_dir), "job_id": job_id, "job_ids": [e["job_id"] for e in entries],
        "cluster": latest["cluster"], "state": state, "exit_code": exit_code, "requeues": requeues,
        "interruptions": run_info.get("interruptions", []),
        "epoch": progress.get("epoch"), "epochs": progress.get("epochs"), "step": progress.get("step"),
        "total_steps": progress.get("total_steps"), "loss": progress.get("loss"),
        "images_per_s": progress.get("images_per_s"), "checkpoint": checkpoint, "checkpoint_age_s": age,
        "reason": reason, "logs": logs,
    }


def format_status(status: dict) -> str:
    """Render a status dict as aligned 'field: value' lines for a terminal."""
    step = f"{status['step']}/{status['total_steps']}" if status["step"] is not None else "-"
    age = f"{status['checkpoint_age_s']:.0f} s ago" if status["checkpoint_age_s"] is not None else "-"
    loss = f"{status['loss']:.4f}" if status["loss"] is not None else "-"
    speed = f"{status['images_per_s']:.1f}" if status["images_per_s"] is not None else "-"
    rows = [
        ("run", status["output_dir"]),
        ("job", f"{status['job_id']} ({status['cluster']}; all: {', '.join(status['job_ids'])})"),
        ("state", status["state"] + (f" (exit {status['exit_code']})" if status["exit_code"] not in (None, "0:0")
                                     else "")),
        ("reason", status["reason"] or "-"),
        ("requeues", str(status["requeues"])),
        ("epoch", f"{status['epoch']}/{status['epochs']}" if status["epoch"] is not None else "-"),
        ("step", step),
        ("loss", f"{loss} (mean of the last log interval)" if status["loss"] is not None else loss),
        ("images/s", speed),
        ("checkpoint", f"{status['checkpoint'] or '-'} ({age})"),
        ("logs", "\n            ".join(status["logs"]) or "-"),
    ]
    return "\n".join(f"{name:<11} {value}" for name, value in rows)


def cancel_run(output_dir: str | Path) -> str:
    """Cancel the newest job of a run folder; returns its id."""
    output_dir = Path(output_dir)
    latest = submissions(output_dir)[-1]
    job_id = latest["job_id"]
    if latest["cluster"] == "slurm":
        subprocess.run(["scancel", job_id], check=True, timeout=60)
        return job_id
    if not local_job_alive(output_dir, job_id):
        raise StatusError(f"local job {job_id} of {output_dir} is not running; nothing to cancel")
    cancel_local_job(output_dir, job_id)
    return job_id


LOCAL_CANCEL_GRACE_S = 5.0


def cancel_local_job(output_dir: Path, job_id: str, grace_s: float = LOCAL_CANCEL_GRACE_S) -> None:
    """Stop a local-executor job and wait until its controller has exited.

    The job id is the PID of submitit's controller, which stops its tasks on SIGINT (as
    submitit's own LocalJob.cancel does). A controller started in the background of a
    non-interactive shell (`nohup ... &`) inherits SIGINT as ignored, and its tasks ignore
    SIGINT and SIGTERM as well, so after `grace_s` the tasks get SIGKILL, like `scancel` after
    KillWait. Checkpoints are written atomically, so the newest complete one survives.
    """
    controller = int(job_id)
    os.kill(controller, signal.SIGINT)
    if _wait_until_stopped(output_dir, job_id, grace_s):
        return

    for task in child_pids(controller):
        _kill_quietly(task)
    if not _wait_until_stopped(output_dir, job_id, grace_s):
        _kill_quietly(controller)
        _wait_until_stopped(output_dir, job_id, grace_s)


def _wait_until_stopped(output_dir: Path, job_id: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not local_job_alive(output_dir, job_id):
            return True
        time.sleep(0.2)
    return not local_job_alive(output_dir, job_id)


def child_pids(pid: int) -> list[int]:
    """PIDs whose parent is `pid`, read from /proc."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # The command name in parentheses may hold spaces; the parent PID follows it.
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
