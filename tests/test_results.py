"""The committed reproduction results: their figures are redrawn from their CSV tables alone."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "results"
EXPERIMENTS = ("atto_v1_v2", "atto_v1_v2_seed1", "capacity_probe_30ep", "capacity_probe",
               "capacity_probe_30ep_seeds")
TABLES = ("summary.csv", "layer_distances.csv", "collapse_history.csv")
MAX_PIXEL_CHANGE = 0.1     # in [0, 1] per channel
MAX_CHANGED_SHARE = 5e-4   # of the pixels of one figure


def read_rows(path: Path) -> list[dict]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


@pytest.fixture(scope="module")
def replotted(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """Copy only the CSV files of results/ and run 'python -m analysis replot' on the copy."""
    copy = tmp_path_factory.mktemp("results")
    for experiment in EXPERIMENTS:
        (copy / experiment).mkdir()
        for name in TABLES:
            shutil.copy(RESULTS / experiment / name, copy / experiment / name)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "analysis", "replot", str(copy)], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    return copy, result


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_results_redraw_committed_figures(replotted, experiment):
    copy, result = replotted
    assert result.returncode == 0, result.stderr

    redrawn = sorted(path.name for path in (copy / experiment / "figures").glob("*.png"))
    committed = sorted(path.name for path in (RESULTS / experiment / "figures").glob("*.png"))
    assert redrawn == committed
    assert "distance_per_layer.png" in redrawn
    assert "init_vs_trained.png" in redrawn


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_results_figures_match_their_tables(replotted, experiment):
    # Pixels rather than bytes, because PNG metadata names the matplotlib version.
    # A moved data point changes thousands of pixels. Other library versions may shift
    # anti-aliasing slightly, so a small share of changed pixels is allowed.
    copy, result = replotted
    assert result.returncode == 0, result.stderr

    for committed in sorted((RESULTS / experiment / "figures").glob("*.png")):
        expected = plt.imread(committed)
        drawn = plt.imread(copy / experiment / "figures" / committed.name)
        assert drawn.shape == expected.shape, committed.name
        changed = float((np.abs(drawn - expected).max(axis=-1) > MAX_PIXEL_CHANGE).mean())
        assert changed <= MAX_CHANGED_SHARE, (
            f"{committed} differs from the figure its CSV files give ({changed:.2%} of pixels); "
            f"run '.venv/bin/python -m analysis replot results' and commit the figures")


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_results_tables_cover_v1_and_v2(experiment):
    summary = read_rows(RESULTS / experiment / "summary.csv")
    layers = read_rows(RESULTS / experiment / "layer_distances.csv")

    assert {row["version"] for row in summary} == {"v1", "v2"}
    assert all(row["status"] == "analysed" for row in summary)
    for row in summary:
        member_layers = [layer for layer in layers if layer["member"] == row["member"]]
        assert len(member_layers) == int(row["num_layers"])


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_results_record_commands_and_wall_time(experiment):
    folder = RESULTS / experiment
    runs = read_rows(folder / "runs.csv")
    summary = read_rows(folder / "summary.csv")

    assert (folder / "run.sh").is_file()
    assert sorted(row["member"] for row in runs) == sorted(row["member"] for row in summary)
    assert all(float(row["wall_min"]) > 0 for row in runs)


@pytest.mark.parametrize("experiment", ("capacity_probe_30ep", "capacity_probe"))
def test_capacity_probe_uses_equal_steps(experiment):
    runs = read_rows(RESULTS / experiment / "runs.csv")
    assert len({row["steps"] for row in runs}) == 1
    assert {row["model"].split("_")[1] for row in runs} == {"atto", "pico", "nano"}


def test_seed_probe_has_three_seeds_per_setting():
    summary = read_rows(RESULTS / "capacity_probe_30ep_seeds" / "summary.csv")
    seeds = {}
    for row in summary:
        seeds.setdefault(row["model"], set()).add(int(row["seed"]))
    assert sorted(seeds) == ["convnext_atto", "convnext_pico", "convnextv2_atto", "convnextv2_pico"]
    assert all(found == {0, 1, 2} for found in seeds.values())


def test_heldout_table_covers_every_run_and_layer():
    folder = RESULTS / "capacity_probe_30ep_seeds"
    summary = read_rows(folder / "summary.csv")
    heldout = read_rows(folder / "heldout" / "cosine_distance.csv")
    trained = read_rows(folder / "layer_distances.csv")

    for row in summary:
        layers = [layer for layer in heldout if layer["run"] == row["member"]]
        assert len(layers) == int(row["num_layers"]), row["member"]
    # Other images give other distances; equal numbers would mean the training photos were measured again.
    assert {(row["member"], row["layer"], row["distance"]) for row in trained}.isdisjoint(
        {(row["run"], row["layer"], row["distance"]) for row in heldout})
