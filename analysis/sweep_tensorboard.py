"""TensorBoard view of a sweep: HParams and analysis images in each member's own run, figures in a summary run.

`tensorboard --logdir SWEEP_DIR` then shows one run per member (SWEEP_DIR/<member>/tensorboard,
with the training curves, reconstructions and in-training collapse scalars) and one run,
tensorboard/summary, with the sweep figures.

The analysis events of a member go into their own event file in the member's run folder,
named with ANALYSIS_SUFFIX. A rerun deletes that file first, so no point is written twice and
the training event files are never modified.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from analysis.sweep import ACTIVATIONS_FILE, ANALYSED, NOT_MEASURED, Sweep, SweepTables

logger = logging.getLogger(__name__)

MEMBER_TENSORBOARD = "tensorboard"
SUMMARY_RUN = Path("tensorboard") / "summary"
ANALYSIS_SUFFIX = ".analysis"
EVENT_PATTERN = "events.out.tfevents.*"

HPARAM_COLUMNS = ("model", "version", "size", "encoder_params", "mask_ratio", "epochs", "effective_batch", "seed")
METRIC_COLUMNS = ("final_loss", "mean_distance", "final_layer_distance", "min_distance")
METRIC_TAG_PREFIX = "hparams/"
LAYER_DISTANCE_TAG = "analysis/distance_by_layer"
ACTIVATIONS_TAG = "analysis/activations"


def metric_tag(column: str) -> str:
    return METRIC_TAG_PREFIX + column


def hparam_domains(rows: list[dict]) -> dict[str, list]:
    """Return the discrete values of the text and mask-ratio hyperparameters over the members."""
    domains = {}
    for column in ("model", "version", "size", "mask_ratio"):
        values = sorted({row[column] for row in rows if row.get(column) is not None})
        if values:
            domains[column] = values
    return domains


def write_member_runs(sweep: Sweep, tables: SweepTables) -> list[Path]:
    """Write HParams, the metrics, per-layer distances and the activation grid into each completed member's run."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    rows = [row for row in tables.summary if row["status"] in (ANALYSED, NOT_MEASURED)]
    domains = hparam_domains(rows)
    written = []
    for row in rows:
        member = next(member for member in sweep.members if member.name == row["member"])
        log_dir = member.folder / MEMBER_TENSORBOARD
        _remove_analysis_events(log_dir)

        hparam_values = {column: row[column] for column in HPARAM_COLUMNS if row.get(column) is not None}
        metrics = {metric_tag(column): float(row[column]) for column in METRIC_COLUMNS if row.get(column) is not None}
        step = int(row.get("samples_seen") or 0)
        with SummaryWriter(log_dir=str(log_dir), filename_suffix=ANALYSIS_SUFFIX) as writer:
            for summary in hparams(hparam_values, metrics, hparam_domain_discrete=domains):
                writer.file_writer.add_summary(summary)
            for tag, value in metrics.items():
                writer.add_scalar(tag, value, step)
            for layer_row in (r for r in tables.layers if r["member"] == member.name):
                writer.add_scalar(LAYER_DISTANCE_TAG, layer_row["distance"], layer_row["layer"])
            _add_activation_grid(writer, member.analysis_folder / ACTIVATIONS_FILE, step)
        written.append(log_dir)
        logger.info("wrote HParams and analysis of %s to %s", member.name, log_dir)
    return written


def _add_activation_grid(writer, path: Path, step: int) -> None:
    if not path.is_file():
        logger.info("no %s; run 'python -m analysis aggregate' to draw it", path)
        return
    from PIL import Image

    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))  # (H, W, 3) uint8
    writer.add_image(ACTIVATIONS_TAG, pixels, step, dataformats="HWC")


def write_summary_run(sweep: Sweep, figures: list, table_markdown: str) -> Path:
    """Write the sweep figures (add_figure) and the summary table (add_text) to SWEEP_DIR/tensorboard/summary."""
    from torch.utils.tensorboard import SummaryWriter

    log_dir = sweep.folder / SUMMARY_RUN
    for old in log_dir.glob(EVENT_PATTERN):
        old.unlink()
    with SummaryWriter(log_dir=str(log_dir)) as writer:
        for result in figures:
            if result.figure is not None:
                writer.add_figure(f"sweep/{result.name}", result.figure, 0, close=False)
        writer.add_text("sweep/summary", table_markdown, 0)
    logger.info("wrote the sweep figures to %s", log_dir)
    return log_dir


def _remove_analysis_events(log_dir: Path) -> None:
    for old in log_dir.glob(EVENT_PATTERN + ANALYSIS_SUFFIX):
        logger.info("replacing %s", old)
        old.unlink()
