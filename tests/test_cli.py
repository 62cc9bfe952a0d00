"""The launcher CLI through submitit's local executor, on real photos, in real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--data", "sample", "--input_size", "64", "--epochs", "1", "--warmup_epochs", "0", "--batch_size", "3",
        "--data_repeat", "1", "--num_workers", "0", "--cpus_per_task", "1", "--log_every", "1", "--cluster", "local"]


def launch(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "run_with_submitit.py"), "pretrain", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.mark.parametrize("args, message", [
    (["--model", "convnextv3_atto"], "valid models: convnext_atto"),
    (["--mask_ratio", "1.2"], "--mask_ratio 1.2: it must lie in (0, 1)"),
    (["--mask_ratio", "0"], "--mask_ratio 0.0: it must lie in (0, 1)"),
    (["--input_size", "100"], "--input_size 100: it must be a positive multiple of the patch size 32"),
    (["--data", "/nonexistent/imagenet"], "'/nonexistent/imagenet' does not exist"),
    (["--batch_size", "0"], "--batch_size 0: it must be positive"),
    (["--warmup_epochs", "5", "--epochs", "2"], "--warmup_epochs 5: it must not exceed --epochs 2"),
    (["--num_workers", "-1"], "--num_workers -1: it must not be negative"),
    (["--gpus_per_node", "64"], "--gpus_per_node 64 with --cluster local"),
    (["--data_repeat", "1", "--batch_size", "16"], "gives 9 samples per epoch (9 files x data_repeat 1), fewer "
                                                   "than one effective batch of 16"),
])
def test_bad_input_exits_without_submitting(tmp_path, args, message):
    output_dir = tmp_path / "run"
    result = launch("--output_dir", str(output_dir), "--cluster", "local", *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert not output_dir.exists()


def test_empty_data_folder_is_rejected(tmp_path):
    (tmp_path / "empty").mkdir()
    result = launch("--output_dir", str(tmp_path / "run"), "--data", str(tmp_path / "empty"))
    assert result.returncode == 2
    assert "contains no images" in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_pretrain_through_local_executor_then_resume_and_conflicts(tmp_path):
    output_dir = tmp_path / "run"
    result = launch("--model", "convnextv2_atto", "--output_dir", str(output_dir), *TINY, "--wait")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "submitted job" in result.stdout and "log:" in result.stdout
    assert "completed: step 3/3" in result.stdout

    encoder = torch.load(output_dir / "encoder.pth", weights_only=True)
    timm.create_model("convnextv2_atto", num_classes=0).load_state_dict(encoder, strict=True)
    assert json.loads((output_dir / "config.json").read_text())["model"] == "convnextv2_atto"
    assert (output_dir / "logs" / "rank0.log").exists()

    again = launch("--model", "convnextv2_atto", "--output_dir", str(output_dir), *TINY, "--wait")
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stdout

    changed = launch("--model", "convnextv2_atto", "--output_dir", str(output_dir), *TINY, "--mask_ratio", "0.5")
    assert changed.returncode == 2
    assert "mask_ratio: saved 0.6, requested 0.5" in changed.stderr and "--force" in changed.stderr

    forced = launch("--model", "convnextv2_atto", "--output_dir", str(output_dir), *TINY, "--mask_ratio", "0.5",
                    "--force", "--wait")
    assert forced.returncode == 0, forced.stderr
    archived = list(output_dir.glob("replaced-*/encoder.pth"))
    assert len(archived) == 1
    assert json.loads((output_dir / "config.json").read_text())["mask_ratio"] == 0.5


def processes_mentioning(text: str) -> list[int]:
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().decode(errors="replace"):
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return pids


def wait_for_text(path: Path, text: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.is_file() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.5)
    raise AssertionError(f"{path} did not show {text!r} within {timeout_s} s")


@pytest.mark.slow
def test_local_cancel_with_sigint_ignored(tmp_path):
    # `nohup ... &` from a script starts the launcher with SIGINT ignored, and submitit's
    # controller and tasks inherit that; cancel must still stop the job.
    output_dir = tmp_path / "run"
    launcher_log = tmp_path / "launcher.log"
    try:
        with open(launcher_log, "w") as log:
            # The controller outlives the launcher and keeps its stdout, so no pipe here.
            submit = subprocess.run([sys.executable, str(ROOT / "run_with_submitit.py"), "pretrain", "--model",
                                     "convnext_atto", "--output_dir", str(output_dir), *TINY, "--epochs", "1000"],
                                    stdout=log, stderr=subprocess.STDOUT, timeout=120, cwd=ROOT,
                                    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
        assert submit.returncode == 0, launcher_log.read_text()
        wait_for_text(output_dir / "logs" / "rank0.log", "step", timeout_s=180)

        cancel = subprocess.run([sys.executable, str(ROOT / "run_with_submitit.py"), "cancel", str(output_dir)],
                                capture_output=True, text=True, timeout=120)
        assert cancel.returncode == 0, cancel.stderr
        assert processes_mentioning(str(output_dir)) == []

        status = subprocess.run([sys.executable, str(ROOT / "run_with_submitit.py"), "status", str(output_dir),
                                 "--format", "json"], capture_output=True, text=True, timeout=120)
        assert json.loads(status.stdout)["state"] == "STOPPED"
    finally:
        for pid in processes_mentioning(str(output_dir)):
            os.kill(pid, signal.SIGKILL)


def test_local_cancel_never_signals_unrelated_process(tmp_path):
    sleeper = subprocess.Popen(["sleep", "120"])
    try:
        run = tmp_path / "run"
        run.mkdir()
        (run / "submissions.jsonl").write_text(json.dumps({"job_id": str(sleeper.pid), "cluster": "local"}) + "\n")

        status = subprocess.run([sys.executable, str(ROOT / "run_with_submitit.py"), "status", str(run),
                                 "--format", "json"], capture_output=True, text=True, timeout=120)
        assert json.loads(status.stdout)["state"] == "STOPPED"

        cancel = subprocess.run([sys.executable, str(ROOT / "run_with_submitit.py"), "cancel", str(run)],
                                capture_output=True, text=True, timeout=120)
        assert cancel.returncode == 2
        assert "is not running; nothing to cancel" in cancel.stderr
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()
