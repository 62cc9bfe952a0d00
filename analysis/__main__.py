"""Command line for the feature-collapse analysis: `python -m analysis COMMAND`.

Commands for runs: cosine, activations, figures. Commands for sweep folders: aggregate,
figures, tensorboard, report. For copied tables (such as results/): replot. For data sets:
check_data. `python -m analysis` lists them;
`COMMAND --help` shows options.

Every command except check_data returns the paths it wrote, one per line, on stdout;
check_data returns its report. Logs go to stderr.
Invalid input ends the program with a one-line error and exit status 2. List options take
several values separated by commas (`--epoch_layers 0,0.5,1`).
"""

from __future__ import annotations

import inspect
import logging
import sys
from pathlib import Path

import fire

from analysis import AnalysisError
from analysis.sweep_commands import DEFAULT_EPOCH_LAYERS

logger = logging.getLogger("analysis")

# The value of --images that selects the photos shipped in installed packages, as in fcmae.data.
SAMPLE_DATA = "sample"
# Photos per activation figure of a sweep: fewer rows than the single-run default keep it one page.
SWEEP_ACTIVATION_IMAGES = 3
# Input errors raised by library modules, as (module, class); the CLI reports them without a traceback.
LIBRARY_INPUT_ERRORS = (("fcmae.collapse", "FeatureError"), ("fcmae.data", "DataError"),
                        ("fcmae.registry", "UnknownModelError"))


def cosine(*paths, output_dir=None, input_size=None, images=SAMPLE_DATA, max_images=None, batch_size=16,
           tensorboard=True):
    """Measure the feature cosine distance of every layer of each run.

    Args:
        paths: run folders, encoder state dicts (timm keys), training checkpoints, or official
            ConvNeXt / ConvNeXt-V2 checkpoints (fine-tuned or FCMAE encoder-only). Pass several
            arguments or one comma-separated string.
        output_dir: folder for cosine_distance.csv, cosine_distance.json and tensorboard/cosine.
            Defaults to the parent folder of the first path.
        input_size: image side in pixels. Defaults to each run's config input_size, else 224.
        images: 'sample' (photos shipped with installed packages) or an image folder.
        max_images: use only the first N images in sorted order. Defaults to all images.
        batch_size: images per forward pass.
        tensorboard: write output_dir/tensorboard/cosine (--tensorboard=False to skip it, e.g. for a
            sweep member, whose own run gets the distances from 'python -m analysis tensorboard').
    """
    from analysis.cosine import parse_paths, run_cosine

    written = run_cosine(parse_paths(paths), output_dir, input_size, images, max_images, batch_size,
                         tensorboard=bool(tensorboard))
    return "\n".join(str(path) for path in written)


def activations(*paths, layer=None, output_dir=None, num_channels=64, num_images=4, seed=0, input_size=None,
                images=SAMPLE_DATA):
    """Draw the channel maps of one layer for each run, side by side.

    Args:
        paths: run folders, encoder state dicts, training checkpoints or official ConvNeXt /
            ConvNeXt-V2 checkpoints (several, or comma-separated).
        layer: block index 0..K-1. Defaults to the layer where the V1 and V2 runs differ most
            in output_dir/cosine_distance.csv, else to its lowest-distance layer. Without
            that CSV, the distances are measured first.
        output_dir: folder for activations.png and activations_<run>.png. Defaults to the
            parent folder of the first path.
        num_channels: channels drawn per model, sampled with `seed`.
        num_images: number of photos, the first N of `images`.
        seed: seed of the channel sample; equal seeds draw equal channels for equal widths.
        input_size: image side in pixels. Defaults to the first run's config input_size, else 224.
        images: 'sample' or an image folder.
    """
    from analysis.activations import run_activations
    from analysis.cosine import parse_paths

    written = run_activations(parse_paths(paths), layer, output_dir, num_channels, num_images, seed,
                              input_size, images)
    return "\n".join(str(path) for path in written)


def figures(dir_or_csv, epoch_layers=DEFAULT_EPOCH_LAYERS, images=SAMPLE_DATA, num_channels=64,
            num_images=SWEEP_ACTIVATION_IMAGES):
    """Plot distance per layer for a cosine output folder, or the five sweep figures for a sweep folder.

    Args:
        dir_or_csv: a folder with cosine_distance.csv, or the CSV itself: the PNG and PDF are written
            next to the CSV. Or a sweep folder (with manifest.json, or with member run folders):
            PDF and PNG figures go to SWEEP_DIR/figures, the gathered tables to SWEEP_DIR.
        epoch_layers: sweep only; normalized depths (0 = first block, 1 = last) of the blocks
            drawn against training epoch, comma-separated.
        images: sweep only; 'sample' or an image folder, for the activation maps.
        num_channels: sweep only; channels drawn per model in the activation maps.
        num_images: sweep only; photos in the activation maps.
    """
    from analysis.sweep import is_sweep_folder

    if is_sweep_folder(Path(str(dir_or_csv))):
        from analysis.sweep_commands import run_figures

        return _lines(run_figures(dir_or_csv, epoch_layers, images, num_channels, num_images))

    from analysis.figures import plot_cosine_distance

    return _lines(plot_cosine_distance(dir_or_csv))


def aggregate(sweep_dir, images=SAMPLE_DATA, max_images=None, batch_size=16, input_size=None, force=False,
              epoch_layers=DEFAULT_EPOCH_LAYERS, num_channels=64, num_images=SWEEP_ACTIVATION_IMAGES):
    """Measure sweep members that lack distances, then write summary.csv, figures, TensorBoard and report.md.

    Members whose training has not completed are skipped and listed in the log and the report.
    This is the command for the final aggregation job of a sweep.

    Args:
        sweep_dir: the sweep folder (with manifest.json, or with member run folders).
        images: 'sample' (photos shipped with installed packages) or an image folder.
        max_images: measure on the first N images only. Defaults to all images.
        batch_size: images per forward pass.
        input_size: image side in pixels. Defaults to each member's config input_size.
        force: measure every member again, even those with an up-to-date cosine_distance.csv.
        epoch_layers: normalized depths (0 = first block, 1 = last) of the blocks drawn
            against training epoch, comma-separated.
        num_channels: channels drawn per model in the activation maps.
        num_images: photos in the activation maps.
    """
    from analysis.sweep_commands import run_aggregate

    return _lines(run_aggregate(sweep_dir, images, max_images, batch_size, input_size, force, epoch_layers,
                                num_channels, num_images))


def tensorboard(sweep_dir, epoch_layers=DEFAULT_EPOCH_LAYERS, images=SAMPLE_DATA, num_channels=64,
                num_images=SWEEP_ACTIVATION_IMAGES):
    """Write HParams and analysis images into each member's TensorBoard run, figures into tensorboard/summary.

    Afterwards `tensorboard --logdir SWEEP_DIR` compares the members. Running it again
    replaces the analysis events instead of adding points.

    Args:
        sweep_dir: the sweep folder.
        epoch_layers: normalized depths of the blocks drawn against training epoch, comma-separated.
        images: 'sample' or an image folder, for the activation maps.
        num_channels: channels drawn per model in the activation maps.
        num_images: photos in the activation maps.
    """
    from analysis.sweep_commands import run_tensorboard

    return _lines(run_tensorboard(sweep_dir, epoch_layers, images, num_channels, num_images))


def report(sweep_dir, epoch_layers=DEFAULT_EPOCH_LAYERS, images=SAMPLE_DATA, num_channels=64,
           num_images=SWEEP_ACTIVATION_IMAGES):
    """Write SWEEP_DIR/report.md: a table of every member's numbers and all sweep figures.

    Uses the distances already measured; run `aggregate` first to measure missing members.

    Args:
        sweep_dir: the sweep folder.
        epoch_layers: normalized depths of the blocks drawn against training epoch, comma-separated.
        images: 'sample' or an image folder, for the activation maps.
        num_channels: channels drawn per model in the activation maps.
        num_images: photos in the activation maps.
    """
    from analysis.sweep_commands import run_report

    return _lines(run_report(sweep_dir, epoch_layers, images, num_channels, num_images))


def replot(folder, epoch_layers=DEFAULT_EPOCH_LAYERS):
    """Redraw the figures of committed tables (summary.csv, layer_distances.csv, collapse_history.csv).

    Needs no run folders or weights: every figure but the activation maps is drawn from the
    tables alone and written as PDF and PNG to <tables folder>/figures.

    Args:
        folder: a folder with the three CSV files that 'aggregate' writes to a sweep folder, or a
            folder of such folders (e.g. results/), each redrawn in turn.
        epoch_layers: normalized depths of the blocks drawn against training epoch, comma-separated.
    """
    from analysis.replot import replot as run_replot
    from analysis.sweep_commands import parse_positions

    return _lines(run_replot(folder, parse_positions(epoch_layers)))


def check_data(path, workers=None, allow_unreadable=False):
    """Decode every image under a data folder as training does; list the files that cannot be decoded.

    Args:
        path: an image folder (flat or one subfolder per class), or 'sample'.
        workers: decoding processes. Defaults to the CPUs available to this process.
        allow_unreadable: exit with status 0 even when some files cannot be decoded (else 1).
    """
    from analysis.check_data import run_check_data

    return run_check_data(path, workers, allow_unreadable)


def _lines(paths) -> str:
    return "\n".join(str(path) for path in paths)


COMMANDS = {"cosine": cosine, "activations": activations, "figures": figures, "aggregate": aggregate,
            "tensorboard": tensorboard, "report": report, "replot": replot, "check_data": check_data}


def check_options(argv: list[str]) -> None:
    """Reject a --flag that the command does not define, before the command runs.

    With *paths in a signature, fire (0.7.1) runs the command first and fails only afterwards on
    the unused flag, so an unknown flag would cost a full computation.
    """
    if len(argv) < 2 or argv[1] not in COMMANDS:
        return

    command = argv[1]
    valid = {name for name in inspect.signature(COMMANDS[command]).parameters if name != "paths"} | {"help"}
    for token in argv[2:]:
        if token == "--":
            break
        if token.startswith("--"):
            name = token[2:].split("=", 1)[0].replace("-", "_")
            if name not in valid:
                raise AnalysisError(f"unknown option --{name} for '{command}'; valid options: "
                                    f"{', '.join('--' + option for option in sorted(valid))}")


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # matplotlib's PDF backend subsets fonts through fontTools, which logs every table at INFO.
    logging.getLogger("fontTools").setLevel(logging.WARNING)
    try:
        check_options(sys.argv)
        fire.Fire(COMMANDS, name="analysis")
    except Exception as error:
        if not isinstance(error, input_error_types()):
            raise
        logger.error("%s", error)
        sys.exit(2)


def input_error_types() -> tuple[type, ...]:
    """Return the exception types that mean invalid input, among the modules imported so far.

    A module that was never imported cannot have raised its error, so the commands can
    import torch, timm and torchvision lazily.
    """
    types = [AnalysisError]
    for module_name, class_name in LIBRARY_INPUT_ERRORS:
        module = sys.modules.get(module_name)
        if module is not None:
            types.append(getattr(module, class_name))
    return tuple(types)


if __name__ == "__main__":
    main()
