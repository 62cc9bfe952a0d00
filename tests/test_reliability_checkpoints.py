"""Checkpoint reliability on real files and processes: kill -9, corruption, full disk, malicious pickles.

Also the training numerics that decide whether a checkpoint is good: a diverging run stops
with the step and the last checkpoint named, and --clip_grad bounds the gradient norm.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fcmae.checkpoint import CheckpointError, CheckpointManager, atomic_torch_save, safe_load
from fcmae.config import PretrainConfig
from fcmae.distributed import DistEnv
from fcmae.training import NonFiniteLossError, Trainer

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT_FLOATS = 8_000_000  # 32 MB per checkpoint: a save takes long enough to be killed inside it

SAVE_LOOP = f"""
import sys
import torch
from fcmae.checkpoint import CheckpointManager

manager = CheckpointManager(sys.argv[1], keep_last=2)
step = int(sys.argv[2])
while True:
    step += 1
    state = {{"step": step, "weights": torch.full(({CHECKPOINT_FLOATS},), float(step))}}
    print("start", step, flush=True)
    manager.save(state, step)
    print("saved", step, flush=True)
"""


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def assert_complete(state: dict, path: Path) -> None:
    weights = state["weights"]
    assert weights.shape == (CHECKPOINT_FLOATS,), path
    assert torch.equal(weights, torch.full_like(weights, float(state["step"]))), path


def kill_inside_second_save(folder: Path, first_step: int, fraction: float) -> int:
    """Start the save loop, time its first save, kill -9 it `fraction` of that time into the second.

    Returns the newest step the child reported as saved.
    """
    child = subprocess.Popen([sys.executable, "-c", SAVE_LOOP, str(folder), str(first_step)], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True)
    last_saved, started = first_step, None
    try:
        for line in child.stdout:
            kind, step = line.split()
            if kind == "start" and started is None:
                started = time.monotonic()
            elif kind == "saved":
                last_saved, duration = int(step), time.monotonic() - started
            elif kind == "start":
                time.sleep(fraction * duration)
                break
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    return last_saved


def test_sigkill_during_saves_leaves_newest_complete_checkpoint(tmp_path):
    # One kill per fifth of a save's duration (the stratum order and the point in it are random),
    # so kills land before, inside and after the write of the temporary file.
    rng = random.Random(1234)
    fractions = [(stratum + rng.random()) / 5 for stratum in rng.sample(range(5), 5)]
    manager = CheckpointManager(tmp_path, keep_last=2)
    newest_step, kills_inside_save = 0, 0

    for fraction in fractions:
        last_saved = kill_inside_second_save(tmp_path, newest_step, fraction)

        leftovers = temp_files(manager.folder)
        kills_inside_save += bool(leftovers)
        numbered = manager.checkpoints()
        assert not set(leftovers) & {p.name for p in numbered}
        for path in numbered:
            assert_complete(safe_load(path), path)

        state, path = manager.load_latest()
        assert_complete(state, path)
        assert state["step"] == max(safe_load(p)["step"] for p in numbered)
        assert state["step"] >= last_saved
        newest_step = state["step"]

    assert kills_inside_save >= 1, "no kill landed inside a save; the test did not exercise a partial write"


def test_save_removes_stale_temp_files(tmp_path):
    manager = CheckpointManager(tmp_path)
    manager.save({"step": 1}, 1)
    partial = manager.folder / ".checkpoint-000000002.pt.x1y2z3.tmp"
    partial.write_bytes(b"PK\x03\x04 half a zip file")
    (manager.folder / ".last.pt.tmp").write_bytes(b"")
    assert [p.name for p in manager.checkpoints()] == ["checkpoint-000000001.pt"]

    manager.save({"step": 2}, 2)
    assert temp_files(manager.folder) == []
    assert safe_load(manager.last_path)["step"] == 2


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_newest_checkpoint_falls_back_with_warning(tmp_path, caplog, damage):
    manager = CheckpointManager(tmp_path, keep_last=3)
    manager.save({"step": 1, "weights": torch.ones(10_000)}, 1)
    newest = manager.save({"step": 2, "weights": torch.ones(10_000)}, 2)
    if damage == "truncate":
        os.truncate(newest, newest.stat().st_size // 2)
    else:
        newest.write_bytes(b"\x00not a checkpoint\xff" * 100)

    with caplog.at_level(logging.WARNING, logger="fcmae.checkpoint"):
        state, path = manager.load_latest()
    assert state["step"] == 1
    assert path.name == "checkpoint-000000001.pt"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "checkpoint-000000002.pt" in warnings[0]
    assert "checkpoint-000000001.pt" in warnings[0]
    assert "is not a readable checkpoint" in warnings[0]


def test_all_checkpoints_corrupt_raises_naming_each(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    manager.save({"step": 1}, 1)
    manager.save({"step": 2}, 2)
    for path in manager.checkpoints():
        path.write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="no readable checkpoint") as error:
        manager.load_latest()
    assert "checkpoint-000000001.pt" in str(error.value)
    assert "last.pt" in str(error.value)


def test_numbered_checkpoint_newer_than_last_is_used(tmp_path):
    """A save killed after writing checkpoint-3 but before relinking last.pt leaves last.pt at step 2."""
    manager = CheckpointManager(tmp_path, keep_last=3)
    manager.save({"step": 1}, 1)
    manager.save({"step": 2}, 2)
    atomic_torch_save({"step": 3}, manager.folder / "checkpoint-000000003.pt")

    state, path = manager.load_latest()
    assert state["step"] == 3
    assert path.name == "checkpoint-000000003.pt"


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs, mounted for the test and unmounted after it."""
    mount_point = tmp_path / "small_disk"
    mount_point.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("the mount command is not installed")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root or CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_full_disk_raises_clear_error_and_keeps_previous(small_disk):
    manager = CheckpointManager(small_disk)
    manager.save({"step": 1, "weights": torch.ones(1000)}, 1)

    with pytest.raises(CheckpointError) as error:
        manager.save({"step": 2, "weights": torch.ones(1_000_000)}, 2)  # 4 MB on a 2 MiB disk
    message = str(error.value)
    assert "No space left on device" in message
    assert "checkpoint-000000002.pt" in message
    assert f"the previous checkpoint {manager.last_path} is unchanged" in message
    assert "free space" in message

    assert temp_files(manager.folder) == []
    assert [p.name for p in manager.checkpoints()] == ["checkpoint-000000001.pt"]
    state, path = manager.load_latest()
    assert state["step"] == 1
    assert torch.equal(state["weights"], torch.ones(1000))


SAVE_ONCE = """
import sys
import torch
from fcmae.checkpoint import CheckpointError, CheckpointManager

try:
    CheckpointManager(sys.argv[1]).save({"step": 2, "weights": torch.ones(10)}, 2)
except CheckpointError as error:
    print(error)
    sys.exit(3)
"""


def test_permission_denied_raises_clear_error_and_keeps_previous(tmp_path):
    """Root bypasses file modes, so the save runs in a child without the DAC override capabilities."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed; as root, file modes cannot be enforced otherwise")
    manager = CheckpointManager(tmp_path)
    manager.save({"step": 1, "weights": torch.zeros(10)}, 1)
    manager.folder.chmod(0o555)
    try:
        result = subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search",
                                 sys.executable, "-c", SAVE_ONCE, str(tmp_path)],
                                cwd=ROOT, capture_output=True, text=True, timeout=120)
    finally:
        manager.folder.chmod(0o755)

    assert result.returncode == 3, result.stderr
    assert "Permission denied" in result.stdout
    assert "writable" in result.stdout
    assert f"the previous checkpoint {manager.last_path} is unchanged" in result.stdout
    state, _ = manager.load_latest()
    assert state["step"] == 1


class MarkerPayload:
    """Pickles as a call that creates a marker file when the pickle is loaded without weights_only."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer, reason", [
    ("torch.save", "it refers to Python code (Unsupported global"),
    ("pickle protocol 2", "it refers to Python code (Unsupported global"),
    ("pickle protocol 5", "the weights_only unpickler rejected it (Unsupported operand"),
])
def test_pickled_code_payload_is_rejected_without_running(tmp_path, writer, reason):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "malicious.pt"
    payload = {"model": {"weight": torch.zeros(2)}, "extra": MarkerPayload(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as handle:
            pickle.dump(payload, handle, protocol=int(writer.split()[-1]))

    with pytest.raises(CheckpointError) as error:
        safe_load(path)
    assert str(path) in str(error.value)
    assert reason in str(error.value)
    assert not marker.exists()


def test_malicious_newest_checkpoint_is_skipped(tmp_path, caplog):
    marker = tmp_path / "payload_ran"
    manager = CheckpointManager(tmp_path / "run", keep_last=3)
    manager.save({"step": 1}, 1)
    manager.save({"step": 2, "extra": MarkerPayload(marker)}, 2)

    state, path = manager.load_latest()
    assert state["step"] == 1
    assert path.name == "checkpoint-000000001.pt"
    assert "was rejected: it refers to Python code" in caplog.text
    assert not marker.exists()


# ------------------------------------------------------------------ training numerics
def tiny_config(data, output_dir, **overrides) -> PretrainConfig:
    values = dict(model="convnextv2_atto", data=str(data), output_dir=str(output_dir), epochs=1, warmup_epochs=0,
                  batch_size=4, input_size=64, mask_ratio=0.5, num_workers=0, data_repeat=1, lr=1e-3,
                  decoder_dim=64, log_every=1, save_every_minutes=0, recon_every=100, collapse_every=0, seed=7)
    values.update(overrides)
    config = PretrainConfig(**values)
    config.validate()
    return config


def test_diverging_run_stops_naming_step_and_checkpoint(photo_dir, tmp_path):
    # Step 1 moves every weight by about lr = 1e30, so the forward pass of step 2 overflows.
    config = tiny_config(photo_dir, tmp_path / "run", lr=1e30, save_every_steps=1)
    trainer = Trainer(config, DistEnv())
    with pytest.raises(NonFiniteLossError) as error:
        trainer.run()

    last = CheckpointManager(tmp_path / "run").last_path
    message = str(error.value)
    assert "non-finite loss or gradient at step 2" in message
    assert f"the last good checkpoint {last} is kept" in message
    state = safe_load(last)
    assert state["step"] == 1
    assert all(torch.isfinite(value).all() for value in state["model"].values() if value.is_floating_point())


def grad_norms_at_steps(config) -> list[float]:
    """Train `config` and return the total gradient norm that each optimizer step receives."""
    trainer = Trainer(config, DistEnv())
    norms = []

    def record(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())

    trainer.optimizer.register_step_pre_hook(record)
    trainer.run()
    return norms


def test_clip_grad_bounds_gradient_norm(photo_dir, tmp_path):
    norms = grad_norms_at_steps(tiny_config(photo_dir, tmp_path / "clipped", clip_grad=0.005))

    assert len(norms) == 2
    for norm in norms:
        # Without clipping the norms are about 0.03 and 0.024, so clipping scales them to the
        # limit (up to the 1e-6 that clip_grad_norm_ adds to the divisor). Unclipped, this fails.
        assert norm <= 0.005
        assert norm == pytest.approx(0.005, rel=1e-3)
