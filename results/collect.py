"""Write the per-run facts of a results sweep folder: wall time, throughput and training curve.

Usage: python results/collect.py SWEEP_DIR DEST_DIR. Writes DEST_DIR/runs.csv (one row per
completed run), DEST_DIR/training_curves.csv (the logged steps of every run) and
DEST_DIR/machine.md with the hardware and software of this machine, which must be the one
that made the runs.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import datetime
from pathlib import Path

# Run from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.sweep import write_rows  # noqa: E402

# last_step_loss: the loss of the last step alone; last_interval_loss: its mean over the last
# --log_every steps, as the progress line shows it.
RUN_COLUMNS = ("member", "model", "host", "started", "finished", "wall_min", "steps", "samples_seen",
               "mean_images_per_s", "last_step_loss", "last_interval_loss", "code_version")
CURVE_COLUMNS = ("member", "step", "epoch", "samples_seen", "loss", "lr", "images_per_s")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_row(run: Path) -> dict:
    """Summarize one completed run from run_info.json, final_metrics.json and metrics.jsonl."""
    info = json.loads((run / "run_info.json").read_text())
    final = json.loads((run / "final_metrics.json").read_text())
    config = json.loads((run / "config.json").read_text())
    started = datetime.fromisoformat(info["starts"][0]["time"])
    # The last progress line is written at the last step; file times would change on copying.
    last_record = read_jsonl(run / "metrics.jsonl")[-1]
    finished = datetime.fromisoformat(last_record["time"])
    wall_s = (finished - started).total_seconds()
    return {"member": run.name, "model": config["model"], "host": info["starts"][0]["host"],
            "started": started.isoformat(timespec="seconds"), "finished": finished.isoformat(timespec="seconds"),
            "wall_min": round(wall_s / 60, 1), "steps": final["step"], "samples_seen": final["samples_seen"],
            "mean_images_per_s": round(final["samples_seen"] / wall_s, 1), "last_step_loss": final["final_loss"],
            "last_interval_loss": last_record["loss"],
            "code_version": info.get("code_version")}


def curve_rows(run: Path) -> list[dict]:
    return [{"member": run.name, **{column: record.get(column) for column in CURVE_COLUMNS[1:]}}
            for record in read_jsonl(run / "metrics.jsonl")]


def machine_facts() -> str:
    """Describe the CPU, memory and package versions of this machine as Markdown."""
    import matplotlib
    import timm
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    memory_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                     if line.startswith("MemTotal"))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return (f"# Machine of the runs in this folder\n\n"
            f"Written by results/collect.py (through results/export.sh) on the machine that made the runs.\n\n"
            f"- CPU: {cpu}, {os.cpu_count()} cores visible, no GPU\n"
            f"- Memory: {memory_kb / 2**20:.1f} GiB\n"
            f"- OS: {platform.platform()}\n"
            f"- Python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}, "
            f"matplotlib {matplotlib.__version__} (figures)\n"
            f"- Code: commit {commit} when these facts were collected; runs.csv gives each run's own commit\n")


def main(sweep_dir: str, dest_dir: str) -> None:
    sweep, dest = Path(sweep_dir), Path(dest_dir)
    runs = sorted(path.parent for path in sweep.glob("*/final_metrics.json"))
    if not runs:
        sys.exit(f"error: no completed run (with final_metrics.json) in {sweep}")
    write_rows(dest / "runs.csv", RUN_COLUMNS, [run_row(run) for run in runs])
    write_rows(dest / "training_curves.csv", CURVE_COLUMNS, [row for run in runs for row in curve_rows(run)])
    (dest / "machine.md").write_text(machine_facts())


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python results/collect.py SWEEP_DIR DEST_DIR")
    main(*sys.argv[1:])
