"""Channel activation maps of one layer for several encoders, drawn side by side.

The same channels are drawn for every model of the same width: they are sampled from
the channel indices with a generator seeded by --seed.
"""

from __future__ import annotations

import logging
import math
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from analysis import AnalysisError
from analysis.cosine import (CSV_NAME, DEFAULT_INPUT_SIZE, check_input_size, check_positive, measure_run,
                             read_csv, run_labels, select_images)
from analysis.figures import ActivationPanel, draw_activation_figure, mosaic
from analysis.loading import LoadedEncoder, load_encoder
from fcmae.collapse import DEAD_CHANNEL_RTOL, extract_features, find_feature_layers
from fcmae.data import IMAGENET_MEAN, IMAGENET_STD, load_eval_images

logger = logging.getLogger(__name__)

FIGURE_NAME = "activations.png"


def select_channels(width: int, num_channels: int, seed: int) -> torch.Tensor:
    """Sample `num_channels` of `width` channel indices with a seeded generator; sorted, (num_channels,)."""
    if num_channels > width:
        raise AnalysisError(f"--num_channels {num_channels} exceeds the {width} channels of the layer; "
                            f"pass at most {width}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(width, generator=generator)[:num_channels].sort().values


def normalize_maps(features: torch.Tensor, channels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Scale each selected channel map of each image to [0, 1] and flag constant maps.

    features: (B, C, H, W). Returns maps (B, K, H, W) in [0, 1] and constant (B, K) bool
    for K selected channels. A map is constant when its max - min is at most
    DEAD_CHANNEL_RTOL times the largest absolute activation of that image in the layer
    (all channels), or when the whole layer is zero for that image.
    """
    selected = features[:, channels].double()  # (B, K, H, W)
    low = selected.amin(dim=(2, 3), keepdim=True)
    high = selected.amax(dim=(2, 3), keepdim=True)
    value_range = high - low
    scale = features.abs().amax(dim=(1, 2, 3)).double().view(-1, 1, 1, 1)  # (B, 1, 1, 1)

    constant = (value_range <= DEAD_CHANNEL_RTOL * scale) | (scale == 0)  # (B, K, 1, 1)
    maps = torch.where(constant, torch.zeros_like(selected), (selected - low) / value_range.clamp_min(1e-300))
    return maps.numpy(), constant[:, :, 0, 0].numpy()


def parse_layer(layer: object, loaded_runs: list[LoadedEncoder]) -> int:
    """Check that `layer` is a block index present in every model; return it."""
    counts = {run.model_name: len(find_feature_layers(run.encoder)) for run in loaded_runs}
    fewest = min(counts.values())
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < fewest:
        sizes = ", ".join(f"{name} has layers 0..{count - 1}" for name, count in counts.items())
        raise AnalysisError(f"--layer {layer!r} is not a valid layer index ({sizes}); pass an integer "
                            f"in 0..{fewest - 1} or leave --layer unset to choose it from {CSV_NAME}")
    return layer


def choose_layer(rows: list[dict]) -> tuple[int, str]:
    """Pick the layer to draw from cosine-distance rows; return (layer, reason).

    With V1 and V2 runs: the layer where the mean V1 and mean V2 distances differ most.
    Otherwise: the layer with the lowest mean distance. Only layers present in every run count.
    """
    by_version: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    runs_per_layer: dict[int, set[str]] = defaultdict(set)
    for row in rows:
        by_version[row["version"]][row["layer"]].append(row["distance"])
        runs_per_layer[row["layer"]].add(row["run"])
    num_runs = len({row["run"] for row in rows})
    shared = sorted(layer for layer, runs in runs_per_layer.items() if len(runs) == num_runs)

    if "v1" in by_version and "v2" in by_version:
        gaps = {layer: _mean(by_version["v1"][layer]) - _mean(by_version["v2"][layer]) for layer in shared}
        layer = max(shared, key=lambda k: abs(gaps[k]))
        lower = "V1" if gaps[layer] < 0 else "V2"
        return layer, (f"the layer where V1 and V2 distances differ most ({lower} lower by "
                       f"{abs(gaps[layer]):.3f})")

    means = {layer: _mean([d for per_layer in by_version.values() for d in per_layer[layer]]) for layer in shared}
    layer = min(shared, key=means.get)
    return layer, f"the layer with the lowest mean distance, {means[layer]:.3f}"


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def distance_rows(output_dir: Path, labels: list[str], loaded_runs: list[LoadedEncoder], images: str,
                  input_size: int) -> list[dict]:
    """Return the cosine-distance rows of these runs from output_dir's CSV, measuring runs it lacks."""
    csv_path = output_dir / CSV_NAME
    rows = []
    if csv_path.is_file():
        rows = [row for row in read_csv(csv_path) if row["run"] in labels]
        logger.info("choosing the layer from %s", csv_path)
    else:
        logger.info("%s not found, so the distances are measured to choose the layer", csv_path)

    found = {row["run"] for row in rows}
    missing = [(label, loaded) for label, loaded in zip(labels, loaded_runs) if label not in found]
    if missing and rows:
        logger.warning("%s has no rows for %s; measuring them now", csv_path, ", ".join(label for label, _ in missing))

    image_paths = select_images(images, None) if missing else []
    for label, loaded in missing:
        rows.extend(measure_run(loaded, label, image_paths, input_size, batch_size=16).rows())
    return rows


def denormalize(images: torch.Tensor) -> np.ndarray:
    """Undo the ImageNet normalization: (B, 3, S, S) -> (B, S, S, 3) RGB values in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def model_panel(label: str, loaded: LoadedEncoder, images: torch.Tensor, layer: int, num_channels: int,
                seed: int) -> ActivationPanel:
    """Draw the selected channels of one model's layer as one mosaic per image."""
    features = extract_features(loaded.encoder, images, [layer])[layer]  # (B, C, H, W)
    width = features.shape[1]
    channels = select_channels(width, num_channels, seed)
    maps, constant = normalize_maps(features, channels)

    columns = math.ceil(math.sqrt(num_channels))
    mosaics = [mosaic(maps[b], constant[b], columns) for b in range(len(maps))]
    counts = [int(constant[b].sum()) for b in range(len(maps))]
    model = f"{loaded.model_name} ({loaded.version.upper()})"
    # A run folder named after its model would repeat the model name on the first line.
    heading = model if label == loaded.model_name else f"{label}\n{model}"
    title = f"{heading}\n{num_channels} of {width} channels"
    return ActivationPanel(title=title, mosaics=mosaics, constant_counts=counts, num_tiles=num_channels)


def file_label(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", label)


@dataclass
class ActivationSet:
    """Everything one activation figure shows: the photos, one panel per model and the caption.

    photos: (B, S, S, 3) RGB values in [0, 1].
    """

    labels: list[str]
    photos: np.ndarray
    panels: list[ActivationPanel]
    caption: str
    layer: int


def prepare_activations(paths: list[Path], layer: int | None, num_channels: int, num_images: int, seed: int,
                        input_size: int | None, images: str, output_dir: Path | None = None,
                        rows: list[dict] | None = None, labels: list[str] | None = None) -> ActivationSet:
    """Load every path and compute the channel maps of one layer for the same photos and channels.

    Without `layer`, the layer is chosen from `rows` (cosine-distance rows keyed by label), or
    else from output_dir/cosine_distance.csv, measuring the runs that it lacks.
    """
    check_positive("num_channels", num_channels)
    check_positive("num_images", num_images)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise AnalysisError(f"--seed must be an integer; got {seed!r}")

    labels = labels if labels is not None else run_labels(paths)
    loaded_runs = [load_encoder(path) for path in paths]
    size = _common_input_size(input_size, loaded_runs)

    if layer is not None:
        reason = "set with --layer"
    else:
        if rows is None:
            rows = distance_rows(output_dir, labels, loaded_runs, images, size)
        layer, reason = choose_layer([row for row in rows if row["run"] in labels])
    layer = parse_layer(layer, loaded_runs)
    position = find_feature_layers(loaded_runs[0].encoder)[layer]
    logger.info("drawing layer %d (stage %d, block %d): %s", layer, position.stage, position.block, reason)

    image_paths = select_images(images, num_images)
    batch = load_eval_images(image_paths, size)  # (B, 3, S, S)
    panels = [model_panel(label, loaded, batch, layer, num_channels, seed)
              for label, loaded in zip(labels, loaded_runs)]
    caption = (f"Layer {layer}: stage {position.stage}, block {position.block}, {reason}. MLP feature maps of "
               f"{num_channels} channels sampled with seed {seed}, at {size} px input.")
    return ActivationSet(labels=labels, photos=denormalize(batch), panels=panels, caption=caption, layer=layer)


def run_activations(paths: list[Path], layer: int | None, output_dir: Path | None, num_channels: int,
                    num_images: int, seed: int, input_size: int | None, images: str,
                    per_model: bool = True) -> list[Path]:
    """Draw one layer's channel maps for every path; return the combined figure and the per-model figures.

    With `per_model` False, only the combined figure (output_dir/activations.png) is written.
    """
    output_dir = Path(str(output_dir)) if output_dir is not None else paths[0].resolve().parent
    drawn = prepare_activations(paths, layer, num_channels, num_images, seed, input_size, images,
                                output_dir=output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    written = [draw_activation_figure(drawn.photos, drawn.panels, drawn.caption, output_dir / FIGURE_NAME)]
    if per_model:
        for label, panel in zip(drawn.labels, drawn.panels):
            output = output_dir / f"activations_{file_label(label)}.png"
            written.append(draw_activation_figure(drawn.photos, [panel], drawn.caption, output))
    return written


def _common_input_size(input_size: int | None, loaded_runs: list[LoadedEncoder]) -> int:
    # One size for every model, so the maps of all models come from the same pixels.
    if input_size is not None:
        return check_input_size(input_size)

    sizes = [run.input_size for run in loaded_runs if run.input_size is not None]
    size = sizes[0] if sizes else DEFAULT_INPUT_SIZE
    if len(set(sizes)) > 1:
        logger.warning("the runs were trained at different input sizes %s; drawing all at %d px "
                       "(set --input_size to choose)", sorted(set(sizes)), size)
    return check_input_size(size)
