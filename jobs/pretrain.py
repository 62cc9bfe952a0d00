"""The pretraining job: a submitit Checkpointable that runs the fcmae Trainer.

Preemption and time limits reach the job as Slurm's user signal (SIGUSR2, `--signal`).
submitit's own handler would checkpoint inside the signal handler on rank 0 only, in the
middle of a step, and exit while the other ranks wait in a collective. This job replaces
it with a handler that only sets a flag: at the next optimizer-step boundary all ranks
agree to stop, rank 0 writes a checkpoint, and only then does rank 0 hand over to
submitit's handler, which pickles a fresh job and requeues it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

import submitit
import torch

from fcmae.config import PretrainConfig
from fcmae.distributed import destroy, init_distributed
from fcmae.logs import configure_logging
from fcmae.monitor import RUN_INFO_FILE, atomic_write_json, utc_now
from fcmae.training import Trainer

from .slurm_env import export_distributed_env

logger = logging.getLogger(__name__)


class RequeueBudgetError(RuntimeError):
    """Raised when a run has been interrupted more often than its requeue budget allows."""


class PretrainJob(submitit.helpers.Checkpointable):
    """Run (or resume) one FCMAE pretraining; the state lives in the run's checkpoints.

    The pickled job holds only the config and launch settings, so a requeued job starts
    from the newest checkpoint in the output folder with no new arguments.
    """

    def __init__(self, config: dict, threads: int | None = None, timeout_min: int | None = None,
                 max_requeues: int = 100):
        self.config = dict(config)
        self.threads = threads
        self.timeout_min = timeout_min
        self.max_requeues = max_requeues
        self._stop = threading.Event()
        self._signal_time: float | None = None

    def __call__(self) -> dict:
        start = time.time()
        cfg = PretrainConfig.from_dict(self.config)
        rank = export_distributed_env()
        configure_logging(rank, Path(cfg.output_dir) / "logs")
        threads = int(os.environ.get("SLURM_CPUS_PER_TASK", self.threads or torch.get_num_threads()))
        torch.set_num_threads(max(1, threads))
        cfg.validate(check_data=True)
        user_signal, submitit_handler = self._take_over_signal()

        env = init_distributed(cfg.device)
        try:
            result = Trainer(cfg, env, stop_requested=self._stop.is_set).run()
        finally:
            destroy(env)

        if result.status == "interrupted":
            self._requeue(rank, cfg, result, start, user_signal, submitit_handler)
        return dataclasses.asdict(result)

    def _take_over_signal(self):
        """Replace submitit's user-signal handler with one that only sets the stop flag."""
        user_signal = submitit.JobEnvironment()._usr_sig()
        submitit_handler = signal.getsignal(user_signal)
        signal.signal(user_signal, self._on_signal)
        return user_signal, submitit_handler

    def _on_signal(self, signum, frame) -> None:
        if not self._stop.is_set():
            self._signal_time = time.time()
            logger.warning("received %s: stopping after the current optimizer step to checkpoint and requeue",
                           signal.Signals(signum).name)
        self._stop.set()

    def _requeue(self, rank, cfg, result, start, user_signal, submitit_handler) -> None:
        """Record the interruption, then let submitit's handler requeue the job (rank 0)."""
        cause = self._cause(start)
        interruptions = record_interruption(Path(cfg.output_dir), result.step, cause) if rank == 0 else 0
        logger.warning("interrupted by %s at step %d/%d (%s)", signal.Signals(user_signal).name, result.step,
                       result.total_steps, cause)
        if rank != 0:
            return
        if interruptions > self.max_requeues:
            raise RequeueBudgetError(f"run {cfg.output_dir} was interrupted {interruptions} times, more than "
                                     f"--max_requeues {self.max_requeues}; its checkpoint at step {result.step} is "
                                     f"kept: submit the same command again to continue")
        if callable(submitit_handler):
            submitit_handler(user_signal, None)      # checkpoint(), pickle, scontrol requeue, exit

    def _cause(self, start: float) -> str:
        """Classify the signal like submitit does: a time limit when most of the time is used up."""
        if not self.timeout_min:
            return "preemption"
        limit_s = self.timeout_min * 60
        elapsed = (self._signal_time or time.time()) - start
        return "time limit" if elapsed >= min(0.8 * limit_s, limit_s - 600) else "preemption"

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """Return a fresh job with the same settings; it resumes from the newest checkpoint."""
        self._stop.set()
        fresh = PretrainJob(self.config, self.threads, self.timeout_min, self.max_requeues)
        return submitit.helpers.DelayedSubmission(fresh)

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_stop", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._stop = threading.Event()


def record_interruption(output_dir: Path, step: int, cause: str) -> int:
    """Append an interruption to OUTPUT_DIR/run_info.json; return how many the run has had."""
    path = output_dir / RUN_INFO_FILE
    info = json.loads(path.read_text()) if path.is_file() else {}
    events = info.setdefault("interruptions", [])
    events.append({"time": utc_now(), "step": step, "cause": cause, "slurm_job_id": os.environ.get("SLURM_JOB_ID")})
    atomic_write_json(path, info)
    return len(events)
