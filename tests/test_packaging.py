"""Packaging: environment.yml and pyproject.toml list the same dependencies."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
# conda-forge names that differ from the PyPI names.
CONDA_TO_PYPI = {"pytorch": "torch"}


def requirement_name(spec: str) -> str:
    return re.split(r"[<>=!~ \[]", spec.strip(), maxsplit=1)[0].lower()


def test_environment_lists_pyproject_dependencies():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {requirement_name(s) for s in project["dependencies"] + project["optional-dependencies"]["dev"]}

    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = [d for d in environment["dependencies"] if isinstance(d, str)]
    listed = {CONDA_TO_PYPI.get(requirement_name(d), requirement_name(d)) for d in conda}
    listed -= {"python", "pip"}
    assert listed == wanted

    pip_section = next(d["pip"] for d in environment["dependencies"] if isinstance(d, dict))
    assert "-e ." in pip_section
    assert environment["channels"] == ["conda-forge", "nodefaults"]


def test_library_does_not_import_cluster_or_cli_code():
    pattern = re.compile(r"^\s*(from|import)\s+(jobs|sweeps|analysis|submitit)\b", re.MULTILINE)
    offenders = [p.name for p in (ROOT / "fcmae").glob("*.py") if pattern.search(p.read_text())]
    assert offenders == []
