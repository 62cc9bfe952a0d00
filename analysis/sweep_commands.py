"""The sweep commands of `python -m analysis`: aggregate, figures, tensorboard and report.

Each command reads the sweep folder afresh, writes the gathered tables (summary.csv,
layer_distances.csv, collapse_history.csv) and returns the paths it wrote. Only `aggregate`
measures members. The other commands use the distances already on disk and run the encoders
only for the activation maps, one forward pass of the compared pair.
"""

from __future__ import annotations

import logging
from pathlib import Path

from analysis import AnalysisError
from analysis.cosine import check_positive, split_list
from analysis.sweep import Sweep, SweepTables, format_summary, gather_tables, load_sweep, measure_members, write_tables

logger = logging.getLogger(__name__)

FIGURES_FOLDER = "figures"
DEFAULT_EPOCH_LAYERS = "0,0.5,1"


def parse_positions(value: object) -> list[float]:
    """Parse normalized depths in [0, 1] from a list, a tuple, a number or a comma-separated string."""
    items = split_list(value)
    if not items:
        raise AnalysisError("--epoch_layers is empty; pass normalized depths in [0, 1], e.g. 0,0.5,1")
    positions = []
    for item in items:
        try:
            position = float(item)
        except ValueError:
            raise AnalysisError(f"--epoch_layers contains {item!r}, which is not a number; pass normalized "
                                f"depths in [0, 1], e.g. 0,0.5,1") from None
        if not 0.0 <= position <= 1.0:
            raise AnalysisError(f"--epoch_layers contains {position}, outside [0, 1]; 0 is the first block "
                                f"and 1 the last")
        positions.append(position)
    return positions


def _gather(sweep_dir: str | Path | Sweep):
    sweep = sweep_dir if isinstance(sweep_dir, Sweep) else load_sweep(sweep_dir)
    tables = gather_tables(sweep)
    written = write_tables(sweep, tables)
    logger.info("sweep %s:\n%s", sweep.name, format_summary(tables.summary))
    return sweep, tables, written


def _check_figure_options(epoch_layers: object, num_channels: int, num_images: int) -> list[float]:
    check_positive("num_channels", num_channels)
    check_positive("num_images", num_images)
    return parse_positions(epoch_layers)


def _draw(sweep, tables: SweepTables, positions: list[float], images: str, num_channels: int, num_images: int):
    from analysis.sweep_figures import build_sweep_figures, save_sweep_figures

    results = build_sweep_figures(sweep, tables, positions, images, num_channels, num_images)
    written = save_sweep_figures(results, sweep.folder / FIGURES_FOLDER)
    return results, written


def _run(sweep_dir: str | Path | Sweep, epoch_layers: object, images: str, num_channels: int, num_images: int,
         report: bool, tensorboard: bool) -> list[Path]:
    """Gather the tables, draw and save the figures, then write the report and TensorBoard runs if requested."""
    from analysis.report import markdown_table, write_report
    from analysis.sweep import ANALYSED
    from analysis.sweep_figures import close_figures
    from analysis.sweep_tensorboard import write_member_runs, write_summary_run

    positions = _check_figure_options(epoch_layers, num_channels, num_images)
    sweep, tables, written = _gather(sweep_dir)
    results, figure_paths = _draw(sweep, tables, positions, images, num_channels, num_images)
    outputs = []
    try:
        if report:
            outputs.append(write_report(sweep, tables, results))
        if tensorboard:
            outputs += write_member_runs(sweep, tables)
            analysed = [row for row in tables.summary if row["status"] == ANALYSED]
            outputs.append(write_summary_run(sweep, results, markdown_table(analysed)))
    finally:
        close_figures(results)
    return [*outputs, *written, *figure_paths]


def run_figures(sweep_dir: str | Path, epoch_layers: object, images: str, num_channels: int,
                num_images: int) -> list[Path]:
    """Write the tables and the sweep figures (PDF and PNG) to SWEEP_DIR and SWEEP_DIR/figures."""
    return _run(sweep_dir, epoch_layers, images, num_channels, num_images, report=False, tensorboard=False)


def run_report(sweep_dir: str | Path, epoch_layers: object, images: str, num_channels: int,
               num_images: int) -> list[Path]:
    """Write the tables, the figures and SWEEP_DIR/report.md."""
    return _run(sweep_dir, epoch_layers, images, num_channels, num_images, report=True, tensorboard=False)


def run_tensorboard(sweep_dir: str | Path, epoch_layers: object, images: str, num_channels: int,
                    num_images: int) -> list[Path]:
    """Write HParams and images into each member's TensorBoard run and the figures into the summary run."""
    return _run(sweep_dir, epoch_layers, images, num_channels, num_images, report=False, tensorboard=True)


def run_aggregate(sweep_dir: str | Path, images: str, max_images: int | None, batch_size: int,
                  input_size: int | None, force: bool, epoch_layers: object, num_channels: int,
                  num_images: int) -> list[Path]:
    """Measure the members that lack distances, then write the tables, figures, report and TensorBoard runs."""
    _check_figure_options(epoch_layers, num_channels, num_images)  # fail before any measuring
    sweep = load_sweep(sweep_dir)
    measured = measure_members(sweep, images, max_images, batch_size, input_size, num_channels, num_images, force)
    logger.info("wrote %d measurement files for %d completed members", len(measured), len(sweep.completed()))

    written = _run(sweep, epoch_layers, images, num_channels, num_images, report=True, tensorboard=True)
    skipped = [member.name for member in sweep.skipped()]
    if skipped:
        logger.warning("%d members were left out because their training has not completed: %s",
                       len(skipped), ", ".join(skipped))
    return written
