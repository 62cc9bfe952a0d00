"""SWEEP_DIR/report.md: the members' numbers as a table, then every sweep figure with its caption."""

from __future__ import annotations

import logging
import statistics
from datetime import datetime, timezone
from pathlib import Path

from analysis.sweep import ANALYSED, Sweep, SweepTables, seed_groups

logger = logging.getLogger(__name__)

REPORT_FILE = "report.md"

# (column of summary.csv, table header, number format: a format spec, "d", "millions" or None for text)
TABLE_COLUMNS = (
    ("member", "member", None),
    ("model", "model", None),
    ("version", "version", None),
    ("encoder_params", "encoder params", "millions"),
    ("mask_ratio", "mask ratio", ".2f"),
    ("epochs", "epochs", "d"),
    ("effective_batch", "effective batch", "d"),
    ("seed", "seed", "d"),
    ("final_loss", "final loss", ".4f"),
    ("mean_distance", "mean distance", ".4f"),
    ("final_layer_distance", "final-layer distance", ".4f"),
    ("min_distance", "min distance", ".4f"),
    ("min_distance_layer", "min layer", "d"),
)


def format_cell(value: object, number_format: str | None) -> str:
    if value is None or value == "":
        return "-"
    if number_format == "millions":
        return f"{int(value) / 1e6:.2f}M"
    if number_format == "d":
        return str(int(value))
    if number_format:
        return format(float(value), number_format)
    return str(value).replace("|", "\\|")


def markdown_table(rows: list[dict]) -> str:
    """Format the summary rows of analysed members as a Markdown table."""
    lines = ["| " + " | ".join(header for _, header, _ in TABLE_COLUMNS) + " |",
             "|" + "|".join("---" if number_format is None else "--:" for _, _, number_format in TABLE_COLUMNS) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(format_cell(row.get(column), number_format)
                                       for column, _, number_format in TABLE_COLUMNS) + " |")
    return "\n".join(lines)


def seed_table(rows: list[dict]) -> str | None:
    """Format the settings with several seeds among the rows as a Markdown table; None if there are none."""
    settings = [group for group in seed_groups(rows) if len(group) > 1]
    if not settings:
        return None
    lines = ["| model | mask ratio | epochs | seeds | mean distance | final-layer distance |",
             "|---|--:|--:|---|--:|--:|"]
    for group in settings:
        first = group[0]
        seeds = ", ".join(str(row["seed"]) for row in sorted(group, key=lambda row: row["seed"]))
        lines.append(f"| {first['model']} | {format_cell(first['mask_ratio'], '.2f')} | "
                     f"{format_cell(first['epochs'], 'd')} | {seeds} | {seed_spread(group, 'mean_distance')} | "
                     f"{seed_spread(group, 'final_layer_distance')} |")
    return "\n".join(lines)


def seed_spread(rows: list[dict], column: str) -> str:
    """Format one column over a setting's seeds as 'mean ± sample standard deviation (lowest-highest)'."""
    values = [float(row[column]) for row in rows]
    return (f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f} "
            f"({min(values):.4f}-{max(values):.4f})")


def write_report(sweep: Sweep, tables: SweepTables, figures: list) -> Path:
    """Write SWEEP_DIR/report.md from the gathered tables and the saved figures."""
    analysed = [row for row in tables.summary if row["status"] == ANALYSED]
    others = [row for row in tables.summary if row["status"] != ANALYSED]

    lines = [f"# Feature collapse in sweep {sweep.name}", "",
             f"Written {datetime.now(timezone.utc).isoformat(timespec='seconds')} by `python -m analysis` from "
             f"`{sweep.folder}`: {len(analysed)} of {len(tables.summary)} members analysed.", "",
             _metric_definition(analysed), "",
             "## Members", "", markdown_table(analysed) if analysed else "No member has been analysed yet.", ""]
    if others:
        lines += ["Members left out:", ""]
        lines += [f"- `{row['member']}` ({row['status']}): {row['note']}" for row in others]
        lines.append("")
    seeds = seed_table(analysed)
    if seeds:
        lines += ["## Across seeds", "",
                  "Settings analysed with several seeds: mean over the seeds, with the sample standard deviation "
                  "and the lowest and highest seed in brackets.", "", seeds, ""]

    lines += ["## Figures", ""]
    for result in figures:
        lines += _figure_section(result, sweep.folder)

    lines += ["## Data", "",
              "The plotted numbers are in `summary.csv`, `layer_distances.csv` and `collapse_history.csv` "
              "in this folder, gathered from each member's `analysis/cosine_distance.csv`, `config.json`, "
              "`final_metrics.json` and `collapse.jsonl`. The activation maps are computed from the "
              "members' weights.", ""]

    path = sweep.folder / REPORT_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(path)
    logger.info("wrote %s", path)
    return path


def _metric_definition(analysed: list[dict]) -> str:
    counts = sorted({row["num_images"] for row in analysed if row.get("num_images")})
    sizes = sorted({row["input_size"] for row in analysed if row.get("input_size")})
    measured_on = ""
    if counts:
        measured_on = (f" Measured on {', '.join(str(count) for count in counts)} images at "
                       f"{', '.join(str(size) for size in sizes)} px.")
    return ("Feature cosine distance: for each block's MLP features (after GELU in V1, after GRN in V2) and "
            "each image, the mean of (1 - cos(X_i, X_j)) / 2 over all channel pairs, averaged over images; "
            "low values mean collapsed features. Mean distance averages the blocks, final-layer distance is "
            "the last block, min distance the lowest block (its index in 'min layer')." + measured_on)


def _figure_section(result, root: Path) -> list[str]:
    lines = [f"### {result.title}", ""]
    if result.skip_reason:
        return lines + [f"Not drawn: {result.skip_reason}.", ""]

    png = next(path for path in result.paths if path.suffix == ".png")
    pdf = next(path for path in result.paths if path.suffix == ".pdf")
    lines += [f"![{result.title}]({png.relative_to(root).as_posix()})", "",
              f"{result.caption} ([PDF]({pdf.relative_to(root).as_posix()}))", ""]
    return lines
