"""Command line for the feature-collapse analysis: `python -m analysis cosine|activations|figures`.

Every command returns the paths it wrote, one per line, on stdout. Logs go to stderr.
Invalid input ends the program with a one-line error and exit status 2.
"""

from __future__ import annotations

import inspect
import logging
import sys

import fire

from analysis import AnalysisError

logger = logging.getLogger("analysis")

# The value of --images that selects the photos shipped in installed packages, as in fcmae.data.
SAMPLE_DATA = "sample"
# Input errors raised by library modules, as (module, class); the CLI reports them without a traceback.
LIBRARY_INPUT_ERRORS = (("fcmae.collapse", "FeatureError"), ("fcmae.data", "DataError"),
                        ("fcmae.registry", "UnknownModelError"))


def cosine(*paths, output_dir=None, input_size=None, images=SAMPLE_DATA, max_images=None, batch_size=16):
    """Measure the feature cosine distance of every layer of each run.

    Args:
        paths: run folders, encoder state dicts (timm keys) or training checkpoints; several
            arguments or one comma-separated string.
        output_dir: folder for cosine_distance.csv, cosine_distance.json and tensorboard/cosine.
            Defaults to the parent folder of the first path.
        input_size: image side in pixels. Defaults to each run's config input_size, else 224.
        images: 'sample' (photos shipped with installed packages) or an image folder.
        max_images: use only the first N images in sorted order. Defaults to all images.
        batch_size: images per forward pass.
    """
    from analysis.cosine import parse_paths, run_cosine

    written = run_cosine(parse_paths(paths), output_dir, input_size, images, max_images, batch_size)
    return "\n".join(str(path) for path in written)


def activations(*paths, layer=None, output_dir=None, num_channels=64, num_images=4, seed=0, input_size=None,
                images=SAMPLE_DATA):
    """Draw the channel maps of one layer for each run, side by side.

    Args:
        paths: run folders, encoder state dicts or checkpoints (several, or comma-separated).
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


def figures(dir_or_csv):
    """Plot feature cosine distance against normalized layer index (V1 red, V2 blue).

    Args:
        dir_or_csv: a folder with cosine_distance.csv, or the CSV itself. The PNG and PDF
            are written next to the CSV.
    """
    from analysis.figures import plot_cosine_distance

    written = plot_cosine_distance(dir_or_csv)
    return "\n".join(str(path) for path in written)


COMMANDS = {"cosine": cosine, "activations": activations, "figures": figures}


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
    try:
        check_options(sys.argv)
        fire.Fire(COMMANDS)
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
