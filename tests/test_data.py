"""Data discovery, deterministic augmentation and resumable sharding on real image files."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from fcmae.data import (AugmentConfig, DataError, PretrainDataset, ResumableSampler, find_images,
                        iters_per_epoch, load_rgb, resolve_data, sample_image_paths)
from tests.conftest import write_photos


def test_sample_photos_are_real_rgb_images():
    paths = sample_image_paths()
    assert len(paths) >= 8
    for path in paths:
        image = load_rgb(path)
        assert image.mode == "RGB"
        assert min(image.size) >= 256


def test_find_images_in_class_tree_skips_hidden_and_non_images(tmp_path):
    write_photos(tmp_path / "n01", 2)
    write_photos(tmp_path / "n02", 3)
    write_photos(tmp_path / ".hidden", 2)
    (tmp_path / "n01" / "notes.txt").write_text("not an image")
    (tmp_path / "n01" / ".DS_Store.jpg").write_bytes(b"")
    found = find_images(tmp_path)
    assert len(found) == 5
    assert all(".hidden" not in str(p) for p in found)


def test_find_images_follows_folder_links_once(tmp_path):
    write_photos(tmp_path / "real", 2)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "real" / "loop").symlink_to(tmp_path / "real")
    assert len(find_images(tmp_path)) == 2


@pytest.mark.parametrize("setup, message", [
    ("missing", "does not exist"),
    ("empty", "contains no images"),
    ("file", "is not a folder"),
])
def test_resolve_data_rejects_unusable_paths(tmp_path, setup, message):
    target = tmp_path / "data"
    if setup == "empty":
        target.mkdir()
    elif setup == "file":
        target.write_text("x")
    with pytest.raises(DataError, match=message):
        resolve_data(str(target))


def _dataset(folder, ratio=0.6, size=64):
    return PretrainDataset(find_images(folder), AugmentConfig(size, 32, ratio, seed=3), repeat=2)


def test_sample_is_a_function_of_seed_epoch_and_index(photo_dir):
    dataset = _dataset(photo_dir)
    image_a, mask_a, _ = dataset[(1, 5)]
    image_b, mask_b, _ = dataset[(1, 5)]
    image_c, mask_c, _ = dataset[(2, 5)]
    assert torch.equal(image_a, image_b) and torch.equal(mask_a, mask_b)
    assert not torch.equal(image_a, image_c)
    assert image_a.shape == (3, 64, 64)


def test_dataset_mask_has_exact_kept_count(photo_dir):
    dataset = PretrainDataset(find_images(photo_dir), AugmentConfig(224, 32, 0.6, seed=0))
    for index in range(len(dataset)):
        _, mask, _ = dataset[(0, index)]
        assert int((1 - mask).sum()) == 19


def test_small_and_extreme_aspect_images_crop_to_size(tmp_path):
    Image.new("RGB", (20, 12), (200, 10, 10)).save(tmp_path / "tiny.png")
    Image.new("RGB", (900, 9), (10, 200, 10)).save(tmp_path / "wide.png")
    dataset = PretrainDataset(find_images(tmp_path), AugmentConfig(64, 32, 0.5, seed=0))
    for index in range(len(dataset)):
        image, _, _ = dataset[(0, index)]
        assert image.shape == (3, 64, 64)


def test_sampler_shards_match_single_rank_global_batches():
    single = list(ResumableSampler(40, batch_size=8, world_size=1, rank=0, seed=1, iters_per_epoch=5))
    shards = [list(ResumableSampler(40, batch_size=4, world_size=2, rank=r, seed=1, iters_per_epoch=5))
              for r in range(2)]
    for step in range(5):
        global_batch = {i for _, i in single[step * 8:(step + 1) * 8]}
        split = {i for shard in shards for _, i in shard[step * 4:(step + 1) * 4]}
        assert global_batch == split


def test_sampler_resumes_mid_epoch_without_repeats():
    sampler = ResumableSampler(50, batch_size=4, world_size=1, rank=0, seed=0, iters_per_epoch=12)
    sampler.set_position(3, 0)
    full = list(sampler)
    sampler.set_position(3, 5)
    rest = list(sampler)
    assert rest == full[5 * 4:]
    assert len(set(full)) == len(full) == 48


def test_iters_per_epoch_is_multiple_of_update_freq():
    assert iters_per_epoch(100, batch_size=8, world_size=2, update_freq=2) == 6
    assert iters_per_epoch(10, batch_size=8, world_size=2, update_freq=1) == 0
