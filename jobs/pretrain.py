"""The pretraining job: a submitit Checkpointable that runs the fcmae Trainer."""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from pathlib import Path

import submitit
import torch

from fcmae.config import PretrainConfig
from fcmae.distributed import destroy, init_distributed
from fcmae.logs import configure_logging
from fcmae.training import Trainer

logger = logging.getLogger(__name__)


def export_distributed_env() -> int:
    """Export RANK, WORLD_SIZE, MASTER_ADDR, ... from submitit's job environment; return the rank."""
    env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    return env.rank


class PretrainJob(submitit.helpers.Checkpointable):
    """Run (or resume) one FCMAE pretraining; the state lives in the run's checkpoints.

    The pickled job holds only the config, so a requeued job starts from the newest
    checkpoint in the output folder with no new arguments.
    """

    def __init__(self, config: dict, threads: int | None = None):
        self.config = dict(config)
        self.threads = threads
        self._stop = threading.Event()

    def __call__(self) -> dict:
        cfg = PretrainConfig.from_dict(self.config)
        rank = export_distributed_env()
        configure_logging(rank, Path(cfg.output_dir) / "logs")
        threads = int(os.environ.get("SLURM_CPUS_PER_TASK", self.threads or torch.get_num_threads()))
        torch.set_num_threads(max(1, threads))
        cfg.validate(check_data=True)

        env = init_distributed(cfg.device)
        try:
            result = Trainer(cfg, env, stop_requested=self._stop.is_set).run()
        finally:
            destroy(env)
        return dataclasses.asdict(result)

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """Return a fresh job with the same config; it resumes from the newest checkpoint."""
        self._stop.set()
        return submitit.helpers.DelayedSubmission(PretrainJob(self.config, self.threads))

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_stop", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._stop = threading.Event()
