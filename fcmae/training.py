"""The FCMAE pretraining loop: DDP, gradient accumulation, checkpoints, logging.

A run is identified by its output folder. Starting a run on a folder that holds a
checkpoint resumes from it at the exact optimizer step it was written at: the data
order, the augmentation and the masks depend only on (seed, epoch, sample index), so
nothing else needs replaying.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from . import optim
from .checkpoint import CheckpointError, CheckpointManager, export_encoder
from .config import PretrainConfig, save_config
from .data import (AugmentConfig, BadFileTracker, PretrainDataset, ResumableSampler, iters_per_epoch,
                   parse_bad_files, worker_init)
from .distributed import DistEnv, all_reduce_sum, barrier
from .models import FCMAE
from .monitor import BAD_FILES_FILE, Monitor, run_info
from .runlock import RunLock

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """Raised on every rank when the loss or a gradient is NaN or infinite."""


class TrainingSetupError(ValueError):
    """Raised when the config cannot produce a single optimizer step on this data."""


@dataclass
class TrainResult:
    status: str                 # "completed" or "interrupted"
    step: int
    total_steps: int
    epoch: int
    loss: float | None
    output_dir: str


@dataclass
class Position:
    """Where training stands: optimizer steps done and the next micro-batch to load."""
    step: int = 0
    epoch: int = 0
    iter_in_epoch: int = 0
    samples_seen: int = 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    """Pretrain one FCMAE for `config` on the ranks described by `env`.

    `stop_requested` is polled at every optimizer-step boundary; when any rank sees it
    return True, all ranks stop together after rank 0 has written a checkpoint.
    """

    def __init__(self, config: PretrainConfig, env: DistEnv,
                 stop_requested: Callable[[], bool] | None = None):
        self.cfg = config
        self.env = env
        self.stop_requested = stop_requested or (lambda: False)
        self.output_dir = Path(config.output_dir)
        self.position = Position()
        self.checkpoints = CheckpointManager(self.output_dir, keep_last=config.keep_last)
        self._last_save_time = time.monotonic()
        self._build()

    # ----------------------------------------------------------------- set-up
    def _build(self) -> None:
        cfg, env = self.cfg, self.env
        seed_everything(cfg.seed)
        paths = cfg.check_data()

        augment = AugmentConfig(cfg.input_size, cfg.patch_size, cfg.mask_ratio, cfg.seed)
        self.dataset = PretrainDataset(paths, augment, repeat=cfg.effective_repeat(), report_bad_files=True)
        self.bad_files = BadFileTracker(len(paths), cfg.max_bad_fraction)
        self._pending_bad_files: list[tuple[str, str]] = []
        self.iters_per_epoch = iters_per_epoch(len(self.dataset), cfg.batch_size, env.world_size, cfg.update_freq)
        if self.iters_per_epoch == 0:
            raise TrainingSetupError(
                f"{len(self.dataset)} samples per epoch cannot fill one effective batch of "
                f"{self.effective_batch} (batch_size {cfg.batch_size} x update_freq {cfg.update_freq} x "
                f"{env.world_size} ranks); lower --batch_size or --update_freq, or raise --data_repeat")
        self.steps_per_epoch = self.iters_per_epoch // cfg.update_freq
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.warmup_steps = self.steps_per_epoch * cfg.warmup_epochs
        self.base_lr = cfg.lr if cfg.lr is not None else optim.scaled_lr(cfg.blr, self.effective_batch)

        self.sampler = ResumableSampler(len(self.dataset), cfg.batch_size, env.world_size, env.rank,
                                        cfg.seed, self.iters_per_epoch)
        self.loader = DataLoader(self.dataset, batch_size=cfg.batch_size, sampler=self.sampler,
                                 num_workers=cfg.num_workers, worker_init_fn=worker_init,
                                 pin_memory=env.device.type == "cuda", drop_last=False)

        self.model = FCMAE(cfg.model, input_size=cfg.input_size, mask_ratio=cfg.mask_ratio,
                           patch_size=cfg.patch_size, in_chans=cfg.in_chans, decoder_dim=cfg.decoder_dim,
                           decoder_depth=cfg.decoder_depth, encoder_impl=cfg.encoder_impl).to(env.device)
        if cfg.channels_last and cfg.encoder_impl == "dense":
            # The sparse encoder multiplies reshaped weights, whose gradients come back contiguous:
            # channels_last parameters would then mismatch DDP's gradient buckets.
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = optim.build_optimizer(self.model, self.base_lr, cfg.weight_decay, cfg.betas)
        self.ddp = DistributedDataParallel(self.model) if env.distributed else None
        # The compiled module shares parameters with self.model, which stays the one saved.
        self.forward_module = self.ddp if self.ddp is not None else self.model
        if cfg.compile:
            self.forward_module = torch.compile(self.forward_module)

    @property
    def effective_batch(self) -> int:
        return self.cfg.batch_size * self.cfg.update_freq * self.env.world_size

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.position.step,
            "epoch": self.position.epoch,
            "iter_in_epoch": self.position.iter_in_epoch,
            "samples_seen": self.position.samples_seen,
            "total_steps": self.total_steps,
            "world_size": self.env.world_size,
            "config": self.cfg.to_dict(),
            "bad_files": self.bad_files.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])},
            "last_loss": self.monitor.last_loss if hasattr(self, "monitor") else None,
        }

    def save_checkpoint(self, reason: str) -> None:
        """Rank 0 writes a checkpoint of the current position; every rank waits for it.

        A failed save (disk full, permission denied) raises on every rank, not only on
        rank 0, so no rank is left waiting in a collective.
        """
        error = None
        if self.env.is_main:
            try:
                path = self.checkpoints.save(self.state_dict(), self.position.step)
                logger.info("saved checkpoint %s (%s) at step %d, epoch %d", path, reason, self.position.step,
                            self.position.epoch)
            except CheckpointError as caught:
                error = caught
        failed = all_reduce_sum(torch.tensor([float(error is not None)], device=self.env.device), self.env)
        self._last_save_time = time.monotonic()
        if error is not None:
            raise error
        if failed.item() > 0:
            raise CheckpointError(f"rank 0 failed to write the checkpoint of step {self.position.step}; "
                                  f"see its log")

    def try_resume(self) -> bool:
        """Load the newest readable checkpoint of the output folder, if any."""
        found = self.checkpoints.load_latest()
        if found is None:
            return False
        state, path = found
        if state.get("world_size") != self.env.world_size:
            logger.warning("checkpoint %s was written with world size %s, resuming with %d: the remaining data "
                           "order differs from an uninterrupted run", path, state.get("world_size"),
                           self.env.world_size)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.position = Position(state["step"], state["epoch"], state["iter_in_epoch"], state["samples_seen"])
        self.bad_files.load_state_dict(state.get("bad_files", {}))
        torch.set_rng_state(state["rng"]["torch"])
        self._resumed_loss = state.get("last_loss")
        logger.info("resumed from %s at step %d/%d (epoch %d, micro-batch %d)", path, self.position.step,
                    self.total_steps, self.position.epoch, self.position.iter_in_epoch)
        return True

    def _periodic_save_due(self, step: int) -> bool:
        """Check whether a periodic checkpoint is due after optimizer step `step`, by this rank's clock."""
        cfg = self.cfg
        if step >= self.total_steps:
            return False
        if cfg.save_every_steps and step % cfg.save_every_steps == 0:
            return True
        minutes = (time.monotonic() - self._last_save_time) / 60
        return cfg.save_every_minutes > 0 and minutes >= cfg.save_every_minutes

    # --------------------------------------------------------------- training
    def run(self) -> TrainResult:
        """Train to the end or until a stop is requested; rank 0 holds the run folder's lock."""
        lock = RunLock(self.output_dir) if self.env.is_main else contextlib.nullcontext()
        with lock:
            barrier(self.env)
            return self._run()

    def _run(self) -> TrainResult:
        resumed = self.try_resume()
        if self.env.is_main:
            save_config(self.cfg, self.output_dir)
            run_info(self.output_dir, self.env.world_size, resumed)
        self.monitor = Monitor(self.cfg, self.env, self.total_steps, self.position.samples_seen,
                               self.effective_batch, resumed, bad_files=len(self.bad_files))
        if resumed:
            self.monitor.last_loss = getattr(self, "_resumed_loss", None)
        else:
            self.monitor.begin(self.model, self.position)
        logger.info("training %s for %d epochs = %d steps (%d per epoch), effective batch %d, lr %.3g, "
                    "%d ranks on %s", self.cfg.model, self.cfg.epochs, self.total_steps, self.steps_per_epoch,
                    self.effective_batch, self.base_lr, self.env.world_size, self.env.device)

        status = "completed"
        while self.position.epoch < self.cfg.epochs:
            if not self._train_epoch():
                status = "interrupted"
                break
            self.monitor.end_epoch(self.model, self.dataset, self.position)

        if status == "completed":
            self._finish()
        self.monitor.close()
        return TrainResult(status, self.position.step, self.total_steps, self.position.epoch,
                           self.monitor.last_loss, str(self.output_dir))

    def _train_epoch(self) -> bool:
        """Train from the current position to the end of its epoch; False when stopped early."""
        cfg, pos = self.cfg, self.position
        self.model.train()
        self.sampler.set_position(pos.epoch, pos.iter_in_epoch)
        loss_sum = torch.zeros((), device=self.env.device)

        for i, (images, mask, _, bad_files) in enumerate(self.loader, start=pos.iter_in_epoch):
            self._pending_bad_files.extend(parse_bad_files(bad_files))
            images = images.to(self.env.device, non_blocking=True)
            if cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            mask = mask.to(self.env.device, non_blocking=True)
            boundary = (i + 1) % cfg.update_freq == 0
            loss_sum += self._forward_backward(images, mask, sync=boundary)
            if not boundary:
                continue

            stop, save_due = self._optimizer_step(loss_sum / cfg.update_freq, iter_in_epoch=i + 1)
            loss_sum = torch.zeros((), device=self.env.device)
            if stop:
                self.save_checkpoint("stop requested")
                return False
            if save_due:
                self.save_checkpoint("periodic")

        pos.epoch += 1
        pos.iter_in_epoch = 0
        return True

    def _forward_backward(self, images: torch.Tensor, mask: torch.Tensor, sync: bool) -> torch.Tensor:
        no_sync = self.ddp.no_sync() if (self.ddp is not None and not sync) else contextlib.nullcontext()
        autocast = torch.autocast(self.env.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16)
        with no_sync:
            with autocast:
                loss, _, _ = self.forward_module(images, mask)
            (loss / self.cfg.update_freq).backward()
        return loss.detach().float()

    def _optimizer_step(self, loss: torch.Tensor, iter_in_epoch: int) -> tuple[bool, bool]:
        """Check numerics, the stop flag and the save clock on all ranks together, then step.

        Returns (stop, save): whether to stop after this step, and whether a periodic
        checkpoint is due. Both are agreed by all-reduce so every rank takes the same branch.
        """
        cfg, pos = self.cfg, self.position
        max_norm = cfg.clip_grad if cfg.clip_grad else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)

        non_finite = (~torch.isfinite(loss)).float() + (~torch.isfinite(grad_norm)).float()
        local = torch.tensor([float(self.stop_requested()), float(self._periodic_save_due(pos.step + 1)),
                              float(len(self._pending_bad_files))], device=loss.device)
        flags = torch.cat([loss.reshape(1), non_finite.reshape(1), local])
        all_reduce_sum(flags, self.env)
        mean_loss, non_finite = flags[0].item() / self.env.world_size, flags[1].item()
        stop, save_due = flags[2].item() > 0, flags[3].item() > 0
        if flags[4].item() > 0:
            self._record_bad_files()
        if non_finite:
            self._raise_non_finite(mean_loss)

        lr = optim.lr_at_step(pos.step, self.total_steps, self.warmup_steps, self.base_lr, cfg.min_lr)
        optim.set_lr(self.optimizer, lr)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

        pos.step += 1
        pos.iter_in_epoch = iter_in_epoch
        pos.samples_seen += self.effective_batch
        self.monitor.log_step(pos, mean_loss, lr)
        return stop, save_due

    def _record_bad_files(self) -> None:
        """Gather the files that failed to decode on any rank since the last step, report new ones, check the limit.

        Every rank receives every report, so all ranks hold the same tracker and raise together.
        """
        pending, self._pending_bad_files = self._pending_bad_files, []
        if self.env.distributed:
            gathered = [None] * self.env.world_size
            torch.distributed.all_gather_object(gathered, pending)
            pending = [pair for part in gathered for pair in part]
        new = self.bad_files.add(pending)
        self.monitor.report_bad_files(new, self.bad_files, self.position)
        self.bad_files.check(self.output_dir / BAD_FILES_FILE)

    def _raise_non_finite(self, loss: float) -> None:
        last = self.checkpoints.last_path
        kept = f"the last good checkpoint {last} is kept" if last.exists() else "no checkpoint was written yet"
        raise NonFiniteLossError(f"non-finite loss or gradient at step {self.position.step + 1} "
                                 f"(mean loss {loss}); {kept}. Lower the learning rate, enable --clip_grad, "
                                 f"or check the data, then resume")

    def _finish(self) -> None:
        self.save_checkpoint("final")
        if self.env.is_main:
            path = export_encoder(self.model.encoder.timm_state_dict(), self.output_dir)
            logger.info("training finished at step %d; encoder weights (timm keys) in %s", self.position.step,
                        path)
            summary = {"status": "completed", "step": self.position.step, "epochs": self.position.epoch,
                       "final_loss": self.monitor.last_loss, "samples_seen": self.position.samples_seen}
            (self.output_dir / "final_metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
        barrier(self.env)


def format_eta(seconds: float) -> str:
    return str(timedelta(seconds=int(max(0.0, seconds))))
