"""Build submitit executors for Slurm, the local machine or in-process debugging."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import submitit

CLUSTERS = ("auto", "slurm", "local", "debug")


class LaunchError(ValueError):
    """Raised for launcher options that cannot work; the message names the option and the fix."""


@dataclass
class Resources:
    """What one job asks the scheduler for. Slurm-only fields are ignored elsewhere."""

    nodes: int = 1
    tasks_per_node: int = 1
    cpus_per_task: int = 2
    gpus_per_node: int = 0
    mem_gb: float | None = None
    timeout_min: int = 60
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    signal_delay_s: int = 120
    max_requeues: int = 100
    additional_parameters: dict = field(default_factory=dict)

    def validate(self) -> None:
        for name in ("nodes", "tasks_per_node", "cpus_per_task", "timeout_min"):
            if getattr(self, name) < 1:
                raise LaunchError(f"invalid --{name} {getattr(self, name)}: it must be at least 1")
        if self.gpus_per_node < 0:
            raise LaunchError(f"invalid --gpus_per_node {self.gpus_per_node}: it must not be negative")
        if self.max_requeues < 0:
            raise LaunchError(f"invalid --max_requeues {self.max_requeues}: it must not be negative")
        if self.signal_delay_s < 0:
            raise LaunchError(f"invalid --signal_delay_s {self.signal_delay_s}: it must not be negative")

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node


def slurm_reachable() -> bool:
    """Check that the Slurm client is installed and a controller responds to `sinfo`."""
    if not shutil.which("sbatch") or not shutil.which("sinfo"):
        return False
    try:
        return subprocess.run(["sinfo", "--noheader"], capture_output=True, timeout=20).returncode == 0
    except (subprocess.SubprocessError, OSError):
        return False


def resolve_cluster(cluster: str) -> str:
    """Map 'auto' to 'slurm' when a Slurm controller responds, else to 'local'."""
    if cluster not in CLUSTERS:
        raise LaunchError(f"invalid --cluster {cluster!r}; valid values: {', '.join(CLUSTERS)}")
    if cluster == "auto":
        return "slurm" if slurm_reachable() else "local"
    if cluster == "slurm" and not slurm_reachable():
        raise LaunchError("--cluster slurm needs the Slurm client (sbatch) on PATH and a controller that responds to "
                          "`sinfo` (check SLURM_CONF); run on a login node or use --cluster local")
    return cluster


def check_local_resources(cluster: str, resources: Resources) -> None:
    """Reject requests the local machine cannot serve, before anything is submitted."""
    if cluster not in ("local", "debug"):
        return
    if resources.nodes != 1:
        raise LaunchError(f"invalid --nodes {resources.nodes} with --cluster {cluster}: a local job runs on "
                          f"one node; use --tasks_per_node for several processes or --cluster slurm")
    if resources.gpus_per_node:
        import torch

        available = torch.cuda.device_count()
        if resources.gpus_per_node > available:
            raise LaunchError(f"invalid --gpus_per_node {resources.gpus_per_node} with --cluster {cluster}: "
                              f"this machine has {available} GPU(s); use --gpus_per_node {available} or "
                              f"--cluster slurm")


def make_executor(cluster: str, folder: str | Path, name: str, resources: Resources) -> submitit.AutoExecutor:
    """Return a configured executor; `cluster` must already be resolved (not 'auto')."""
    resources.validate()
    check_local_resources(cluster, resources)
    # submitit counts time-limit requeues against slurm_max_num_timeout; PretrainJob bounds all of them.
    extra = {"slurm_max_num_timeout": resources.max_requeues} if cluster == "slurm" else {}
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster, **extra)
    executor.update_parameters(
        name=name,
        nodes=resources.nodes,
        tasks_per_node=resources.tasks_per_node,
        cpus_per_task=resources.cpus_per_task,
        timeout_min=resources.timeout_min,
    )
    if resources.gpus_per_node:
        executor.update_parameters(gpus_per_node=resources.gpus_per_node)
    if resources.mem_gb is not None:
        executor.update_parameters(mem_gb=resources.mem_gb)
    if cluster == "slurm":
        executor.update_parameters(**slurm_parameters(resources))
    return executor


def slurm_parameters(resources: Resources) -> dict:
    params = {"slurm_signal_delay_s": resources.signal_delay_s}
    for key in ("partition", "account", "qos", "constraint"):
        value = getattr(resources, key)
        if value:
            params[f"slurm_{key}"] = value
    if resources.additional_parameters:
        params["slurm_additional_parameters"] = dict(resources.additional_parameters)
    return params
