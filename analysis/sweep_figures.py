"""Publication figures of a sweep, drawn from the gathered tables of analysis.sweep.

The line figures use the Okabe-Ito palette, which stays distinct under the common forms of
colour blindness: ConvNeXt V1 in warm colours with dashed lines and square-like markers, V2
in cool colours with solid lines and round-like markers, so the versions differ in colour,
line style and marker. Fonts are 7-8 pt sans-serif, sized for a two-column paper page, and PDFs embed
TrueType fonts (pdf.fonttype 42). A figure whose data is absent is skipped with the reason.

Members that differ only in their seed are one setting: the line figures draw the setting's
mean over its seeds and shade the band between its lowest and highest seed.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot loads)
from matplotlib.lines import Line2D  # noqa: E402

from analysis.sweep import Sweep, SweepTables, group_rows, seed_groups  # noqa: E402

logger = logging.getLogger(__name__)

# The Okabe-Ito colours: warm ones for V1, cool ones for V2 (yellow is left out: too light on white).
VERSION_COLORS = {"v1": ("#D55E00", "#E69F00", "#CC79A7"), "v2": ("#0072B2", "#009E73", "#56B4E9", "#000000")}
VERSION_LINESTYLES = {"v1": (0, (4.0, 2.0)), "v2": "solid"}
VERSION_NAMES = {"v1": "ConvNeXt V1", "v2": "ConvNeXt V2"}
# Markers differ between the versions too, so lines stay apart in greyscale print.
VERSION_MARKERS = {"v1": ("s", "D", "v", "X"), "v2": ("o", "^", "P", "*")}
# Parameters that may vary between members besides version, size and mask ratio.
VARIANT_COLUMNS = (("epochs", "ep"), ("input_size", "px"), ("effective_batch", "batch"))
SEED_BAND_ALPHA = 0.2
# Mask ratio of ConvNeXt V2's FCMAE recipe (Woo et al., CVPR 2023). The activation figure prefers it.
DEFAULT_MASK_RATIO = 0.6

FULL_WIDTH = 6.75   # inches: the text width of a two-column paper page
COLUMN_WIDTH = 3.3  # inches: one column
PAPER_STYLE = {
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans"],
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "figure.titlesize": 9,
    "axes.linewidth": 0.6,
    "xtick.major.width": 0.6,
    "ytick.major.width": 0.6,
    "lines.linewidth": 1.3,
    "lines.markersize": 3.5,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "0.88",
    "grid.linewidth": 0.5,
    "legend.frameon": False,
    "pdf.fonttype": 42,
    "ps.fonttype": 42,
    "savefig.dpi": 300,
}
DISTANCE_LABEL = "feature cosine distance"


@dataclass
class SweepFigure:
    """One sweep figure: the drawn matplotlib figure, or the reason it was skipped."""

    name: str
    title: str
    caption: str = ""
    figure: object | None = None
    skip_reason: str | None = None
    paths: list[Path] = field(default_factory=list)


@contextmanager
def paper_style():
    """Apply PAPER_STYLE while figures are built and saved."""
    with matplotlib.rc_context(PAPER_STYLE):
        yield


# Styles shared by every figure.

def line_style(version: str, index: int) -> dict:
    """Colour, line style and marker of the index-th line of one version."""
    colors, markers = VERSION_COLORS[version], VERSION_MARKERS[version]
    return {"color": colors[index % len(colors)], "linestyle": VERSION_LINESTYLES[version],
            "marker": markers[index % len(markers)]}


def ratio_order(rows: list[dict]) -> list[float]:
    """Mask ratios ordered by closeness to DEFAULT_MASK_RATIO, so the recipe's setting gets the first colours."""
    return sorted({row["mask_ratio"] for row in rows}, key=lambda ratio: (abs(ratio - DEFAULT_MASK_RATIO), ratio))


def version_order(version: str) -> int:
    return 0 if version == "v1" else 1


def varying_columns(rows: list[dict], columns=VARIANT_COLUMNS) -> list[tuple[str, str]]:
    """Return the (column, unit) pairs of `columns` whose values differ between the rows."""
    return [(column, unit) for column, unit in columns if len({row.get(column) for row in rows}) > 1]


def variant_label(row: dict, columns: list[tuple[str, str]]) -> str:
    return ", ".join(f"{row.get(column)} {unit}" for column, unit in columns)


def size_order(rows: list[dict]) -> list[str]:
    """Model sizes sorted by their smallest encoder parameter count."""
    params: dict[str, int] = {}
    for row in rows:
        params[row["size"]] = min(params.get(row["size"], row["encoder_params"]), row["encoder_params"])
    return sorted(params, key=params.get)


def _millions(count: float) -> str:
    return f"{count / 1e6:.1f}M"


def _distance_limits(values: list[float]) -> tuple[float, float]:
    # The distance of non-negative features is at most 0.5. Negative GELU or GRN outputs can push it higher.
    return 0.0, max(0.55, 1.05 * max(values, default=0.0))


# Seed replicates.

@dataclass
class SeedCurve:
    """One setting's values along x: the mean over its seeds and the lowest and highest seed."""

    first: dict
    seeds: int
    x: list[float]
    mean: list[float]
    low: list[float]
    high: list[float]


def seed_curve(rows: list[dict], x, y: str) -> SeedCurve:
    """Average one setting's rows over its seeds at each x (a column name or a function of the row)."""
    by_x: dict = defaultdict(list)
    for row in rows:
        by_x[row[x] if isinstance(x, str) else x(row)].append(row[y])
    xs = sorted(by_x)
    return SeedCurve(first=rows[0], seeds=len({row["member"] for row in rows}), x=xs,
                     mean=[sum(by_x[value]) / len(by_x[value]) for value in xs],
                     low=[min(by_x[value]) for value in xs], high=[max(by_x[value]) for value in xs])


def summary_curve(rows: list[dict], x, y: str) -> SeedCurve:
    """Build one line through summary rows of several settings (one per x), averaged over each setting's seeds."""
    curve = seed_curve(rows, x, y)
    curve.seeds = max(len(group) for group in seed_groups(rows))
    return curve


def draw_curve(axis, curve: SeedCurve, style: dict, **extra) -> None:
    """Plot the mean line, and the band between the lowest and highest seed where there are several."""
    axis.plot(curve.x, curve.mean, **style, **extra)
    if curve.seeds > 1:
        axis.fill_between(curve.x, curve.low, curve.high, color=style["color"], alpha=SEED_BAND_ALPHA, linewidth=0)


def seeds_sentence(curves: list[SeedCurve]) -> str:
    """Return the caption sentence on seeds, or an empty string when every setting has one seed."""
    counts = sorted({curve.seeds for curve in curves})
    if counts[-1] < 2:
        return ""
    if len(counts) == 1:
        return (f" Each line is the mean over the {counts[0]} seeds of its setting; the shaded band spans the "
                f"lowest to the highest seed.")
    several = [count for count in counts if count > 1]
    number = str(several[0]) if len(several) == 1 else f"{several[0]}-{several[-1]}"
    return (f" Settings with several seeds ({number}) are drawn as the mean over their seeds, with a shaded "
            f"band from the lowest to the highest seed.")


def setting_columns(rows: list[dict]) -> list[tuple[str, str]]:
    """Return the mask ratio and VARIANT_COLUMNS columns whose values differ between the rows."""
    return varying_columns(rows, (("mask_ratio", "mask ratio"), *VARIANT_COLUMNS))


def setting_label(curve: SeedCurve, varying: list[tuple[str, str]]) -> str:
    """Name a setting: its member name for one seed, else its model and varying columns with the seed count."""
    if curve.seeds == 1:
        return curve.first["member"]
    parts = [curve.first["model"], *(f"{curve.first.get(column)} {unit}" for column, unit in varying)]
    return f"{', '.join(parts)}; {curve.seeds} seeds"


# 1. Distance per layer.

def distance_per_layer(layers: list[dict]) -> SweepFigure:
    """Small multiples (rows: mask ratio, columns: size) of distance vs normalized layer index."""
    result = SweepFigure("distance_per_layer", "Feature cosine distance per layer")
    if not layers:
        result.skip_reason = "no member has per-layer distances (run 'python -m analysis aggregate')"
        return result

    by_member = group_rows(layers, "member")
    members = list(by_member.values())
    sizes = size_order(layers)
    ratios = sorted({rows[0]["mask_ratio"] for rows in members})
    variants = varying_columns([rows[0] for rows in members])

    columns, rows_count = len(sizes), len(ratios)
    width = FULL_WIDTH if columns > 1 else COLUMN_WIDTH
    figure, axes = plt.subplots(rows_count, columns, figsize=(width, 0.6 + 1.75 * rows_count), sharex=True,
                                sharey=True, squeeze=False, layout="constrained")
    legend_entries: dict[str, dict] = {}
    settings = [seed_curve(rows, "normalized_layer", "distance") for rows in seed_groups(layers)]
    curves = []
    for row_index, ratio in enumerate(ratios):
        for column_index, size in enumerate(sizes):
            cell = [curve for curve in settings
                    if curve.first["size"] == size and curve.first["mask_ratio"] == ratio]
            _draw_layer_panel(axes[row_index, column_index], cell, variants, legend_entries)
            curves += cell
    _label_grid(axes, [_size_title(size, layers) for size in sizes], [f"mask {ratio:.2f}" for ratio in ratios])

    low, high = _distance_limits([row["distance"] for row in layers])
    axes[0, 0].set_ylim(low, high)
    axes[0, 0].set_xlim(-0.03, 1.03)
    figure.supxlabel("normalized layer index k / (K - 1)  (block k of K)", fontsize=8)
    figure.supylabel(DISTANCE_LABEL, fontsize=8)
    _figure_legend(figure, legend_entries, columns)

    result.figure = figure
    result.caption = ("Feature cosine distance of every block's MLP features against its normalized depth, "
                      "one panel per model size (columns) and mask ratio (rows). Low values mean the "
                      "channels point the same way (feature collapse)." + seeds_sentence(curves))
    return result


def _draw_layer_panel(axes, cell: list[SeedCurve], variants, legend_entries: dict) -> None:
    if not cell:
        axes.text(0.5, 0.5, "no run", transform=axes.transAxes, ha="center", va="center", color="0.5")
        return
    counts: dict[str, int] = defaultdict(int)
    # V2 first, so the dashed V1 line stays visible where the two overlap.
    for curve in sorted(cell, key=lambda curve: (-version_order(curve.first["version"]), curve.first["member"])):
        first = curve.first
        style = line_style(first["version"], counts[first["version"]])
        counts[first["version"]] += 1
        draw_curve(axes, curve, style)
        label = VERSION_NAMES[first["version"]]
        if variants:
            label += f" ({variant_label(first, variants)})"
        legend_entries.setdefault(label, style)


def _size_title(size: str, rows: list[dict]) -> str:
    params = min(row["encoder_params"] for row in rows if row["size"] == size)
    return f"{size}, {_millions(params)} params"


def _label_grid(axes, column_titles: list[str], row_labels: list[str]) -> None:
    """Title the top row of a panel grid by column and label each row at its right edge."""
    for axis, title in zip(axes[0], column_titles):
        axis.set_title(title)
    for axis, label in zip(axes[:, -1], row_labels):
        axis.yaxis.set_label_position("right")
        axis.set_ylabel(label, rotation=270, labelpad=10)


def _figure_legend(figure, entries: dict[str, dict], columns: int) -> None:
    handles = [Line2D([], [], label=label, **style) for label, style in sorted(entries.items())]
    figure.legend(handles=handles, loc="outside upper center", ncol=min(len(handles), max(2, columns)))


# 3. Capacity and 5. mask ratio: summary numbers against one member parameter.

# (summary column, panel title, short row label)
SUMMARY_PANELS = (("final_layer_distance", "final-layer distance", "final layer"),
                  ("mean_distance", "mean distance over layers", "mean of layers"))


def capacity(summary: list[dict]) -> SweepFigure:
    """Final-layer and mean distance against encoder parameters (log x), one line per mask ratio and version."""
    result = SweepFigure("capacity", "Distance against model capacity")
    rows = [row for row in summary if row.get("mean_distance") is not None]
    sizes = {row["size"] for row in rows}
    if len(sizes) < 2:
        result.skip_reason = (f"needs at least two model sizes with distances; found {len(sizes)}"
                              f"{' (' + ', '.join(sorted(sizes)) + ')' if sizes else ''}")
        return result

    ratios = ratio_order(rows)
    variants = varying_columns(rows)
    figure, axes = plt.subplots(1, 2, figsize=(FULL_WIDTH, 2.6), sharey=True, layout="constrained")
    lines = group_rows(rows, lambda row: (row["version"], row["mask_ratio"], variant_label(row, variants)))
    curves = []
    for (version, ratio, variant), line_rows in sorted(lines.items(), key=lambda item: (
            version_order(item[0][0]), item[0][1], item[0][2])):
        index = ratios.index(ratio) + len(ratios) * _variant_index(rows, variants, line_rows[0])
        style = line_style(version, index)
        label = f"{VERSION_NAMES[version]}, mask {ratio:.2f}" + (f", {variant}" if variant else "")
        for axis, (column, _, _) in zip(axes, SUMMARY_PANELS):
            curve = summary_curve(line_rows, lambda row: row["encoder_params"] / 1e6, column)
            draw_curve(axis, curve, style, label=label if axis is axes[0] else None)
            curves.append(curve)

    ticks = _size_ticks(rows)
    for axis, (column, title, _) in zip(axes, SUMMARY_PANELS):
        axis.set_xscale("log")
        axis.set_xticks([position for position, _ in ticks], [label for _, label in ticks])
        axis.minorticks_off()
        axis.set_xlabel("encoder parameters (millions, log scale)")
        axis.set_title(title)
    axes[0].set_ylabel(DISTANCE_LABEL)
    axes[0].set_ylim(*_distance_limits([row[column] for row in rows for column, _, _ in SUMMARY_PANELS]))
    _legend_below(figure, axes[0], columns=len({row['version'] for row in rows}))

    result.figure = figure
    result.caption = ("Final-layer and mean feature cosine distance against the number of encoder parameters "
                      "(no classifier), one line per version and mask ratio." + seeds_sentence(curves))
    return result


def _size_ticks(rows: list[dict]) -> list[tuple[float, str]]:
    by_size = group_rows(rows, "size")
    ticks = []
    for size, size_rows in by_size.items():
        params = sum(row["encoder_params"] for row in size_rows) / len(size_rows)
        ticks.append((params / 1e6, f"{params / 1e6:.1f}\n{size}"))
    return sorted(ticks)


def _variant_index(rows: list[dict], variants, row: dict) -> int:
    labels = sorted({variant_label(other, variants) for other in rows})
    return labels.index(variant_label(row, variants))


def mask_ratio(summary: list[dict]) -> SweepFigure:
    """Final-layer and mean distance (rows) against the mask ratio, one panel column per size, V1 and V2 lines."""
    result = SweepFigure("mask_ratio", "Distance against mask ratio")
    rows = [row for row in summary if row.get("mean_distance") is not None]
    ratios = {row["mask_ratio"] for row in rows}
    if len(ratios) < 2:
        result.skip_reason = (f"needs at least two mask ratios with distances; found {len(ratios)}"
                              f"{' (' + ', '.join(f'{ratio:.2f}' for ratio in sorted(ratios)) + ')' if ratios else ''}")
        return result

    sizes = size_order(rows)
    variants = varying_columns(rows)
    width = FULL_WIDTH if len(sizes) > 1 else COLUMN_WIDTH
    figure, axes = plt.subplots(len(SUMMARY_PANELS), len(sizes), figsize=(width, 3.6), sharex=True, sharey=True,
                                squeeze=False, layout="constrained")
    legend_entries: dict[str, dict] = {}
    curves = []
    for column_index, size in enumerate(sizes):
        lines = group_rows([row for row in rows if row["size"] == size],
                       lambda row: (row["version"], variant_label(row, variants)))
        counts: dict[str, int] = defaultdict(int)
        for (version, variant), line_rows in sorted(lines.items(), key=lambda item: (-version_order(item[0][0]),
                                                                                     item[0][1])):
            style = line_style(version, counts[version])
            counts[version] += 1
            legend_entries.setdefault(VERSION_NAMES[version] + (f" ({variant})" if variant else ""), style)
            for row_index, (column, _, _) in enumerate(SUMMARY_PANELS):
                curve = summary_curve(line_rows, "mask_ratio", column)
                draw_curve(axes[row_index, column_index], curve, style)
                curves.append(curve)

    _label_grid(axes, [_size_title(size, rows) for size in sizes], [label for _, _, label in SUMMARY_PANELS])
    axes[0, 0].set_xticks(sorted(ratios))
    axes[0, 0].set_ylim(*_distance_limits([row[column] for row in rows for column, _, _ in SUMMARY_PANELS]))
    figure.supxlabel("mask ratio (fraction of patches removed)", fontsize=8)
    figure.supylabel(DISTANCE_LABEL, fontsize=8)
    _figure_legend(figure, legend_entries, len(sizes))

    result.figure = figure
    result.caption = ("Final-layer (top) and mean (bottom) feature cosine distance against the FCMAE mask "
                      "ratio, one column per model size." + seeds_sentence(curves))
    return result


# 4. Distance during training.

def distance_vs_epoch(history: list[dict], positions: list[float]) -> SweepFigure:
    """Distance against training epoch at chosen normalized depths, one line per member."""
    result = SweepFigure("distance_vs_epoch", "Feature cosine distance during training")
    by_member = {name: rows for name, rows in group_rows(history, "member").items()
                 if len({row["step"] for row in rows}) >= 2}
    if not by_member:
        result.skip_reason = ("no member has at least two in-training measurements in collapse.jsonl "
                              "(enable --collapse_every in pretraining)")
        return result

    figure, axes = plt.subplots(1, len(positions), figsize=(FULL_WIDTH, 2.4), sharey=True, squeeze=False,
                                layout="constrained")
    counts: dict[str, int] = defaultdict(int)
    all_distances, curves = [], []
    settings = seed_groups([row for rows in by_member.values() for row in rows])
    varying = setting_columns([rows[0] for rows in settings])
    # Ordered by size within each version, so the n-th colour of V1 and of V2 marks the same size.
    ordered = sorted(settings, key=lambda rows: (version_order(rows[0]["version"]), rows[0]["encoder_params"],
                                                 rows[0]["member"]))
    for rows in ordered:
        version = rows[0]["version"]
        style = line_style(version, counts[version])
        counts[version] += 1
        num_layers = max(row["layer"] for row in rows) + 1
        for axis, position in zip(axes[0], positions):
            layer = round(position * (num_layers - 1))
            curve = seed_curve([row for row in rows if row["layer"] == layer], "epoch", "distance")
            all_distances += curve.high
            # Markers on at most about 12 points, so V1's dashes stay visible between them.
            label = f"{setting_label(curve, varying)} ({VERSION_NAMES[version]})"
            draw_curve(axis, curve, style, label=label if axis is axes[0, 0] else None,
                       markevery=max(1, len(curve.x) // 12))
            curves.append(curve)

    for axis, position in zip(axes[0], positions):
        axis.set_title(_depth_title(position))
        axis.set_xlabel("training epoch")
        axis.xaxis.get_major_locator().set_params(integer=True)
    axes[0, 0].set_ylabel(DISTANCE_LABEL)
    axes[0, 0].set_ylim(*_distance_limits(all_distances))
    _legend_below(figure, axes[0, 0], columns=2)

    result.figure = figure
    result.caption = ("Feature cosine distance measured during pretraining (collapse.jsonl) for the block "
                      "nearest to each normalized depth, one line per member; epoch 0 is the initialization."
                      + seeds_sentence(curves))
    return result


def _depth_title(position: float) -> str:
    names = {0.0: " (first block)", 1.0: " (last block)"}
    return f"normalized depth {position:.2f}{names.get(position, ' (nearest block)')}"


def _legend_below(figure, axes, columns: int) -> None:
    # Legends fill column by column: with one column per version, each column lists one version.
    handles, labels = axes.get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncol=max(1, min(columns, len(handles))))


# 6. Initialization against trained encoder.

def init_vs_trained(history: list[dict]) -> SweepFigure:
    """Distance per layer of the random initialization (epoch 0) and of the last measurement, per member."""
    result = SweepFigure("init_vs_trained", "Feature cosine distance before and after pretraining")
    by_member = {name: rows for name, rows in group_rows(history, "member").items()
                 if min(row["epoch"] for row in rows) == 0 and max(row["epoch"] for row in rows) > 0}
    if not by_member:
        result.skip_reason = ("no member has an epoch-0 and a later measurement in collapse.jsonl "
                              "(enable --collapse_every in pretraining)")
        return result

    settings = seed_groups([row for rows in by_member.values() for row in rows])
    sizes = size_order([rows[0] for rows in settings])
    figure, axes = plt.subplots(1, len(sizes), figsize=(FULL_WIDTH if len(sizes) > 1 else COLUMN_WIDTH, 2.6),
                                sharey=True, squeeze=False, layout="constrained")
    legend_entries: dict[str, dict] = {}
    curves: list[SeedCurve] = []
    # Version names label the lines unless a size has several settings of one version.
    pairs = [(rows[0]["size"], rows[0]["version"]) for rows in settings]
    varying = setting_columns([rows[0] for rows in settings]) if len(set(pairs)) < len(pairs) else None
    for axis, size in zip(axes[0], sizes):
        in_size = [rows for rows in settings if rows[0]["size"] == size]
        curves += _draw_init_panel(axis, in_size, legend_entries, varying)
        axis.set_title(_size_title(size, [rows[0] for rows in in_size]))
        axis.set_xlabel("normalized layer index")
    axes[0, 0].set_ylabel(DISTANCE_LABEL)
    axes[0, 0].set_ylim(*_distance_limits([row["distance"] for rows in by_member.values() for row in rows]))
    _figure_legend(figure, legend_entries, columns=2)

    result.figure = figure
    result.caption = ("Feature cosine distance per block of the randomly initialized encoder (epoch 0, thin "
                      "lines, hollow markers) and at the last in-training measurement (thick lines), "
                      "on the same images." + seeds_sentence(curves))
    return result


def _draw_init_panel(axis, settings: list[list[dict]], legend_entries: dict,
                     varying: list[tuple[str, str]] | None) -> list[SeedCurve]:
    """Draw each setting's init and trained lines; label them by setting when `varying` is given."""
    counts: dict[str, int] = defaultdict(int)
    curves = []
    for rows in sorted(settings, key=lambda rows: (-version_order(rows[0]["version"]), rows[0]["member"])):
        version = rows[0]["version"]
        style = line_style(version, counts[version])
        counts[version] += 1
        last_epoch = max(row["epoch"] for row in rows)
        for epoch, weight in ((0, "init"), (last_epoch, "trained")):
            curve = seed_curve([row for row in rows if row["epoch"] == epoch], "normalized_layer", "distance")
            drawn = dict(style, linewidth=0.7, markerfacecolor="none", alpha=0.8) if weight == "init" else style
            draw_curve(axis, curve, drawn)
            stage = "random init" if weight == "init" else f"epoch {last_epoch}"
            label = f"{VERSION_NAMES[version] if varying is None else setting_label(curve, varying)}, {stage}"
            legend_entries.setdefault(label, drawn)
            curves.append(curve)
    return curves


# 2. Activation grids.

def activation_pairs(sweep: Sweep, summary: list[dict]) -> list[tuple[str, dict, dict]]:
    """Pick (size, V1 row, V2 row) per size analysed in both versions, at the common mask ratio nearest 0.6."""
    analysed = [row for row in summary if row.get("mean_distance") is not None]
    pairs = []
    for size in size_order(analysed):
        by_version = {version: [row for row in analysed if row["size"] == size and row["version"] == version]
                      for version in ("v1", "v2")}
        common = {row["mask_ratio"] for row in by_version["v1"]} & {row["mask_ratio"] for row in by_version["v2"]}
        if not common:
            continue
        ratio = min(common, key=lambda value: (abs(value - DEFAULT_MASK_RATIO), value))
        first = [next(row for row in by_version[version] if row["mask_ratio"] == ratio) for version in ("v1", "v2")]
        pairs.append((size, first[0], first[1]))
    return pairs


def activation_figures(sweep: Sweep, tables: SweepTables, images: str, num_channels: int,
                       num_images: int) -> list[SweepFigure]:
    """Draw V1 and V2 channel maps side by side, same layer and channels, one figure per size."""
    from analysis.activations import prepare_activations
    from analysis.figures import build_activation_figure

    pairs = activation_pairs(sweep, tables.summary)
    if not pairs:
        return [SweepFigure("activations", "Channel activation maps, V1 and V2",
                            skip_reason="no model size has analysed members of both versions at a common mask "
                                        "ratio")]

    figures = []
    for size, v1_row, v2_row in pairs:
        names = [v1_row["member"], v2_row["member"]]
        rows = [{**row, "run": row["member"]} for row in tables.layers if row["member"] in names]
        drawn = prepare_activations([sweep.folder / name for name in names], None, num_channels, num_images, 0,
                                    None, images, rows=rows, labels=names)
        figure = build_activation_figure(drawn.photos, drawn.panels, drawn.caption, caption_fontsize=8,
                                         tile_inches=1.8)
        figures.append(SweepFigure(
            f"activations_{size}", f"Channel activation maps, {size}, mask {v1_row['mask_ratio']:.2f}",
            caption=(f"{drawn.caption} Left: input photos; then {names[0]} (V1) and {names[1]} (V2), "
                     f"same layer and channels."), figure=figure))
    return figures


# All figures.

def build_sweep_figures(sweep: Sweep, tables: SweepTables, epoch_layers: list[float], images: str,
                        num_channels: int, num_images: int) -> list[SweepFigure]:
    """Build the sweep figures in report order; skipped ones carry their reason."""
    from_tables = table_figures(tables, epoch_layers)
    with paper_style():
        activations = activation_figures(sweep, tables, images, num_channels, num_images)
    results = [from_tables[0], *activations, *from_tables[1:]]
    log_skipped(results)
    return results


def table_figures(tables: SweepTables, epoch_layers: list[float]) -> list[SweepFigure]:
    """Build the figures drawn from the tables alone (all but the activation maps), in report order."""
    with paper_style():
        results = [distance_per_layer(tables.layers),
                   capacity(tables.summary),
                   distance_vs_epoch(tables.history, epoch_layers),
                   init_vs_trained(tables.history),
                   mask_ratio(tables.summary)]
    return results


def log_skipped(results: list[SweepFigure]) -> None:
    for result in results:
        if result.skip_reason:
            logger.info("skipping figure %s: %s", result.name, result.skip_reason)


def save_sweep_figures(results: list[SweepFigure], folder: Path) -> list[Path]:
    """Write each drawn figure as PDF (vector) and PNG (300 dpi); remove files of figures now skipped."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    with paper_style():
        for result in results:
            if result.figure is None:
                continue
            result.paths = [folder / f"{result.name}.pdf", folder / f"{result.name}.png"]
            for path in result.paths:
                # Without a creation date, the same tables give byte-identical PDFs (stable diffs).
                metadata = {"CreationDate": None} if path.suffix == ".pdf" else None
                result.figure.savefig(path, bbox_inches="tight", pad_inches=0.03, metadata=metadata)
            written += result.paths
            logger.info("wrote %s", ", ".join(str(path) for path in result.paths))

    for stale in sorted(set(folder.glob("*.pdf")) | set(folder.glob("*.png"))):
        if stale not in written:
            logger.info("removing %s, a figure that this run did not draw", stale)
            stale.unlink()
    return written


def close_figures(results: list[SweepFigure]) -> None:
    for result in results:
        if result.figure is not None:
            plt.close(result.figure)
            result.figure = None
