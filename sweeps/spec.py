"""Sweep files: a base pretraining config plus axes, expanded into named members.

A sweep file is YAML:

    name: capacity
    base: {data: /datasets/imagenet/train, epochs: 800, ...}    # any PretrainConfig option
    resources: {partition: gpu, timeout_min: 2880}               # any launch resource
    grid: {model: [convnext_atto, convnextv2_atto], mask_ratio: [0.5, 0.6]}   # cartesian product
    zip: {blr: [1e-4, 2e-4], warmup_epochs: [10, 40]}            # paired values, optional
    config_by_size: {base: {batch_size: 64, update_freq: 2}}     # per encoder size, optional
    resources_by_size: {base: {nodes: 4, gpus_per_node: 8}}     # per encoder size, optional

Members are the grid product times the zipped tuples; each gets a stable, readable name
from its varying values (e.g. `convnextv2_pico-mr0.60`) and its own output folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from fcmae.config import ConfigError, PretrainConfig
from fcmae.registry import model_size
from jobs.executor import LaunchError, Resources

SWEEP_KEYS = {"name", "base", "resources", "grid", "zip", "config_by_size", "resources_by_size"}
# Short labels for common options in member names; other options appear as name=value.
NAME_LABELS = {"mask_ratio": "mr", "input_size": "px", "epochs": "ep", "blr": "blr", "seed": "seed",
               "batch_size": "bs", "decoder_dim": "dd", "decoder_depth": "ddep"}


class SweepError(ValueError):
    """Raised for an invalid sweep file or member; the message names the member or key."""


@dataclass
class Member:
    name: str
    config: PretrainConfig
    resources: Resources

    @property
    def config_hash(self) -> str:
        return config_hash(self.config)


def config_hash(config: PretrainConfig) -> str:
    """Hash of the options that change what a run computes (output folder excluded)."""
    values = {k: v for k, v in config.to_dict().items() if k != "output_dir"}
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class SweepSpec:
    name: str
    base: dict
    resources: dict
    grid: dict
    zipped: dict
    config_by_size: dict
    resources_by_size: dict

    @classmethod
    def load(cls, path: str | Path) -> "SweepSpec":
        path = Path(path)
        if not path.is_file():
            raise SweepError(f"sweep file {str(path)!r} does not exist")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise SweepError(f"sweep file {path} must hold a mapping with keys {', '.join(sorted(SWEEP_KEYS))}")
        unknown = sorted(set(raw) - SWEEP_KEYS)
        if unknown:
            raise SweepError(f"sweep file {path}: unknown key(s) {', '.join(unknown)}; valid keys: "
                             f"{', '.join(sorted(SWEEP_KEYS))}")
        spec = cls(name=str(raw.get("name") or path.stem), base=dict(raw.get("base") or {}),
                   resources=dict(raw.get("resources") or {}), grid=dict(raw.get("grid") or {}),
                   zipped=dict(raw.get("zip") or {}), config_by_size=dict(raw.get("config_by_size") or {}),
                   resources_by_size=dict(raw.get("resources_by_size") or {}))
        spec._check_axes(path)
        return spec

    def _check_axes(self, path: Path) -> None:
        for axis, values in list(self.grid.items()) + list(self.zipped.items()):
            if not isinstance(values, list) or not values:
                raise SweepError(f"sweep file {path}: axis {axis!r} must be a non-empty list, got {values!r}")
        lengths = {len(v) for v in self.zipped.values()}
        if len(lengths) > 1:
            raise SweepError(f"sweep file {path}: zip axes must have equal lengths, got "
                             f"{ {k: len(v) for k, v in self.zipped.items()} }")
        overlap = set(self.grid) & set(self.zipped)
        if overlap:
            raise SweepError(f"sweep file {path}: {', '.join(sorted(overlap))} appear in both grid and zip")

    def combinations(self) -> list[dict]:
        """Every member's overrides: the grid's cartesian product times the zipped tuples."""
        grid_keys = list(self.grid)
        grid = [dict(zip(grid_keys, values)) for values in itertools.product(*self.grid.values())]
        if self.zipped:
            count = len(next(iter(self.zipped.values())))
            pairs = [{k: v[i] for k, v in self.zipped.items()} for i in range(count)]
        else:
            pairs = [{}]
        return [{**g, **p} for g in grid for p in pairs]

    def members(self, sweep_dir: str | Path, check_data: bool = True) -> list[Member]:
        """Expand and validate every member; raises SweepError naming the first bad member.

        With check_data=False the data path is not opened (for dry runs on a machine
        without the data set); every other option is still validated.
        """
        sweep_dir = Path(sweep_dir).resolve()
        varying = [k for k in list(self.grid) + list(self.zipped)]
        members = []
        for overrides in self.combinations():
            values = {**self.base, **overrides}
            name = member_name(values, varying)
            members.append(self._member(name, values, sweep_dir, check_data))

        names = [m.name for m in members]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise SweepError(f"members share names {', '.join(duplicates)}: two axis values give the same name")
        return members

    def _member(self, name: str, values: dict, sweep_dir: Path, check_data: bool) -> Member:
        size = model_size_or_none(values.get("model", PretrainConfig.model))
        values = {**values, **self.config_by_size.get(size, {}), "output_dir": str(sweep_dir / name)}
        resources = {**self.resources, **self.resources_by_size.get(size, {})}
        try:
            config = PretrainConfig.from_dict(values)
            config.validate(check_data=check_data)
            launch = make_resources(resources)
            launch.validate()
            if check_data:
                config.check_epoch_fills_batch(len(config.check_data()), launch.world_size)
        except (ConfigError, LaunchError, TypeError) as error:
            raise SweepError(f"member {name}: {error}") from None
        return Member(name, config, launch)


def model_size_or_none(model: str) -> str | None:
    try:
        return model_size(model)
    except ValueError:
        return None


def make_resources(values: dict) -> Resources:
    known = {f.name for f in dataclasses.fields(Resources)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise LaunchError(f"unknown resource option(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    return Resources(**values)


def member_name(values: dict, varying: list[str]) -> str:
    """Build a readable name such as 'convnextv2_pico-mr0.60' from the varying options."""
    parts = [str(values.get("model", PretrainConfig.model))]
    for key in varying:
        if key == "model":
            continue
        value = values[key]
        text = f"{value:.2f}" if key == "mask_ratio" else str(value)
        label = NAME_LABELS.get(key)
        parts.append(f"{label}{text}" if label else f"{key}={text}")
    return "-".join(p.replace("/", "_").replace(" ", "_") for p in parts)
