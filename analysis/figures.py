"""Paper-style figures: feature cosine distance per layer, and grids of channel activation maps."""

from __future__ import annotations

import logging
import math
import textwrap
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot loads)
import numpy as np  # noqa: E402
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from analysis import AnalysisError  # noqa: E402
from analysis.cosine import CSV_NAME, read_csv  # noqa: E402

logger = logging.getLogger(__name__)

PLOT_NAME = "cosine_distance"
VERSION_COLORMAPS = {"v1": "Reds", "v2": "Blues"}
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")

MAP_COLORMAP = "viridis"
PADDING_COLOR = (1.0, 1.0, 1.0)
# Constant (dead) channels are drawn as grey diagonal stripes: no viridis colour is grey,
# and the stripes stand apart from the white padding between tiles.
CONSTANT_LIGHT = (0.82, 0.82, 0.82)
CONSTANT_DARK = (0.45, 0.45, 0.45)
MIN_TILE_PIXELS = 24


# Cosine distance per layer.

def resolve_csv(dir_or_csv: str | Path) -> Path:
    """Return the CSV for a folder (its cosine_distance.csv) or a CSV path."""
    path = Path(str(dir_or_csv))
    if path.is_dir():
        path = path / CSV_NAME
    if not path.is_file():
        raise AnalysisError(f"{path} does not exist; pass a folder written by 'python -m analysis cosine' "
                            f"or the path of its {CSV_NAME}")
    return path


def group_runs(rows: list[dict]) -> OrderedDict[str, list[dict]]:
    """Group CSV rows by run in file order, each run's rows sorted by layer."""
    runs: OrderedDict[str, list[dict]] = OrderedDict()
    for row in rows:
        runs.setdefault(row["run"], []).append(row)
    for run_rows in runs.values():
        run_rows.sort(key=lambda row: row["layer"])
    return runs


def run_colors(runs: OrderedDict[str, list[dict]]) -> dict[str, tuple]:
    """Give V1 runs shades of red and V2 runs shades of blue, dark to light in run order."""
    colors = {}
    for version, colormap_name in VERSION_COLORMAPS.items():
        names = [name for name, rows in runs.items() if rows[0]["version"] == version]
        colormap = plt.get_cmap(colormap_name)
        for index, name in enumerate(names):
            shade = 0.85 - 0.45 * index / max(1, len(names) - 1)
            colors[name] = colormap(shade)
    return colors


def plot_cosine_distance(dir_or_csv: str | Path) -> list[Path]:
    """Draw distance against normalized layer index, one line per run; write PNG and PDF next to the CSV."""
    csv_path = resolve_csv(dir_or_csv)
    runs = group_runs(read_csv(csv_path))
    unknown = sorted({rows[0]["version"] for rows in runs.values()} - set(VERSION_COLORMAPS))
    if unknown:
        raise AnalysisError(f"{csv_path} has unknown model versions {unknown}; expected 'v1' or 'v2'")

    figure, axes = plt.subplots(figsize=(6.0, 3.6))
    colors = run_colors(runs)
    for index, (name, rows) in enumerate(runs.items()):
        version = rows[0]["version"].upper()
        axes.plot([row["normalized_layer"] for row in rows], [row["distance"] for row in rows],
                  color=colors[name], marker=MARKERS[index % len(MARKERS)], markersize=4, linewidth=1.5,
                  label=f"{name} ({rows[0]['model']}, {version})")

    _style_distance_axes(axes, runs)
    figure.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize=8)
    figure.tight_layout()

    outputs = [csv_path.parent / f"{PLOT_NAME}.png", csv_path.parent / f"{PLOT_NAME}.pdf"]
    for output in outputs:
        figure.savefig(output, dpi=200, bbox_inches="tight")
    plt.close(figure)
    logger.info("wrote %s", ", ".join(str(output) for output in outputs))
    return outputs


def _style_distance_axes(axes, runs: OrderedDict[str, list[dict]]) -> None:
    largest = max(row["distance"] for rows in runs.values() for row in rows)
    axes.set_xlim(-0.03, 1.03)
    axes.set_ylim(0.0, max(0.55, 1.08 * largest))
    axes.set_xlabel("normalized layer index (block k of K: k / (K - 1))")
    axes.set_ylabel("feature cosine distance")
    axes.set_title("Feature cosine distance per layer (V1 red, V2 blue)", fontsize=10)
    axes.grid(True, color="0.9", linewidth=0.6)
    axes.spines[["top", "right"]].set_visible(False)


# Channel activation maps.

@dataclass
class ActivationPanel:
    """One model's column of channel grids: a mosaic per image and its count of constant tiles."""

    title: str
    mosaics: list[np.ndarray]
    constant_counts: list[int]
    num_tiles: int


def mosaic(maps: np.ndarray, constant: np.ndarray, columns: int) -> np.ndarray:
    """Tile channel maps into one RGB image with white padding between tiles.

    maps: (K, H, W) values in [0, 1]; constant: (K,) bool, True for a map without spatial
    variation, drawn as grey stripes instead of a colour. Returns (rows * T + gaps,
    columns * T + gaps, 3) floats, where each map is enlarged by an integer factor to a
    tile of T >= MIN_TILE_PIXELS pixels.
    """
    K, H, W = maps.shape
    factor = max(1, math.ceil(MIN_TILE_PIXELS / min(H, W)))
    tile_h, tile_w = H * factor, W * factor
    gap = max(1, min(tile_h, tile_w) // 10)
    rows = math.ceil(K / columns)

    colored = plt.get_cmap(MAP_COLORMAP)(maps)[..., :3]  # (K, H, W, 3)
    colored = colored.repeat(factor, axis=1).repeat(factor, axis=2)
    stripes = _constant_tile(tile_h, tile_w)

    canvas = np.ones((rows * tile_h + (rows - 1) * gap, columns * tile_w + (columns - 1) * gap, 3))
    canvas[:] = PADDING_COLOR
    for k in range(K):
        top = (k // columns) * (tile_h + gap)
        left = (k % columns) * (tile_w + gap)
        canvas[top:top + tile_h, left:left + tile_w] = stripes if constant[k] else colored[k]
    return canvas


def _constant_tile(height: int, width: int) -> np.ndarray:
    stripe = max(2, min(height, width) // 6)
    y, x = np.mgrid[0:height, 0:width]
    dark = ((x + y) % (2 * stripe)) < stripe
    tile = np.empty((height, width, 3))
    tile[:] = CONSTANT_LIGHT
    tile[dark] = CONSTANT_DARK
    return tile


def draw_activation_figure(photos: np.ndarray, panels: list[ActivationPanel], caption: str,
                           output: Path) -> Path:
    """Draw one row per photo: the photo, then each model's channel grid; save as PNG.

    photos: (B, S, S, 3) RGB values in [0, 1].
    """
    figure = build_activation_figure(photos, panels, caption)
    figure.savefig(output, dpi=150)
    plt.close(figure)
    logger.info("wrote %s", output)
    return output


def build_activation_figure(photos: np.ndarray, panels: list[ActivationPanel], caption: str,
                            caption_fontsize: float = 9, tile_inches: float = 2.3):
    """Return the figure of draw_activation_figure without saving it; the caller closes it."""
    num_rows, num_columns = len(photos), 1 + len(panels)
    width = tile_inches * num_columns + 0.9
    figure, axes = plt.subplots(num_rows, num_columns, figsize=(width, tile_inches * num_rows + 1.2),
                                squeeze=False, layout="constrained")

    for row in range(num_rows):
        _show(axes[row, 0], photos[row], "input photo" if row == 0 else None)
        for column, panel in enumerate(panels, start=1):
            _show(axes[row, column], panel.mosaics[row], panel.title if row == 0 else None)
            axes[row, column].set_xlabel(f"constant maps: {panel.constant_counts[row]}/{panel.num_tiles}",
                                         fontsize=7)

    colorbar = figure.colorbar(ScalarMappable(norm=Normalize(0, 1), cmap=MAP_COLORMAP), ax=axes[:, 1:],
                               shrink=0.5, aspect=30, pad=0.02)
    colorbar.set_label("activation, scaled per channel (min to max)", fontsize=8)
    legend = [Patch(facecolor=CONSTANT_LIGHT, edgecolor=CONSTANT_DARK, hatch="////",
                    label="constant map (dead channel)"),
              Patch(facecolor=PADDING_COLOR, edgecolor="0.6", label="padding between tiles")]
    figure.legend(handles=legend, loc="outside lower center", ncol=2, frameon=False, fontsize=8)
    figure.suptitle(textwrap.fill(caption, width=int(14 * width * 9 / caption_fontsize)), fontsize=caption_fontsize)
    return figure


def _show(axes, image: np.ndarray, title: str | None) -> None:
    axes.imshow(image, interpolation="nearest")
    axes.set_xticks([])
    axes.set_yticks([])
    for spine in axes.spines.values():
        spine.set_visible(False)
    if title:
        axes.set_title(title, fontsize=8)
