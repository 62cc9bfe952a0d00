"""Sweeps: expansion and validation, and the smoke sweep on the real local Slurm cluster."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fcmae.data import sample_image_paths
from sweeps.launcher import sweep_status
from sweeps.spec import SweepError, SweepSpec

ROOT = Path(__file__).resolve().parent.parent
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "run_with_submitit.py"), "sweep", *args],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_capacity_dry_run_lists_48_members(tmp_path):
    result = cli("launch", str(ROOT / "sweeps" / "capacity.yaml"), "--sweep_dir", str(tmp_path / "cap"),
                 "--dry_run")
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith("convnext")]
    assert len(rows) == 48
    assert len({row[0] for row in rows}) == 48
    assert "convnextv2_pico-mr0.60" in {row[0] for row in rows}
    assert "48 members, 48 to submit" in result.stdout
    assert {row[3] for row in rows} == {"800"}       # epochs
    assert {row[4] for row in rows} == {"4096"}      # effective batch
    assert {row[5] for row in rows} == {"2.40e-03"}  # blr 1.5e-4 x 4096 / 256
    assert not (tmp_path / "cap").exists()


def test_dry_run_shows_seeds_and_absolute_lr(tmp_path):
    sweep_file = ROOT / "results" / "capacity_probe_30ep_seeds" / "sweep.yaml"
    result = cli("launch", str(sweep_file), "--sweep_dir", str(tmp_path / "seeds"), "--dry_run")
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith("convnext")]
    assert [row[0] for row in rows[:3]] == ["convnext_atto-seed0", "convnext_atto-seed1", "convnext_atto-seed2"]
    assert len(rows) == 12
    assert {(row[3], row[4], row[5]) for row in rows} == {("30", "32", "1.50e-03")}


def test_member_folders_are_distinct_and_named_from_parameters(tmp_path):
    members = SweepSpec.load(ROOT / "sweeps" / "capacity.yaml").members(tmp_path, check_data=False)
    folders = {m.config.output_dir for m in members}
    assert len(folders) == 48
    base = next(m for m in members if m.name == "convnextv2_base-mr0.75")
    assert base.config.batch_size * base.config.update_freq * base.resources.nodes * base.resources.tasks_per_node \
        == 4096
    assert base.resources.timeout_min == 8640


def test_paper_recipe_sweep_has_effective_batch_4096(tmp_path):
    members = SweepSpec.load(ROOT / "sweeps" / "atto_v1_vs_v2.yaml").members(tmp_path, check_data=False)
    assert [m.name for m in members] == ["convnext_atto", "convnextv2_atto"]
    for m in members:
        effective = m.config.batch_size * m.config.update_freq * m.resources.nodes * m.resources.tasks_per_node
        assert effective == 4096
        assert (m.config.epochs, m.config.warmup_epochs, m.config.blr, m.config.mask_ratio,
                m.config.input_size) == (800, 40, 1.5e-4, 0.6, 224)


def write_sweep(path: Path, **sections) -> Path:
    path.write_text(yaml.safe_dump(sections))
    return path


@pytest.mark.parametrize("sections, message", [
    ({"grid": {"mask_ratio": [0.5, 1.5]}}, "member convnextv2_atto-mr1.50: invalid --mask_ratio 1.5"),
    ({"grid": {"model": ["convnext_atto", "convnext_giant"]}}, "member convnext_giant: invalid --model"),
    ({"grids": {"model": ["convnext_atto"]}}, "unknown key(s) grids"),
    ({"zip": {"seed": [1, 2], "blr": [1e-4]}}, "zip axes must have equal lengths"),
    ({"grid": {"mask_ratio": []}}, "must be a non-empty list"),
])
def test_bad_sweep_file_fails_launch_naming_the_member(tmp_path, sections, message):
    path = write_sweep(tmp_path / "bad.yaml", name="bad", base={"data": "sample"}, **sections)
    with pytest.raises(SweepError) as error:
        SweepSpec.load(path).members(tmp_path / "sweep")
    assert message in str(error.value)

    result = cli("launch", str(path), "--sweep_dir", str(tmp_path / "sweep"))
    assert result.returncode == 2
    assert message in result.stderr
    assert not (tmp_path / "sweep").exists()


def test_grid_and_zip_combine(tmp_path):
    path = write_sweep(tmp_path / "s.yaml", name="s", base={"data": "sample", "input_size": 64},
                       grid={"model": ["convnext_atto", "convnextv2_atto"]},
                       zip={"mask_ratio": [0.5, 0.75], "seed": [1, 2]})
    names = [m.name for m in SweepSpec.load(path).members(tmp_path / "sweep")]
    assert names == ["convnext_atto-mr0.50-seed1", "convnext_atto-mr0.75-seed2",
                     "convnextv2_atto-mr0.50-seed1", "convnextv2_atto-mr0.75-seed2"]


def wait_all_final(sweep_dir: Path, timeout: float = 600) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = sweep_status(sweep_dir)
        if all(r["state"] in FINAL for r in records):
            return records
        time.sleep(3)
    raise AssertionError(f"sweep {sweep_dir} did not finish in {timeout} s: {records}")


@pytest.mark.slurm
@pytest.mark.slow
def test_smoke_sweep_failure_status_resume_and_relaunch(tmp_path):
    femto_data = tmp_path / "femto_photos"
    femto_data.mkdir()
    for path in sample_image_paths():
        shutil.copy(path, femto_data / path.name)
    smoke = yaml.safe_load((ROOT / "sweeps" / "smoke.yaml").read_text())
    smoke["config_by_size"] = {"femto": {"data": str(femto_data)}}
    sweep_file = write_sweep(tmp_path / "smoke.yaml", **smoke)
    sweep_dir = tmp_path / "sweep"

    launched = cli("launch", str(sweep_file), "--sweep_dir", str(sweep_dir), "--array_parallelism", "4")
    assert launched.returncode == 0, launched.stderr
    shutil.rmtree(femto_data)                   # the femto members now fail when they start
    assert "8 members, 8 submitted" in launched.stdout
    manifest = json.loads((sweep_dir / "manifest.json").read_text())
    assert len(manifest["members"]) == 8
    assert all(e["job_id"] and e["config_hash"] for e in manifest["members"].values())

    records = {r["name"]: r for r in wait_all_final(sweep_dir)}
    failed = sorted(n for n, r in records.items() if r["state"] != "COMPLETED")
    assert failed == ["convnext_femto-mr0.50", "convnext_femto-mr0.75", "convnextv2_femto-mr0.50",
                      "convnextv2_femto-mr0.75"]
    reason = records["convnext_femto-mr0.50"]["reason"]
    # The folder vanishes before the job starts (missing data path) or while it loads (no decodable file).
    assert "does not exist" in reason or "could be decoded" in reason, reason
    assert "log:" in reason
    table = cli("status", str(sweep_dir)).stdout
    assert "reason: exit" in table and "4 COMPLETED, 4 FAILED (8 members)" in table

    femto_data.mkdir()
    for path in sample_image_paths():
        shutil.copy(path, femto_data / path.name)
    again = cli("launch", str(sweep_file), "--sweep_dir", str(sweep_dir))
    assert again.returncode == 0, again.stderr
    assert "0 submitted, 8 already submitted" in again.stdout
    before = {n: r["job_id"] for n, r in records.items()}
    resumed = cli("resume", str(sweep_dir))
    assert resumed.returncode == 0, resumed.stderr
    assert "resubmitted 4 member(s)" in resumed.stdout

    records = {r["name"]: r for r in wait_all_final(sweep_dir)}
    assert all(r["state"] == "COMPLETED" for r in records.values()), records
    changed = sorted(n for n in records if records[n]["job_id"] != before[n])
    assert changed == failed
    assert (sweep_dir / "convnext_atto-mr0.50" / "encoder.pth").exists()
    json_status = json.loads(cli("status", str(sweep_dir), "--format", "json").stdout)
    assert {r["name"] for r in json_status} == set(records)

    # The aggregation job submitted by resume runs after every member and writes the report.
    report = sweep_dir / "report.md"
    deadline = time.monotonic() + 300
    while not report.exists() and time.monotonic() < deadline:
        time.sleep(3)
    assert report.exists(), "the aggregation job wrote no report.md"
    assert all(name in report.read_text() for name in records)
    assert (sweep_dir / "convnextv2_femto-mr0.75" / "analysis" / "cosine_distance.csv").exists()
