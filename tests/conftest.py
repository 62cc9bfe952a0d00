"""Shared fixtures: small real image folders and deterministic torch settings."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def write_photos(folder: Path, count: int, size=(96, 80), seed: int = 0) -> list[Path]:
    """Write `count` smooth random RGB JPEGs (real files Pillow can decode)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    paths = []
    for i in range(count):
        coarse = torch.rand(3, 6, 6, generator=generator)
        image = torch.nn.functional.interpolate(coarse[None], size=size[::-1], mode="bilinear")[0]
        array = (image.permute(1, 2, 0).numpy() * 255).astype("uint8")
        path = folder / f"img_{i:03d}.jpg"
        Image.fromarray(array).save(path, quality=95)
        paths.append(path)
    return paths


@pytest.fixture
def photo_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    write_photos(folder, 8)
    return folder
