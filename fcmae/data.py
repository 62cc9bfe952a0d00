"""Image data for FCMAE pretraining: file discovery, deterministic augmentation and masks.

Every random choice of a sample (crop, flip, mask) is drawn from a generator seeded by
(seed, epoch, sample index), so a sample looks the same whichever worker, rank or
resumed job loads it.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps
from torch.utils.data import Dataset, Sampler
from torchvision.transforms import InterpolationMode

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")

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
    if not root.exists():
        raise DataError(f"data path {str(root)!r} does not exist; pass an image folder or --data {SAMPLE_DATA}")
    if not root.is_dir():
        raise DataError(f"data path {str(root)!r} is not a folder; pass a folder of images "
                        f"(flat or one sub-folder per class)")
    if not os.access(root, os.R_OK | os.X_OK):
        raise DataError(f"data path {str(root)!r} is not readable; check its permissions")

    found = []
    visited = set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
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


def resolve_data(data: str) -> list[Path]:
    """Return the image paths for a `--data` value: 'sample' or a folder."""
    paths = sample_image_paths() if data == SAMPLE_DATA else find_images(data)
    if not paths:
        raise DataError(f"data folder {data!r} contains no images with extensions {', '.join(IMAGE_EXTENSIONS)}; "
                        f"pass a folder of images or --data {SAMPLE_DATA}")
    return paths


def load_rgb(path: Path) -> Image.Image:
    """Decode an image file to 3-channel RGB with its EXIF orientation applied."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        return image.convert("RGB")


def sample_seed(*parts: int) -> int:
    """Hash integers into a 63-bit seed; equal parts give equal seeds on every machine."""
    digest = hashlib.blake2b(",".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def random_resized_crop_params(width: int, height: int, rng: random.Random,
                               scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
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


def load_eval_images(paths: list[Path], input_size: int) -> torch.Tensor:
    """Load images with the evaluation transform into one (B, 3, S, S) batch."""
    return torch.stack([eval_transform(load_rgb(p), input_size) for p in paths])


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
    """

    def __init__(self, paths: list[Path], augment: AugmentConfig, repeat: int = 1):
        self.paths = list(paths)
        self.augment = augment
        self.repeat = repeat
        grid = augment.input_size // augment.patch_size
        self.num_patches = grid * grid

    def __len__(self) -> int:
        return len(self.paths) * self.repeat

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        cfg = self.augment
        seed = sample_seed(cfg.seed, epoch, index)
        rng = random.Random(seed)

        image = load_rgb(self.paths[index % len(self.paths)])
        top, left, h, w = random_resized_crop_params(image.width, image.height, rng, scale=cfg.scale)
        image = TF.resized_crop(image, top, left, h, w, [cfg.input_size, cfg.input_size],
                                interpolation=InterpolationMode.BICUBIC)
        if rng.random() < 0.5:
            image = TF.hflip(image)
        tensor = normalize(TF.to_tensor(image))

        generator = torch.Generator().manual_seed(seed)
        mask = random_patch_mask(self.num_patches, cfg.mask_ratio, generator)
        return tensor, mask, index


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
