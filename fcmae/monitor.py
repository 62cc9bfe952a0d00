"""Progress reporting for pretraining: log lines, TensorBoard, progress files, run info.

Only rank 0 reports. TensorBoard's x axis is samples seen, which does not depend on the
batch size, and a resumed run purges events past its checkpoint so curves continue
without duplicated points.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import socket
import subprocess
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import torch

from .data import IMAGENET_MEAN, IMAGENET_STD, load_eval_images

logger = logging.getLogger(__name__)

PROGRESS_FILE = "progress.json"
METRICS_FILE = "metrics.jsonl"
COLLAPSE_FILE = "collapse.jsonl"
RUN_INFO_FILE = "run_info.json"
BAD_FILES_FILE = "bad_files.txt"
RECON_IMAGES = 4


def code_version() -> str:
    """Return the git commit of the source tree (with '-dirty' if modified), else the package version."""
    source = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return "fcmae-collapse " + version("fcmae-collapse")
        except PackageNotFoundError:
            return "unknown"


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def atomic_write_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def run_info(output_dir: Path, world_size: int, resumed: bool) -> None:
    """Record the code version and environment of this start in OUTPUT_DIR/run_info.json."""
    import timm

    path = output_dir / RUN_INFO_FILE
    info = json.loads(path.read_text()) if path.is_file() else {"starts": []}
    info.update({
        "code_version": code_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
    })
    info["starts"].append({"time": utc_now(), "host": socket.gethostname(), "world_size": world_size,
                           "resumed": resumed, "slurm_job_id": os.environ.get("SLURM_JOB_ID")})
    atomic_write_json(path, info)


def drop_records_after(path: Path, samples_seen: int) -> None:
    """Remove metrics lines written after the checkpoint a resumed run restarts from."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line)["samples_seen"] <= samples_seen]
    if len(kept) != len(lines):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)


class Monitor:
    """Rank-0 progress lines, TensorBoard scalars and images, and the progress file."""

    def __init__(self, config, env, total_steps: int, samples_seen: int, effective_batch: int, resumed: bool,
                 bad_files: int = 0):
        self.cfg = config
        self.env = env
        self.total_steps = total_steps
        self.effective_batch = effective_batch
        self.output_dir = Path(config.output_dir)
        self.last_loss: float | None = None
        self._interval_start = time.monotonic()
        self._interval_steps = 0
        self._loss_sum = 0.0
        self._images_per_s = 0.0
        self.bad_files = bad_files
        self.writer = None
        self._collapse_encoder = None
        self._collapse_images = None
        if env.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.output_dir / "tensorboard"),
                                        purge_step=samples_seen + 1 if resumed else None)
            if resumed:
                drop_records_after(self.output_dir / METRICS_FILE, samples_seen)
                drop_records_after(self.output_dir / COLLAPSE_FILE, samples_seen)

    def log_step(self, pos, loss: float, lr: float) -> None:
        self.last_loss = loss
        self._loss_sum += loss
        self._interval_steps += 1
        if not self.env.is_main:
            return
        if pos.step % self.cfg.log_every and pos.step != self.total_steps:
            return

        elapsed = time.monotonic() - self._interval_start
        self._images_per_s = self._interval_steps * self.effective_batch / max(elapsed, 1e-9)
        mean_loss = self._loss_sum / self._interval_steps
        eta = (self.total_steps - pos.step) * elapsed / self._interval_steps
        logger.info("epoch %d/%d | step %d/%d (%.1f%%) | loss %.4f | lr %.3e | %.1f img/s | eta %s",
                    pos.epoch + 1, self.cfg.epochs, pos.step, self.total_steps, 100 * pos.step / self.total_steps,
                    mean_loss, lr, self._images_per_s, timedelta(seconds=int(eta)))

        self.writer.add_scalar("train/loss", mean_loss, pos.samples_seen)
        self.writer.add_scalar("train/lr", lr, pos.samples_seen)
        self.writer.add_scalar("train/images_per_s", self._images_per_s, pos.samples_seen)
        self.writer.add_scalar("data/bad_files", self.bad_files, pos.samples_seen)
        self._write_progress(pos, mean_loss, lr)
        self._interval_start, self._interval_steps, self._loss_sum = time.monotonic(), 0, 0.0

    def report_bad_files(self, new: list[tuple[str, str]], tracker, pos) -> None:
        """Log each newly found undecodable file once and record the count (rank 0).

        OUTPUT_DIR/bad_files.txt lists every such file of the run as 'path<TAB>reason' lines.
        """
        self.bad_files = len(tracker)
        if not self.env.is_main or not new:
            return
        for path, reason in new:
            logger.warning("cannot decode image file %s (%s); a replacement file was used. %d of %d files "
                           "(%.2f%%) failed so far, --max_bad_fraction %s", path, reason, len(tracker),
                           tracker.num_files, 100 * tracker.fraction, tracker.max_fraction)
        self.writer.add_scalar("data/bad_files", self.bad_files, pos.samples_seen)
        self.writer.flush()
        listing = self.output_dir / BAD_FILES_FILE
        tmp = listing.with_name(f".{listing.name}.tmp")
        tmp.write_text("".join(f"{path}\t{reason}\n" for path, reason in tracker.reasons.items()))
        os.replace(tmp, listing)

    def _write_progress(self, pos, loss: float, lr: float) -> None:
        record = {"time": utc_now(), "step": pos.step, "total_steps": self.total_steps, "epoch": pos.epoch + 1,
                  "epochs": self.cfg.epochs, "samples_seen": pos.samples_seen, "loss": loss, "lr": lr,
                  "images_per_s": self._images_per_s}
        atomic_write_json(self.output_dir / PROGRESS_FILE, record)
        with open(self.output_dir / METRICS_FILE, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def end_epoch(self, model, dataset, pos) -> None:
        """Log reconstructions and the collapse metric at their epoch intervals (rank 0)."""
        if not self.env.is_main:
            return
        if pos.epoch % self.cfg.recon_every == 0:
            grid = reconstruction_grid(model, dataset.paths, self.cfg.seed, self.env.device)
            self.writer.add_image("reconstruction", grid, pos.samples_seen)
        every = self.cfg.collapse_every
        if every and (pos.epoch % every == 0 or pos.epoch == self.cfg.epochs):
            self.track_collapse(model, pos)
        self.writer.flush()

    def begin(self, model, pos) -> None:
        """Measure the collapse metric of the initial encoder (rank 0, new runs only)."""
        if self.env.is_main and self.cfg.collapse_every:
            self.track_collapse(model, pos)
            self.writer.flush()

    def track_collapse(self, model, pos) -> None:
        """Measure per-layer feature cosine distance of the current encoder on the fixed image set."""
        from .collapse import layer_distances
        from .data import resolve_data
        from .registry import create_encoder

        start = time.monotonic()
        if self._collapse_encoder is None:
            paths = resolve_data(self.cfg.collapse_data)
            self._collapse_images = load_eval_images(paths, self.cfg.input_size, limit=self.cfg.collapse_images)
            self._collapse_encoder = create_encoder(self.cfg.model, in_chans=self.cfg.in_chans).to(self.env.device)
        self._collapse_encoder.load_state_dict(model.encoder.timm_state_dict())
        layers = layer_distances(self._collapse_encoder, self._collapse_images.to(self.env.device), batch_size=8)

        for layer in layers:
            self.writer.add_scalar(f"collapse/stage{layer.stage}_block{layer.block}", layer.distance,
                                   pos.samples_seen)
        record = {"epoch": pos.epoch, "step": pos.step, "samples_seen": pos.samples_seen,
                  "layers": [layer.as_dict() for layer in layers]}
        with open(self.output_dir / COLLAPSE_FILE, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        mean = sum(layer.distance for layer in layers) / len(layers)
        logger.info("collapse at epoch %d: mean feature cosine distance %.4f, last layer %.4f "
                    "(%d images, %.1f s)", pos.epoch, mean, layers[-1].distance, len(self._collapse_images),
                    time.monotonic() - start)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@torch.no_grad()
def reconstruction_grid(model, paths, seed: int, device: torch.device) -> torch.Tensor:
    """Return a (3, H, W) image: rows of masked input, reconstruction and original.

    Uses the first RECON_IMAGES files of `paths` that decode.
    """
    from torchvision.utils import make_grid

    was_training = model.training
    model.eval()
    images = load_eval_images(list(paths), model.input_size, limit=RECON_IMAGES).to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    mask = model.random_mask(images.shape[0], device, generator=generator)
    _, prediction, _ = model(images, mask)
    model.train(was_training)

    removed = mask.reshape(-1, 1, *(int(mask.shape[1] ** 0.5),) * 2)
    removed = torch.nn.functional.interpolate(removed, size=images.shape[-2:], mode="nearest")
    reconstruction = model.reconstruct(images, prediction)
    pasted = images * (1 - removed) + reconstruction * removed
    rows = torch.cat([images * (1 - removed), pasted, images])
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, -1, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, -1, 1, 1)
    return make_grid((rows * std + mean).clamp(0, 1).cpu(), nrow=images.shape[0], padding=2)
