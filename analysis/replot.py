"""Redraw the table-based sweep figures from committed CSV files, without the run folders.

A tables folder contains the three files that `python -m analysis aggregate` writes to a sweep
folder (summary.csv, layer_distances.csv, collapse_history.csv). `replot` reads them back with
their column types and writes every figure that needs no encoder weights to FOLDER/figures.
The activation maps need the weights, so they are left alone.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from analysis import AnalysisError
from analysis.sweep import HISTORY_CSV, LAYER_CSV, SUMMARY_CSV, SweepTables
from analysis.sweep_commands import FIGURES_FOLDER

logger = logging.getLogger(__name__)

TABLE_FILES = (SUMMARY_CSV, LAYER_CSV, HISTORY_CSV)
INTEGER_COLUMNS = {"encoder_params", "epochs", "effective_batch", "input_size", "seed", "samples_seen",
                   "num_layers", "num_images", "min_distance_layer", "layer", "stage", "block", "epoch", "step"}
FLOAT_COLUMNS = {"mask_ratio", "final_loss", "mean_distance", "final_layer_distance", "min_distance",
                 "normalized_layer", "distance", "dead_fraction"}


def parse_cell(column: str, text: str) -> object:
    """Convert one CSV cell back to the type gather_tables wrote; an empty cell is None."""
    if text == "":
        return None
    if column in INTEGER_COLUMNS:
        return int(text)
    if column in FLOAT_COLUMNS:
        return float(text)
    return text


def read_rows(path: Path) -> list[dict]:
    with path.open(newline="") as file:
        return [{column: parse_cell(column, text) for column, text in row.items()} for row in csv.DictReader(file)]


def read_tables(folder: Path) -> SweepTables:
    """Read summary.csv, layer_distances.csv and collapse_history.csv of a tables folder."""
    missing = [name for name in TABLE_FILES if not (folder / name).is_file()]
    if missing:
        raise AnalysisError(f"{folder} is missing {', '.join(missing)}; run 'python -m analysis aggregate SWEEP_DIR' "
                            f"and copy {', '.join(TABLE_FILES)} from the sweep folder")
    summary, layers, history = (read_rows(folder / name) for name in TABLE_FILES)
    return SweepTables(summary=summary, layers=layers, history=history)


def table_folders(root: Path) -> list[Path]:
    """Return ROOT if it contains summary.csv, else its sub-folders that do, sorted by name."""
    if not root.is_dir():
        raise AnalysisError(f"{root} is not a folder; pass a folder with {SUMMARY_CSV} or a folder of such folders")
    if (root / SUMMARY_CSV).is_file():
        return [root]
    folders = sorted(child for child in root.iterdir() if (child / SUMMARY_CSV).is_file())
    if not folders:
        raise AnalysisError(f"neither {root} nor any folder inside it contains {SUMMARY_CSV}; "
                            f"pass a folder written by 'python -m analysis aggregate' (or a copy of its tables)")
    return folders


def replot(root: str | Path, epoch_layers: list[float]) -> list[Path]:
    """Write the table-based figures (PDF and PNG) of every tables folder under ROOT; return their paths."""
    from analysis.sweep_figures import close_figures, log_skipped, save_sweep_figures, table_figures

    written = []
    for folder in table_folders(Path(str(root))):
        results = table_figures(read_tables(folder), epoch_layers)
        log_skipped(results)
        try:
            written += save_sweep_figures(results, folder / FIGURES_FOLDER)
        finally:
            close_figures(results)
    return written
