"""Per-layer feature cosine distance of one or more encoders, written as CSV, JSON and TensorBoard.

torch, timm and torchvision are imported inside the functions that use them, so that the
`figures` command and input errors do not wait for timm to import.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from analysis import AnalysisError

if TYPE_CHECKING:
    import torch

    from analysis.loading import LoadedEncoder
    from fcmae.collapse import LayerDistance

logger = logging.getLogger(__name__)

DEFAULT_INPUT_SIZE = 224
CSV_NAME = "cosine_distance.csv"
JSON_NAME = "cosine_distance.json"
TENSORBOARD_FOLDER = Path("tensorboard") / "cosine"
CSV_COLUMNS = ("run", "model", "version", "layer", "stage", "block", "normalized_layer", "distance",
               "dead_fraction")
_INT_COLUMNS = ("layer", "stage", "block")
_FLOAT_COLUMNS = ("normalized_layer", "distance", "dead_fraction")


@dataclass
class RunDistances:
    """The per-layer distances of one encoder and how they were measured."""

    label: str
    model_name: str
    version: str
    path: Path
    weights_file: Path
    input_size: int
    records: list[LayerDistance]

    def rows(self) -> list[dict]:
        """Return one CSV row (a dict keyed by CSV_COLUMNS) per layer."""
        return [{"run": self.label, "model": self.model_name, "version": self.version,
                 "layer": r.layer, "stage": r.stage, "block": r.block, "normalized_layer": r.normalized_layer,
                 "distance": r.distance, "dead_fraction": r.dead_fraction} for r in self.records]

    def metadata(self) -> dict:
        return {"label": self.label, "path": str(self.path), "weights_file": str(self.weights_file),
                "model": self.model_name, "version": self.version, "input_size": self.input_size}


def split_list(value: object) -> list[str]:
    """Turn a CLI list option into strings: a list, a tuple or a comma-separated string."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [item for element in value for item in split_list(element)]
    return [item.strip() for item in str(value).split(",") if item.strip()]


def run_labels(paths: list[Path]) -> list[str]:
    """Name each path by its run folder name or file stem, adding -2, -3, ... to repeated names.

    A weights file inside a run folder (RUN/encoder.pth, RUN/checkpoints/last.pt) is named
    "<run folder name>-<file stem>", because stems such as "last" repeat across runs.
    """
    labels = []
    for path in paths:
        base = _path_label(path.resolve())
        label = base
        suffix = 2
        while label in labels:
            label = f"{base}-{suffix}"
            suffix += 1
        labels.append(label)
    return labels


def _path_label(path: Path) -> str:
    if path.is_dir():
        return path.name

    run_folder = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    if (run_folder / "config.json").is_file():
        return f"{run_folder.name}-{path.stem}"
    return path.stem


def parse_paths(paths: tuple | list) -> list[Path]:
    """Turn CLI path arguments (several, lists or comma-separated) into existing paths."""
    parsed = [Path(item) for item in split_list(list(paths))]
    if not parsed:
        raise AnalysisError("no path given; pass one or more run folders, encoder state dicts or checkpoints")

    for path in parsed:
        if not path.exists():
            raise AnalysisError(f"path {str(path)!r} does not exist; pass a run folder, an encoder state dict "
                                f"or a checkpoint file")
    return parsed


def select_images(images: str, max_images: int | None) -> list[Path]:
    """Return the image files for --images ('sample' or a folder), the first `max_images` in sorted order."""
    from fcmae.data import IMAGE_EXTENSIONS, SAMPLE_DATA, find_images, sample_image_paths

    images = str(images)
    if images == SAMPLE_DATA:
        paths = sample_image_paths()
    elif not Path(images).is_dir():
        raise AnalysisError(f"--images {images!r} is not a folder; pass a folder of images or --images {SAMPLE_DATA}")
    else:
        paths = find_images(images)
    if not paths:
        raise AnalysisError(f"--images folder {images!r} contains no files with extensions "
                            f"{', '.join(IMAGE_EXTENSIONS)}; pass a folder of images or --images {SAMPLE_DATA}")

    if max_images is not None:
        check_positive("max_images", max_images)
        paths = paths[:max_images]
    return paths


def check_positive(option: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AnalysisError(f"--{option} must be a positive integer; got {value!r}")
    return value


def check_input_size(input_size: object) -> int:
    check_positive("input_size", input_size)
    if input_size < 32:
        raise AnalysisError(f"--input_size must be at least 32 pixels (the encoder's total stride); "
                            f"got {input_size}")
    if input_size % 32:
        logger.warning("--input_size %d is not a multiple of 32, so the last rows and columns are dropped "
                       "by the strided layers", input_size)
    return input_size


def iter_image_batches(image_paths: list[Path], input_size: int, batch_size: int) -> Iterator[torch.Tensor]:
    """Load and yield (B, 3, S, S) batches one at a time, so only one batch is in memory."""
    from fcmae.data import load_eval_images

    for start in range(0, len(image_paths), batch_size):
        yield load_eval_images(image_paths[start:start + batch_size], input_size)


def measure_run(loaded: LoadedEncoder, label: str, image_paths: list[Path], input_size: int,
                batch_size: int) -> RunDistances:
    """Measure every layer of one loaded encoder on the given images."""
    from fcmae.collapse import layer_distances

    logger.info("measuring %s (%s) on %d images at %d px", label, loaded.model_name, len(image_paths), input_size)
    batches = iter_image_batches(image_paths, input_size, batch_size)
    records = layer_distances(loaded.encoder, batches, batch_size=batch_size)
    return RunDistances(label=label, model_name=loaded.model_name, version=loaded.version, path=loaded.path,
                        weights_file=loaded.weights_file, input_size=input_size, records=records)


def measure_paths(paths: list[Path], image_paths: list[Path], input_size: int | None,
                  batch_size: int) -> list[RunDistances]:
    """Load and measure each path in turn. Without `input_size`, each run uses its config's size, else 224."""
    from analysis.loading import load_encoder

    runs = []
    for path, label in zip(paths, run_labels(paths)):
        loaded = load_encoder(path)
        size = input_size or loaded.input_size or DEFAULT_INPUT_SIZE
        runs.append(measure_run(loaded, label, image_paths, check_input_size(size), batch_size))
    return runs


@contextmanager
def replacing(path: Path, newline: str | None = None) -> Iterator[TextIO]:
    """Open a uniquely named file next to PATH for writing, then move it onto PATH in one step.

    A sweep's aggregate job may read a member's distances while that member's analysis job
    writes them, so a reader must see either the old file or the complete new one.
    """
    handle = tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp",
                                         newline=newline, delete=False)
    try:
        with handle:
            yield handle
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def write_csv(runs: list[RunDistances], path: Path) -> Path:
    with replacing(path, newline="") as file:
        writer = csv.DictWriter(file, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for run in runs:
            writer.writerows(run.rows())
    return path


def read_csv(path: Path) -> list[dict]:
    """Read a cosine_distance.csv into rows with int and float columns converted."""
    if not path.is_file():
        raise AnalysisError(f"{path} does not exist; run 'python -m analysis cosine RUN ...' first")

    with path.open(newline="") as file:
        reader = csv.DictReader(file)
        missing = [column for column in CSV_COLUMNS if column not in (reader.fieldnames or [])]
        if missing:
            raise AnalysisError(f"{path} lacks the columns {', '.join(missing)}; it was not written by "
                                f"'python -m analysis cosine'")
        rows = list(reader)

    if not rows:
        raise AnalysisError(f"{path} has no rows; rerun 'python -m analysis cosine'")
    for row in rows:
        for column in _INT_COLUMNS:
            row[column] = int(row[column])
        for column in _FLOAT_COLUMNS:
            row[column] = float(row[column])
    return rows


def write_json(runs: list[RunDistances], image_source: str, image_paths: list[Path], path: Path) -> Path:
    document = {
        "paths": [str(run.path) for run in runs],
        "runs": [run.metadata() for run in runs],
        "images": {"source": image_source, "count": len(image_paths), "files": [str(p) for p in image_paths]},
        "input_size": {run.label: run.input_size for run in runs},
        "rows": [row for run in runs for row in run.rows()],
    }
    with replacing(path) as file:
        file.write(json.dumps(document, indent=2) + "\n")
    return path


def write_tensorboard(runs: list[RunDistances], output_dir: Path) -> Path:
    """Write each run's distances to output_dir/tensorboard/cosine/<label>, step = layer index.

    Every run uses the same tags, so TensorBoard draws the runs in one chart. Event files
    from an earlier call for the same label are deleted first, so a rerun does not add
    duplicate points.
    """
    from torch.utils.tensorboard import SummaryWriter

    root = output_dir / TENSORBOARD_FOLDER
    for run in runs:
        log_dir = root / run.label
        for old in log_dir.glob("events.out.tfevents.*"):
            logger.info("replacing %s", old)
            old.unlink()

        with SummaryWriter(log_dir=str(log_dir)) as writer:
            for record in run.records:
                writer.add_scalar("cosine/feature_cosine_distance", record.distance, record.layer)
                writer.add_scalar("cosine/dead_channel_fraction", record.dead_fraction, record.layer)
    return root


def format_table(runs: list[RunDistances]) -> str:
    """Format the distances as text: one row per layer, one column per run."""
    num_layers = max(len(run.records) for run in runs)
    width = max(10, *(len(run.label) for run in runs))
    header = f"{'layer':>5} {'stage.block':>11} " + " ".join(f"{run.label:>{width}}" for run in runs)

    lines = [header]
    for layer in range(num_layers):
        position = next(f"{r.stage}.{r.block}" for run in runs for r in run.records if r.layer == layer)
        cells = []
        for run in runs:
            cell = f"{run.records[layer].distance:.4f}" if layer < len(run.records) else "-"
            cells.append(f"{cell:>{width}}")
        lines.append(f"{layer:>5} {position:>11} " + " ".join(cells))
    return "\n".join(lines)


def run_cosine(paths: list[Path], output_dir: Path | None, input_size: int | None, images: str,
               max_images: int | None, batch_size: int, tensorboard: bool = True) -> list[Path]:
    """Measure every path and write the CSV, JSON and (unless `tensorboard` is False) TensorBoard outputs.

    Returns the written paths.
    """
    check_positive("batch_size", batch_size)
    if input_size is not None:
        check_input_size(input_size)
    image_paths = select_images(images, max_images)
    output_dir = Path(str(output_dir)) if output_dir is not None else paths[0].resolve().parent
    output_dir.mkdir(parents=True, exist_ok=True)

    runs = measure_paths(paths, image_paths, input_size, batch_size)

    # The CSV marks the member as measured (see analysis.sweep), so it is replaced last.
    written = [write_json(runs, str(images), image_paths, output_dir / JSON_NAME),
               write_csv(runs, output_dir / CSV_NAME)]
    if tensorboard:
        written.append(write_tensorboard(runs, output_dir))
    logger.info("feature cosine distance per layer:\n%s", format_table(runs))
    return written

