"""Sweep analysis on a sweep folder of real short pretraining runs: aggregate, figures, TensorBoard, report.

The module fixture trains four tiny members once (V1 and V2 atto, a second mask ratio and a
second size), adds one member that stopped mid-training and one that never started, and
runs `python -m analysis aggregate` on the folder.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fcmae.config import PretrainConfig
from fcmae.distributed import DistEnv
from fcmae.training import Trainer

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAINED = [("convnext_atto", 0.6), ("convnextv2_atto", 0.6), ("convnextv2_atto", 0.4), ("convnextv2_femto", 0.6)]
UNFINISHED = ("convnext_femto", 0.6)
NOT_STARTED = ("convnextv2_pico", 0.6)
FIGURES = ("distance_per_layer", "activations_atto", "capacity", "distance_vs_epoch", "init_vs_trained",
           "mask_ratio")
METRICS = ("hparams/final_loss", "hparams/mean_distance", "hparams/final_layer_distance", "hparams/min_distance")
HPARAMS = {"model", "version", "size", "encoder_params", "mask_ratio", "epochs", "effective_batch", "seed"}


def member_name(model: str, mask_ratio: float) -> str:
    return f"{model}-mr{mask_ratio:.2f}"


def member_config(root: Path, model: str, mask_ratio: float, epochs: int) -> PretrainConfig:
    values = dict(model=model, data="sample", output_dir=str(root / member_name(model, mask_ratio)), epochs=epochs,
                  warmup_epochs=0, batch_size=4, input_size=64, mask_ratio=mask_ratio, data_repeat=1,
                  num_workers=0, save_every_minutes=0, device="cpu", lr=1e-3, log_every=1)
    fields = {field.name for field in dataclasses.fields(PretrainConfig)}
    if "collapse_every" in fields:
        values.update(collapse_every=1, collapse_images=2)
    config = PretrainConfig(**values)
    config.validate()
    return config


def write_collapse_history(run: Path, epochs: int) -> None:
    """Write RUN/collapse.jsonl like the in-training tracking, for runs trained without it."""
    with (run / "collapse.jsonl").open("w") as file:
        for epoch in range(epochs + 1):
            layers = [{"stage": 0, "block": 0, "layer": k, "normalized_layer": k / 11,
                       "distance": 0.45 - 0.01 * k * epoch, "dead_fraction": 0.0} for k in range(12)]
            file.write(json.dumps({"epoch": epoch, "step": 2 * epoch, "samples_seen": 8 * epoch,
                                   "layers": layers}) + "\n")


def build_sweep(root: Path, epochs: int = 1) -> Path:
    """Train the TRAINED members, add an unfinished and a not-started member, write manifest.json."""
    entries = []
    for model, mask_ratio in TRAINED:
        config = member_config(root, model, mask_ratio, epochs)
        result = Trainer(config, DistEnv()).run()
        assert result.status == "completed"
        run = Path(config.output_dir)
        if not (run / "collapse.jsonl").is_file():
            write_collapse_history(run, epochs)
        entries.append({"name": run.name, "config": config.to_dict(), "config_hash": f"hash-{run.name}",
                        "job_id": None})

    unfinished = member_config(root, *UNFINISHED, epochs)
    run = Path(unfinished.output_dir)
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(unfinished.to_dict()))
    (run / "progress.json").write_text(json.dumps({"step": 1, "total_steps": 2 * epochs, "epoch": 1,
                                                   "epochs": epochs, "time": "2026-01-01T00:00:00+00:00"}))
    not_started = member_config(root, *NOT_STARTED, epochs)
    entries += [{"name": member_name(*UNFINISHED), "config": unfinished.to_dict(), "job_id": "17"},
                {"name": member_name(*NOT_STARTED), "config": not_started.to_dict(), "job_id": None}]
    (root / "manifest.json").write_text(json.dumps({"name": "test-sweep", "members": entries}, indent=2))
    return root


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, "-m", "analysis", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    return build_sweep(tmp_path_factory.mktemp("sweep"))


@pytest.fixture(scope="module")
def aggregated(sweep_dir) -> subprocess.CompletedProcess:
    return run_cli("aggregate", str(sweep_dir), "--max_images", "3", "--num_channels", "16", "--num_images", "2")


def read_rows(path: Path) -> list[dict]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def event_files(folder: Path, pattern: str = "events.out.tfevents.*") -> list[Path]:
    return sorted(folder.glob(pattern))


def load_events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return events


def session_hparams(events) -> dict:
    from tensorboard.plugins.hparams import metadata

    content = events.PluginTagToContent(metadata.PLUGIN_NAME)
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    return {name: value.WhichOneof("kind") and getattr(value, value.WhichOneof("kind"))
            for name, value in start.hparams.items()}


# Aggregation.

def test_aggregate_succeeds_and_notes_skipped(aggregated):
    assert aggregated.returncode == 0, aggregated.stderr
    assert f"skipping member {member_name(*UNFINISHED)} (incomplete)" in aggregated.stderr
    assert f"skipping member {member_name(*NOT_STARTED)} (missing)" in aggregated.stderr
    assert "Traceback" not in aggregated.stderr


def test_aggregate_measures_finished_members_only(sweep_dir, aggregated):
    assert aggregated.returncode == 0, aggregated.stderr
    for model, mask_ratio in TRAINED:
        analysis = sweep_dir / member_name(model, mask_ratio) / "analysis"
        assert len(read_rows(analysis / "cosine_distance.csv")) == 12
        assert (analysis / "activations.png").stat().st_size > 10_000
        assert not (analysis / "tensorboard").exists()
    assert not (sweep_dir / member_name(*UNFINISHED) / "analysis").exists()


def test_summary_csv_numbers_match_member_csv(sweep_dir, aggregated):
    assert aggregated.returncode == 0, aggregated.stderr
    rows = {row["member"]: row for row in read_rows(sweep_dir / "summary.csv")}

    assert list(rows) == [member_name(*member) for member in [*TRAINED, UNFINISHED, NOT_STARTED]]
    assert rows[member_name(*UNFINISHED)]["status"] == "incomplete"
    assert "step 1/2" in rows[member_name(*UNFINISHED)]["note"]
    assert rows[member_name(*NOT_STARTED)]["status"] == "missing"
    for model, mask_ratio in TRAINED:
        row = rows[member_name(model, mask_ratio)]
        distances = [float(r["distance"]) for r in
                     read_rows(sweep_dir / member_name(model, mask_ratio) / "analysis" / "cosine_distance.csv")]
        assert row["status"] == "analysed"
        assert row["version"] == ("v2" if model.startswith("convnextv2") else "v1")
        assert float(row["mask_ratio"]) == mask_ratio
        assert int(row["effective_batch"]) == 4
        assert float(row["mean_distance"]) == pytest.approx(sum(distances) / len(distances))
        assert float(row["final_layer_distance"]) == pytest.approx(distances[-1])
        assert float(row["min_distance"]) == pytest.approx(min(distances))
        assert float(row["final_loss"]) > 0
        assert int(row["seed"]) == 0
    assert int(rows["convnextv2_femto-mr0.60"]["encoder_params"]) > int(rows["convnextv2_atto-mr0.60"]["encoder_params"])


def test_history_csv_has_every_measurement(sweep_dir, aggregated):
    assert aggregated.returncode == 0, aggregated.stderr
    rows = read_rows(sweep_dir / "collapse_history.csv")

    for model, mask_ratio in TRAINED:
        member_rows = [row for row in rows if row["member"] == member_name(model, mask_ratio)]
        assert sorted({int(row["epoch"]) for row in member_rows}) == [0, 1]
        assert len(member_rows) == 2 * 12


# Figures.

def test_every_figure_written_as_pdf_and_png(sweep_dir, aggregated):
    assert aggregated.returncode == 0, aggregated.stderr
    for name in FIGURES:
        png = sweep_dir / "figures" / f"{name}.png"
        pdf = sweep_dir / "figures" / f"{name}.pdf"
        assert png.stat().st_size > 10_000, name
        assert pdf.read_bytes().startswith(b"%PDF"), name
        assert str(png) in aggregated.stdout.splitlines()


def test_figures_without_manifest_skip_absent_data(sweep_dir, aggregated, tmp_path, caplog):
    from analysis.sweep_commands import run_figures

    assert aggregated.returncode == 0, aggregated.stderr
    for name in ("convnextv2_atto-mr0.60", "convnextv2_atto-mr0.40"):
        (tmp_path / name).symlink_to(sweep_dir / name, target_is_directory=True)

    with caplog.at_level(logging.INFO):
        written = run_figures(tmp_path, (0, 1), "sample", 16, 2)

    names = {path.name for path in written}
    assert {"mask_ratio.png", "mask_ratio.pdf", "distance_per_layer.png", "summary.csv"} <= names
    assert "capacity.png" not in names
    assert "needs at least two model sizes" in caplog.text
    assert "no model size has analysed members of both versions" in caplog.text
    assert len(read_rows(tmp_path / "summary.csv")) == 2


def test_figures_csv_folder_single_plot(sweep_dir, aggregated):
    assert aggregated.returncode == 0, aggregated.stderr
    analysis = sweep_dir / "convnextv2_atto-mr0.60" / "analysis"

    result = run_cli("figures", str(analysis))

    assert result.returncode == 0, result.stderr
    assert (analysis / "cosine_distance.png").stat().st_size > 10_000


# TensorBoard.

def test_hparams_list_every_member_and_metric(sweep_dir, aggregated):
    assert aggregated.returncode == 0, aggregated.stderr
    for model, mask_ratio in TRAINED:
        events = load_events(sweep_dir / member_name(model, mask_ratio) / "tensorboard")
        hparams = session_hparams(events)

        assert set(hparams) == HPARAMS
        assert hparams["model"] == model
        assert hparams["mask_ratio"] == pytest.approx(mask_ratio)
        for tag in METRICS:
            assert len(events.Scalars(tag)) == 1, tag
        assert "train/loss" in events.Tags()["scalars"]
        assert [event.step for event in events.Scalars("analysis/distance_by_layer")] == list(range(12))
        assert len(events.Images("analysis/activations")) == 1


def test_tensorboard_rerun_does_not_duplicate(sweep_dir, aggregated):
    assert aggregated.returncode == 0, aggregated.stderr

    result = run_cli("tensorboard", str(sweep_dir), "--epoch_layers", "0,1", "--num_channels", "16",
                     "--num_images", "2")

    assert result.returncode == 0, result.stderr
    for model, mask_ratio in TRAINED:
        folder = sweep_dir / member_name(model, mask_ratio) / "tensorboard"
        assert len(event_files(folder, "*.analysis")) == 1
        events = load_events(folder)
        for tag in METRICS:
            assert len(events.Scalars(tag)) == 1, tag
        assert len(events.Scalars("analysis/distance_by_layer")) == 12
    summary = sweep_dir / "tensorboard" / "summary"
    assert len(event_files(summary)) == 1
    events = load_events(summary)
    assert {f"sweep/{name}" for name in FIGURES} <= set(events.Tags()["images"])
    assert all(len(events.Images(tag)) == 1 for tag in events.Tags()["images"])


# Report.

def test_report_lists_every_member_and_figure(sweep_dir, aggregated):
    assert aggregated.returncode == 0, aggregated.stderr
    report = (sweep_dir / "report.md").read_text()

    for member in [*TRAINED, UNFINISHED, NOT_STARTED]:
        assert member_name(*member) in report
    assert f"`{member_name(*UNFINISHED)}` (incomplete)" in report
    for name in FIGURES:
        assert f"(figures/{name}.png)" in report
    header = next(line for line in report.splitlines() if line.startswith("| member"))
    for column in ("model", "version", "encoder params", "mask ratio", "final loss", "mean distance",
                   "final-layer distance", "min distance"):
        assert column in header


# Command line surface.

def test_cli_lists_commands_with_help():
    result = run_cli()

    assert result.returncode == 0
    for command in ("cosine", "activations", "figures", "aggregate", "tensorboard", "report"):
        assert f"     {command}\n" in result.stdout


def test_cli_command_help_lists_options():
    result = run_cli("aggregate", "--help")

    assert result.returncode == 0
    help_text = result.stdout + result.stderr  # fire writes help to stderr when it is not a terminal
    for option in ("--images", "--max_images", "--force", "--epoch_layers"):
        assert option in help_text


@pytest.mark.parametrize("value, expected", [("0,0.5,1", [0.0, 0.5, 1.0]), ((0, 0.5, 1), [0.0, 0.5, 1.0]),
                                             (0.25, [0.25]), ([1], [1.0]), ("0, 1", [0.0, 1.0])])
def test_epoch_layers_accepts_fire_values(value, expected):
    from analysis.sweep_commands import parse_positions

    assert parse_positions(value) == expected


def test_cli_rejects_bad_epoch_layers(sweep_dir, aggregated):
    result = run_cli("report", str(sweep_dir), "--epoch_layers", "0,2")

    assert result.returncode == 2
    assert "--epoch_layers contains 2.0, outside [0, 1]" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_sweep_folder_missing_fails_clearly(tmp_path):
    result = run_cli("report", str(tmp_path / "absent"))

    assert result.returncode == 2
    assert "does not exist" in result.stderr
    assert "Traceback" not in result.stderr


# Redrawing from copied tables.

TABLE_FIGURES = tuple(name for name in FIGURES if not name.startswith("activations"))


def copy_tables(sweep_dir: Path, folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name in ("summary.csv", "layer_distances.csv", "collapse_history.csv"):
        (folder / name).write_bytes((sweep_dir / name).read_bytes())
    return folder


def test_replot_from_copied_tables(sweep_dir, aggregated, tmp_path):
    assert aggregated.returncode == 0, aggregated.stderr
    copy_tables(sweep_dir, tmp_path / "results" / "smoke")

    result = run_cli("replot", str(tmp_path / "results"))

    assert result.returncode == 0, result.stderr
    drawn = sorted(path.name for path in (tmp_path / "results" / "smoke" / "figures").iterdir())
    assert drawn == sorted(f"{name}.{suffix}" for name in TABLE_FIGURES for suffix in ("pdf", "png"))
    assert len(result.stdout.splitlines()) == len(drawn)


def test_replot_draws_csv_values(sweep_dir, aggregated, tmp_path):
    from analysis.replot import read_tables
    from analysis.sweep_figures import close_figures, table_figures

    assert aggregated.returncode == 0, aggregated.stderr
    tables = read_tables(copy_tables(sweep_dir, tmp_path / "smoke"))
    results = table_figures(tables, [0.0, 1.0])
    try:
        per_layer = results[0].figure
        drawn = {tuple(float(y) for y in line.get_ydata()) for axis in per_layer.axes for line in axis.lines}
    finally:
        close_figures(results)

    rows = read_rows(sweep_dir / "layer_distances.csv")
    for model, mask_ratio in TRAINED:
        member = sorted((row for row in rows if row["member"] == member_name(model, mask_ratio)),
                        key=lambda row: int(row["layer"]))
        assert tuple(float(row["distance"]) for row in member) in drawn


def test_replot_tables_keep_types(sweep_dir, aggregated):
    from analysis.replot import read_tables
    from analysis.sweep import gather_tables, load_sweep

    assert aggregated.returncode == 0, aggregated.stderr
    gathered = gather_tables(load_sweep(sweep_dir))
    read_back = read_tables(sweep_dir)

    assert read_back.layers == gathered.layers
    assert read_back.history == gathered.history
    assert [row["member"] for row in read_back.summary] == [row["member"] for row in gathered.summary]


def test_replot_rejects_folder_without_tables(sweep_dir, aggregated, tmp_path):
    (tmp_path / "empty").mkdir()
    empty = run_cli("replot", str(tmp_path / "empty"))
    assert empty.returncode == 2
    assert "contains summary.csv" in empty.stderr

    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "summary.csv").write_bytes((sweep_dir / "summary.csv").read_bytes())
    missing = run_cli("replot", str(partial))
    assert missing.returncode == 2
    assert "is missing layer_distances.csv, collapse_history.csv" in missing.stderr


# Seed replicates.

V1_ATTO = member_name("convnext_atto", 0.6)


def with_copy(tables, member: str, seed, shift: float):
    """Add a copy of one member as another run of its setting with the given seed, distances raised by shift."""
    from analysis.sweep import SweepTables

    def copies(rows: list[dict], columns: tuple[str, ...]) -> list[dict]:
        return [{**row, "member": f"{member}-copy", "seed": seed, **{column: row[column] + shift for column in columns}}
                for row in rows if row["member"] == member]

    return SweepTables(summary=tables.summary + copies(tables.summary, ("mean_distance", "final_layer_distance")),
                       layers=tables.layers + copies(tables.layers, ("distance",)),
                       history=tables.history + copies(tables.history, ("distance",)))


def drawn_lines(figure) -> set[tuple[float, ...]]:
    return {tuple(round(float(y), 9) for y in line.get_ydata()) for axis in figure.axes for line in axis.lines}


def member_distances(tables, member: str) -> list[float]:
    return [row["distance"] for row in sorted((row for row in tables.layers if row["member"] == member),
                                              key=lambda row: row["layer"])]


def test_seed_band_around_mean_line(sweep_dir, aggregated):
    from analysis.replot import read_tables
    from analysis.sweep_figures import close_figures, table_figures

    assert aggregated.returncode == 0, aggregated.stderr
    tables = with_copy(read_tables(sweep_dir), V1_ATTO, seed=1, shift=0.02)
    results = table_figures(tables, [0.0, 1.0])
    try:
        per_layer, capacity = results[0], results[1]
        original = member_distances(tables, V1_ATTO)
        lines = drawn_lines(per_layer.figure)
        bands = [collection.get_paths()[0].vertices[:, 1] for axis in per_layer.figure.axes
                 for collection in axis.collections]
        capacity_lines = drawn_lines(capacity.figure)
    finally:
        close_figures(results)

    assert tuple(round(distance + 0.01, 9) for distance in original) in lines
    assert tuple(round(distance, 9) for distance in original) not in lines
    assert len(bands) == 1
    assert min(bands[0]) == pytest.approx(min(original))
    assert max(bands[0]) == pytest.approx(max(original) + 0.02)
    assert "Settings with several seeds (2) are drawn as the mean over their seeds" in per_layer.caption
    final = next(row["final_layer_distance"] for row in tables.summary if row["member"] == V1_ATTO)
    assert (round(final + 0.01, 9),) in capacity_lines


@pytest.mark.parametrize("seed", [0, None])
def test_shared_seeds_stay_apart(sweep_dir, aggregated, seed):
    from analysis.replot import read_tables
    from analysis.sweep_figures import close_figures, table_figures

    assert aggregated.returncode == 0, aggregated.stderr
    tables = with_copy(read_tables(sweep_dir), V1_ATTO, seed=seed, shift=0.02)
    if seed is None:
        for row in tables.layers:
            row["seed"] = None
    results = table_figures(tables, [0.0, 1.0])
    try:
        lines = drawn_lines(results[0].figure)
        bands = sum(len(axis.collections) for axis in results[0].figure.axes)
    finally:
        close_figures(results)

    original = member_distances(tables, V1_ATTO)
    assert tuple(round(distance, 9) for distance in original) in lines
    assert tuple(round(distance + 0.02, 9) for distance in original) in lines
    assert bands == 0
    assert "seeds" not in results[0].caption


def test_report_seed_table(sweep_dir, aggregated):
    import statistics

    from analysis.replot import read_tables
    from analysis.report import seed_table

    assert aggregated.returncode == 0, aggregated.stderr
    tables = with_copy(read_tables(sweep_dir), V1_ATTO, seed=1, shift=0.02)
    analysed = [row for row in tables.summary if row["status"] == "analysed"]

    table = seed_table(analysed)

    means = [row["mean_distance"] for row in analysed if row["member"].startswith(V1_ATTO)]
    assert len(table.splitlines()) == 3
    assert (f"| convnext_atto | 0.60 | 1 | 0, 1 | {statistics.mean(means):.4f} ± {statistics.stdev(means):.4f} "
            f"({min(means):.4f}-{max(means):.4f}) |") in table
    assert seed_table([row for row in analysed if not row["member"].endswith("-copy")]) is None
