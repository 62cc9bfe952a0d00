"""Distributed environment variables from submitit's job environment, fixed for Slurm quirks."""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess

import submitit

logger = logging.getLogger(__name__)


def export_distributed_env() -> int:
    """Export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT; return the global rank.

    submitit takes MASTER_ADDR from the first node name of the allocation. Where that name
    does not resolve (node names that are only Slurm labels), the node's address from
    `scontrol show node` is used instead.
    """
    env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    address = resolvable_address(env.master_addr)
    if address != env.master_addr:
        logger.info("master node %s does not resolve; using its Slurm address %s", env.master_addr, address)
        os.environ["MASTER_ADDR"] = address
    return env.rank


def resolvable_address(node: str) -> str:
    try:
        socket.getaddrinfo(node, None)
        return node
    except socket.gaierror:
        pass
    address = slurm_node_address(node)
    if address is None:
        raise RuntimeError(f"master node name {node!r} does not resolve and Slurm reports no NodeAddr for it; "
                           f"set MASTER_ADDR in the job environment")
    return address


def slurm_node_address(node: str) -> str | None:
    if not shutil.which("scontrol"):
        return None
    try:
        output = subprocess.run(["scontrol", "show", "node", node, "-o"], capture_output=True, text=True,
                                timeout=30, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return None
    match = re.search(r"\bNodeAddr=(\S+)", output)
    return match.group(1) if match else None
