"""Image data for FCMAE pretraining: file discovery, deterministic augmentation and masks.

Every random choice of a sample (crop, flip, mask) is drawn from a generator seeded by
(seed, epoch, sample index), so a sample looks the same whichever worker, rank or
resumed job loads it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps
from torch.utils.data import Dataset, Sampler
from torchvision.transforms import InterpolationMode

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")
# Transparent pixels are composited onto the ImageNet mean colour, which normalizes to zero.
BACKGROUND_RGB = tuple(round(255 * m) for m in IMAGENET_MEAN)
CROP_RATIO = (3 / 4, 4 / 3)
# Random replacements tried for one sample before the loader gives up on the data set.
MAX_REPLACEMENTS = 16

# Colour photographs that ship inside installed packages (no download needed).
_SAMPLE_PHOTOS = {
    "skimage": ("data/astronaut.png", "data/chelsea.png", "data/coffee.png", "data/rocket.jpg",
                "data/motorcycle_left.png", "data/hubble_deep_field.jpg"),
    "sklearn": ("datasets/images/china.jpg", "datasets/images/flower.jpg"),
    "matplotlib": ("mpl-data/sample_data/grace_hopper.jpg",),
}
SAMPLE_DATA = "sample"


class DataError(ValueError):
    """Raised when a data path cannot be used for training or analysis."""


class BadFilesError(DataError):
    """Raised when more image files failed to decode than --max_bad_fraction allows."""


def sample_image_paths() -> list[Path]:
    """Return the paths of the colour photographs shipped inside installed packages."""
    import importlib.util

    paths = []
    for package, relative_paths in _SAMPLE_PHOTOS.items():
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise DataError(f"--data {SAMPLE_DATA} needs the package '{package}'; install it with "
                            f"'pip install scikit-image scikit-learn matplotlib'")
        root = Path(spec.origin).parent
        for relative in relative_paths:
            path = root / relative
            if not path.is_file():
                raise DataError(f"sample photo {path} is missing from the installed '{package}'")
            paths.append(path)
    return paths


def find_images(root: str | os.PathLike) -> list[Path]:
    """List the image files under `root`, sorted, skipping hidden files and folders.

    Works for an ImageNet-style tree (one folder per class) and for a flat folder.
    Symbolic links to folders are followed once; a link back to a visited folder is skipped.
    """
    root = Path(root)
    try:
        exists = root.exists()
    except PermissionError:
        raise DataError(f"data path {str(root)!r} cannot be reached: permission denied on a parent folder; "
                        f"check the permissions of every folder on the path") from None
    if not exists:
        raise DataError(f"data path {str(root)!r} does not exist; pass an image folder or --data {SAMPLE_DATA}")
    if not root.is_dir():
        raise DataError(f"data path {str(root)!r} is not a folder; pass a folder of images "
                        f"(flat or one sub-folder per class)")
    if not os.access(root, os.R_OK | os.X_OK):
        raise DataError(f"data path {str(root)!r} is not readable; check its permissions")

    found = []
    visited = set()
    for folder, subfolders, files in os.walk(root, followlinks=True, onerror=_warn_unreadable_folder):
        real = os.path.realpath(folder)
        if real in visited:
            subfolders[:] = []
            continue
        visited.add(real)
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        for name in files:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(Path(folder) / name)
    return sorted(found)


def _warn_unreadable_folder(error: OSError) -> None:
    logger.warning("skipping folder %s: %s; its images are not used", error.filename, error.strerror)


def resolve_data(data: str) -> list[Path]:
    """Return the image paths for a `--data` value: 'sample' or a folder."""
    paths = sample_image_paths() if data == SAMPLE_DATA else find_images(data)
    if not paths:
        raise DataError(f"data folder {data!r} contains no images with extensions {', '.join(IMAGE_EXTENSIONS)}; "
                        f"pass a folder of images or --data {SAMPLE_DATA}")
    return paths


def load_rgb(path: Path, min_side: int | None = None) -> Image.Image:
    """Decode an image file to 3-channel RGB with its EXIF orientation applied (see `decode_rgb`)."""
    return decode_rgb(path, min_side)[0]


def decode_rgb(path: Path, min_side: int | None = None) -> tuple[Image.Image, str | None]:
    """Decode an image file to RGB; return the image and the file's format as Pillow names it.

    The format comes from the file's content, not its extension. The EXIF orientation is
    applied, and multi-frame files give their first frame. With `min_side`, a JPEG is decoded
    at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling) when its short side stays at least
    `min_side`, which bounds the memory a large photo needs. Raises whatever Pillow raises
    for a file it cannot decode.

    NOTE: Pillow rejects images above 2 * Image.MAX_IMAGE_PIXELS (about 179 million pixels
    by default) as decompression bombs, so such files count as undecodable.
    """
    with Image.open(path) as image:
        file_format = image.format
        if min_side and file_format == "JPEG":
            image.draft(None, (min_side, min_side))
        image = ImageOps.exif_transpose(image)
        return to_rgb(image), file_format


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB; transparency is composited onto BACKGROUND_RGB.

    16-bit grayscale is scaled from 0..65535 to 0..255, where Pillow's own conversion would
    clip every value above 255 to white. Other modes use Pillow's conversion; for CMYK it
    ignores an embedded ICC profile, and modes without one (LAB) raise ValueError.
    """
    if image.mode.startswith("I;16") or image.mode == "I":
        # NOTE: mode I (32-bit integers) is treated as 16-bit samples, which is what 16-bit
        # PNG, TIFF and PGM files decode to. Larger values are clipped to 65535.
        samples = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
        image = Image.fromarray(((samples * 255 + 32767) // 65535).astype(np.uint8))
    if image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, BACKGROUND_RGB)
        background.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def describe_decode_error(error: BaseException) -> str:
    """Return a one-line reason for a failed decode, e.g. 'OSError: image file is truncated'."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def decode_min_side(input_size: int, scale: tuple[float, float]) -> int:
    """Return the short side an image needs so that even the smallest random crop has `input_size` pixels a side.

    The smallest crop covers scale[0] of the image area at the narrowest aspect ratio, so its
    short side is at least sqrt(scale[0] * CROP_RATIO[0]) times the image's short side.
    """
    return math.ceil(input_size / math.sqrt(scale[0] * CROP_RATIO[0]))


def sample_seed(*parts: int) -> int:
    """Hash integers into a 63-bit seed; equal parts give equal seeds on every machine."""
    digest = hashlib.blake2b(",".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def random_resized_crop_params(width: int, height: int, rng: random.Random,
                               scale=(0.2, 1.0), ratio=CROP_RATIO) -> tuple[int, int, int, int]:
    """Draw (top, left, crop_height, crop_width) like RandomResizedCrop, from `rng`."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w

    # Fall back to the largest centred crop within the ratio range.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_patch_mask(num_patches: int, mask_ratio: float, generator: torch.Generator) -> torch.Tensor:
    """Return a (L,) float mask with exactly L - int(L * (1 - mask_ratio)) ones (1 = removed)."""
    len_keep = int(num_patches * (1 - mask_ratio))
    noise = torch.rand(num_patches, generator=generator)
    ids_shuffle = torch.argsort(noise)
    mask = torch.ones(num_patches)
    mask[ids_shuffle[:len_keep]] = 0
    return mask


def normalize(tensor: torch.Tensor) -> torch.Tensor:
    return TF.normalize(tensor, IMAGENET_MEAN, IMAGENET_STD)


def eval_transform(image: Image.Image, input_size: int) -> torch.Tensor:
    """Resize the short side to `input_size` (bicubic), centre-crop, normalize: (3, S, S)."""
    image = TF.resize(image, input_size, interpolation=InterpolationMode.BICUBIC)
    image = TF.center_crop(image, input_size)
    return normalize(TF.to_tensor(image))


def load_eval_images(paths: list[Path], input_size: int, limit: int | None = None) -> torch.Tensor:
    """Load images with the evaluation transform into one (B, 3, S, S) batch.

    Without `limit`, every path is decoded and a file that fails raises. With it, the first
    `limit` files that decode are used and each file that fails is skipped with a warning,
    so a running job never stops on one bad file; DataError if none decodes.
    """
    if limit is None:
        return torch.stack([eval_transform(load_rgb(p), input_size) for p in paths])

    tensors = []
    for path in paths:
        if len(tensors) == limit:
            break
        try:
            image = load_rgb(path)
        except Exception as error:  # Pillow's decoders raise many exception types
            logger.warning("skipping image file %s: %s", path, describe_decode_error(error))
            continue
        tensors.append(eval_transform(image, input_size))
    if not tensors:
        raise DataError(f"none of the {len(paths)} image files could be decoded; check them with "
                        f"'python -m analysis check_data FOLDER'")
    return torch.stack(tensors)


@dataclass(frozen=True)
class AugmentConfig:
    input_size: int
    patch_size: int
    mask_ratio: float
    seed: int
    scale: tuple[float, float] = (0.2, 1.0)


class PretrainDataset(Dataset):
    """Images with FCMAE augmentation and a random patch mask per sample.

    Indexed by (epoch, index) pairs from `ResumableSampler`. `repeat` presents every file
    that many times per epoch (each time with a different crop), which gives small
    folders such as the sample photos a useful epoch length.

    A file that cannot be decoded is replaced by another file drawn from a generator seeded
    by (seed, epoch, index, attempt), so the replacement is the same in every worker and
    every resumed job. Items are (image (3, S, S), mask (L,), index). With
    `report_bad_files`, a fourth element lists the files that failed for this sample as a
    JSON string (see `parse_bad_files`), or is empty. The training process counts those,
    because failures happen in DataLoader worker processes. Without it, each worker logs
    every failed file once.
    """

    def __init__(self, paths: list[Path], augment: AugmentConfig, repeat: int = 1, report_bad_files: bool = False):
        self.paths = list(paths)
        self.augment = augment
        self.repeat = repeat
        self.report_bad_files = report_bad_files
        self.min_side = decode_min_side(augment.input_size, augment.scale)
        grid = augment.input_size // augment.patch_size
        self.num_patches = grid * grid
        self._logged_bad: set[str] = set()

    def __len__(self) -> int:
        return len(self.paths) * self.repeat

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        cfg = self.augment
        seed = sample_seed(cfg.seed, epoch, index)
        rng = random.Random(seed)

        image, failures = self._load(epoch, index)
        top, left, h, w = random_resized_crop_params(image.width, image.height, rng, scale=cfg.scale)
        image = TF.resized_crop(image, top, left, h, w, [cfg.input_size, cfg.input_size],
                                interpolation=InterpolationMode.BICUBIC)
        if rng.random() < 0.5:
            image = TF.hflip(image)
        tensor = normalize(TF.to_tensor(image))

        generator = torch.Generator().manual_seed(seed)
        mask = random_patch_mask(self.num_patches, cfg.mask_ratio, generator)
        if self.report_bad_files:
            return tensor, mask, index, json.dumps(failures) if failures else ""
        return tensor, mask, index

    def _load(self, epoch: int, index: int) -> tuple[Image.Image, list[list[str]]]:
        """Decode the file of sample `index`, or replacements for it; return it and [path, reason] failures."""
        failures = []
        file_index = index % len(self.paths)
        for attempt in range(1, MAX_REPLACEMENTS + 2):
            path = self.paths[file_index]
            try:
                image = load_rgb(path, self.min_side)
            # Pillow's decoders raise many exception types (OSError, SyntaxError, ValueError,
            # struct.error, DecompressionBombError, ...), and this block only decodes.
            except Exception as error:
                failures.append([str(path), describe_decode_error(error)])
                if not self.report_bad_files:
                    self._log_once(*failures[-1])
                replacement_rng = random.Random(sample_seed(self.augment.seed, epoch, index, attempt))
                file_index = replacement_rng.randrange(len(self.paths))
                continue
            return image, failures

        listing = "; ".join(f"{path} ({reason})" for path, reason in failures)
        raise DataError(f"sample {index} of epoch {epoch}: its file and {MAX_REPLACEMENTS} random replacements "
                        f"all failed to decode: {listing}. Check the data with 'python -m analysis check_data "
                        f"DATA' and remove or fix the unreadable files")

    def _log_once(self, path: str, reason: str) -> None:
        if path not in self._logged_bad:
            self._logged_bad.add(path)
            logger.warning("cannot decode image file %s (%s); using another file for this sample", path, reason)


def parse_bad_files(reports) -> list[tuple[str, str]]:
    """Return the (path, reason) pairs in a batch's bad-file reports from `PretrainDataset`."""
    pairs = []
    for report in reports:
        if report:
            pairs.extend((path, reason) for path, reason in json.loads(report))
    return pairs


class BadFileTracker:
    """The distinct image files of a run that failed to decode, and the threshold check.

    The share is counted over all files of the data set, so it only grows as training
    reaches more of them. A run stops once the files found so far exceed the threshold,
    never on an estimate from a few samples.
    """

    def __init__(self, num_files: int, max_fraction: float):
        self.num_files = num_files
        self.max_fraction = max_fraction
        self.reasons: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.reasons)

    @property
    def fraction(self) -> float:
        return len(self.reasons) / self.num_files

    def add(self, pairs) -> list[tuple[str, str]]:
        """Record (path, reason) pairs; return those whose path was not recorded before."""
        new = []
        for path, reason in pairs:
            if path not in self.reasons:
                self.reasons[path] = reason
                new.append((path, reason))
        return new

    def check(self, listing_file: Path | None = None, max_listed: int = 20) -> None:
        """Raise BadFilesError when the share of bad files exceeds `max_fraction`."""
        if self.fraction <= self.max_fraction:
            return
        items = list(self.reasons.items())
        listing = "\n".join(f"  {path}: {reason}" for path, reason in items[:max_listed])
        if len(items) > max_listed:
            listing += f"\n  ... and {len(items) - max_listed} more"
            if listing_file is not None:
                listing += f", all listed in {listing_file}"
        raise BadFilesError(
            f"{len(items)} of {self.num_files} image files ({self.fraction:.2%}) failed to decode, more than "
            f"--max_bad_fraction {self.max_fraction} allows:\n{listing}\nFix or remove these files (python -m "
            f"analysis check_data DATA lists every one), or raise --max_bad_fraction, then resume")

    def state_dict(self) -> dict[str, str]:
        return dict(self.reasons)

    def load_state_dict(self, reasons: dict[str, str]) -> None:
        self.reasons = dict(reasons)


class ResumableSampler(Sampler):
    """Shard a per-epoch permutation over ranks and start anywhere inside an epoch.

    The permutation depends on (seed, epoch) only. Rank r takes positions r, r + world, ...
    of the first `iters_per_epoch * batch_size * world_size` entries, so the global batch of
    step k holds the same samples for any split of the same global batch over ranks.
    Yields (epoch, index) pairs for `PretrainDataset`.
    """

    def __init__(self, num_samples: int, batch_size: int, world_size: int, rank: int,
                 seed: int, iters_per_epoch: int):
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.iters_per_epoch = iters_per_epoch
        self.epoch = 0
        self.start_iter = 0

    def set_position(self, epoch: int, start_iter: int = 0) -> None:
        """Make the next iteration yield epoch `epoch` from micro-batch `start_iter` on."""
        self.epoch = epoch
        self.start_iter = start_iter

    def __len__(self) -> int:
        return (self.iters_per_epoch - self.start_iter) * self.batch_size

    def __iter__(self):
        generator = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, -1))
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        used = order[: self.iters_per_epoch * self.batch_size * self.world_size]
        mine = used[self.rank::self.world_size]
        for index in mine[self.start_iter * self.batch_size:]:
            yield self.epoch, index


def iters_per_epoch(num_samples: int, batch_size: int, world_size: int, update_freq: int) -> int:
    """Micro-batches per epoch and rank: full global batches only, a multiple of update_freq."""
    full_batches = num_samples // (batch_size * world_size)
    return full_batches // update_freq * update_freq


def worker_init(worker_id: int) -> None:
    """Make DataLoader workers ignore SIGUSR1/SIGUSR2/SIGTERM so only the main process handles them."""
    import signal

    for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    torch.set_num_threads(1)
