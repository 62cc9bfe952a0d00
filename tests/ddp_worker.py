"""Entry point for spawned DDP test ranks (importable by torch.multiprocessing's spawn)."""

from __future__ import annotations

import os

import torch


def run_rank(rank: int, world_size: int, port: int, config: dict) -> None:
    """Join a gloo group on loopback and train `config` as one rank."""
    from fcmae.config import PretrainConfig
    from fcmae.distributed import destroy, init_distributed
    from fcmae.training import Trainer

    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    env = init_distributed("cpu")
    try:
        Trainer(PretrainConfig.from_dict(config), env).run()
    finally:
        destroy(env)
