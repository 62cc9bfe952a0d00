"""Data reliability on real files: every decodable format, bad files during training, awkward names.

Every image here is written by Pillow in the test; bad files are real empty, truncated or
non-image files; `python -m analysis check_data` runs as a real process.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fcmae.checkpoint import CheckpointManager, safe_load
from fcmae.config import PretrainConfig
from fcmae.data import (BACKGROUND_RGB, AugmentConfig, BadFilesError, PretrainDataset, decode_rgb, find_images,
                        load_eval_images, load_rgb, parse_bad_files)
from fcmae.distributed import DistEnv
from fcmae.training import Trainer
from tests.conftest import write_photos

ROOT = Path(__file__).resolve().parent.parent
RED, BLUE = (220, 20, 20), (20, 20, 220)


# ------------------------------------------------------------------ formats
def write_cmyk_jpeg(path: Path) -> None:
    Image.new("RGB", (40, 30), RED).convert("CMYK").save(path, "JPEG", quality=95)


def write_png_named_jpeg(path: Path) -> None:
    Image.new("RGB", (40, 30), RED).save(path, "PNG")


def write_gray8(path: Path) -> None:
    Image.new("L", (40, 30), 100).save(path, "PNG")


def write_gray16(path: Path) -> None:
    # Left third 0, middle third 32768, right third 65535.
    samples = np.zeros((30, 42), dtype=np.uint16)
    samples[:, 14:28] = 32768
    samples[:, 28:] = 65535
    Image.fromarray(samples).save(path, "PNG")


def write_palette_with_transparency(path: Path) -> None:
    image = Image.new("P", (40, 30), 1)
    image.putpalette([0, 0, 0] + list(RED) + [0, 0, 0] * 254)
    image.paste(0, (0, 0, 20, 30))                  # left half: palette index 0, transparent
    image.save(path, "PNG", transparency=0)


def write_rgba(path: Path) -> None:
    image = Image.new("RGBA", (40, 30), RED + (255,))
    image.paste((0, 255, 0, 0), (0, 0, 20, 30))     # left half: fully transparent green
    image.save(path, "PNG")


def write_animated_gif(path: Path) -> None:
    frames = [Image.new("RGB", (40, 30), RED), Image.new("RGB", (40, 30), BLUE)]
    frames[0].save(path, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def write_webp(path: Path) -> None:
    Image.new("RGB", (40, 30), RED).save(path, "WEBP", lossless=True)


def write_bmp(path: Path) -> None:
    Image.new("RGB", (40, 30), RED).save(path, "BMP")


def write_tiff(path: Path) -> None:
    Image.new("RGB", (40, 30), RED).save(path, "TIFF")


def write_grayscale_alpha(path: Path) -> None:
    image = Image.new("LA", (40, 30), (200, 255))
    image.paste((0, 0), (0, 0, 20, 30))
    image.save(path, "PNG")


def write_bilevel(path: Path) -> None:
    image = Image.new("1", (40, 30), 0)
    image.paste(1, (20, 0, 40, 30))
    image.save(path, "PNG")


# (writer, file name, Pillow format, expected RGB in the left half, in the right half)
FORMAT_CASES = [
    (write_cmyk_jpeg, "cmyk.jpg", "JPEG", RED, RED),
    (write_png_named_jpeg, "png_inside.JPEG", "PNG", RED, RED),
    (write_gray8, "gray8.png", "PNG", (100,) * 3, (100,) * 3),
    (write_palette_with_transparency, "palette.png", "PNG", BACKGROUND_RGB, RED),
    (write_rgba, "rgba.png", "PNG", BACKGROUND_RGB, RED),
    (write_grayscale_alpha, "gray_alpha.png", "PNG", BACKGROUND_RGB, (200,) * 3),
    (write_animated_gif, "animated.gif", "GIF", RED, RED),
    (write_webp, "photo.webp", "WEBP", RED, RED),
    (write_bmp, "photo.bmp", "BMP", RED, RED),
    (write_tiff, "photo.tiff", "TIFF", RED, RED),
    (write_bilevel, "bilevel.png", "PNG", (0,) * 3, (255,) * 3),
]


@pytest.mark.parametrize("writer, name, file_format, left, right", FORMAT_CASES,
                         ids=[case[1] for case in FORMAT_CASES])
def test_format_decodes_to_rgb(tmp_path, writer, name, file_format, left, right):
    path = tmp_path / name
    writer(path)
    image, detected = decode_rgb(path)
    assert detected == file_format
    assert image.mode == "RGB"
    assert image.size[1] == 30
    pixels = np.asarray(image).astype(int)
    # JPEG's chroma subsampling and CMYK round trip shift colours by a few levels.
    np.testing.assert_allclose(pixels[15, 5], left, atol=12)
    np.testing.assert_allclose(pixels[15, -5], right, atol=12)


def test_gray16_maps_full_range_to_8_bit(tmp_path):
    write_gray16(tmp_path / "gray16.png")
    assert Image.open(tmp_path / "gray16.png").mode == "I;16"
    pixels = np.asarray(load_rgb(tmp_path / "gray16.png"))
    assert pixels.shape == (30, 42, 3)
    assert (pixels[:, :14] == 0).all()
    assert (pixels[:, 14:28] == 128).all()
    assert (pixels[:, 28:] == 255).all()


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), RED)
    image.paste(BLUE, (20, 0, 40, 20))              # stored: left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6                                # display rotated 90 degrees clockwise
    image.save(tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)

    loaded = load_rgb(tmp_path / "rotated.jpg")
    assert loaded.size == (20, 40)
    pixels = np.asarray(loaded).astype(int)
    np.testing.assert_allclose(pixels[5, 10], RED, atol=12)     # the left side is now on top
    np.testing.assert_allclose(pixels[35, 10], BLUE, atol=12)


def test_every_format_passes_through_the_dataset(tmp_path):
    for writer, name, *_ in FORMAT_CASES:
        writer(tmp_path / name)
    write_gray16(tmp_path / "gray16.png")
    Image.new("RGB", (3, 2), RED).save(tmp_path / "tiny.png")
    Image.new("RGB", (1, 700), BLUE).save(tmp_path / "tall.png")
    paths = find_images(tmp_path)
    assert len(paths) == len(FORMAT_CASES) + 3

    dataset = PretrainDataset(paths, AugmentConfig(64, 32, 0.5, seed=0), report_bad_files=True)
    for index in range(len(dataset)):
        image, mask, returned_index, bad = dataset[(0, index)]
        assert image.shape == (3, 64, 64)
        assert torch.isfinite(image).all()
        assert mask.shape == (4,)
        assert returned_index == index
        assert bad == "", bad


def write_large_jpeg(path: Path, size=(8000, 5000)) -> None:
    """Write a 40-megapixel JPEG (a smooth gradient, so the file stays small)."""
    gradient = Image.linear_gradient("L").resize(size)
    Image.merge("RGB", (gradient, gradient.transpose(Image.Transpose.FLIP_LEFT_RIGHT), gradient)).save(
        path, quality=80)


LARGE_DECODE = """
import resource, sys
from pathlib import Path
from fcmae.data import AugmentConfig, PretrainDataset

dataset = PretrainDataset([Path(sys.argv[1])], AugmentConfig(224, 32, 0.6, seed=0))
before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
image, _, _ = dataset[(0, 0)]
after_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(tuple(image.shape), (after_kib - before_kib) // 1024)
"""


def test_large_photo_decodes_in_reduced_size(tmp_path):
    path = tmp_path / "forty_megapixels.jpg"
    write_large_jpeg(path)

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        full = load_rgb(path)
    assert full.size == (8000, 5000)

    dataset = PretrainDataset([path], AugmentConfig(224, 32, 0.6, seed=0))
    assert dataset.min_side == 579
    assert load_rgb(path, dataset.min_side).size == (1000, 625)          # 1/8 scale, short side >= 579
    assert load_rgb(path, 2000).size == (4000, 2500)                      # 1/2 scale
    assert torch.equal(dataset[(0, 0)][0], dataset[(0, 0)][0])

    # Peak memory of one sample in a fresh process: a full decode alone would need 114 MiB.
    result = subprocess.run([sys.executable, "-c", LARGE_DECODE, str(path)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    shape, growth_mib = result.stdout.split(")")
    assert shape == "(3, 224, 224"
    assert int(growth_mib) < 40


# ------------------------------------------------------------------ bad files
def write_bad_files(folder: Path) -> dict[str, str]:
    """Write an empty, a truncated and a non-image file; return {name: expected reason fragment}."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.jpg").write_bytes(b"")
    source = write_photos(folder / "source", 1, size=(200, 160))[0]
    data = source.read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    source.unlink()
    (folder / "source").rmdir()
    (folder / "notes.png").write_text("this is text with an image extension")
    return {"empty.jpg": "cannot identify image file", "truncated.jpg": "truncated",
            "notes.png": "cannot identify image file"}


def test_bad_files_are_reported_and_replaced_deterministically(tmp_path):
    write_photos(tmp_path, 5)
    expected = write_bad_files(tmp_path)
    paths = find_images(tmp_path)
    dataset = PretrainDataset(paths, AugmentConfig(64, 32, 0.5, seed=1), report_bad_files=True)

    seen = {}
    for index, path in enumerate(paths):
        image, mask, _, report = dataset[(2, index)]
        again, _, _, report_again = dataset[(2, index)]
        assert torch.equal(image, again)
        assert report == report_again
        assert image.shape == (3, 64, 64)
        pairs = parse_bad_files([report])
        if path.name in expected:
            assert pairs[0][0] == str(path)
            assert expected[path.name] in pairs[0][1].lower()
        else:
            assert pairs == []
        seen.update(pairs)
    assert sorted(Path(p).name for p in seen) == sorted(expected)


def test_bad_file_replacement_is_the_same_in_workers(tmp_path):
    write_photos(tmp_path, 5)
    write_bad_files(tmp_path)
    dataset = PretrainDataset(find_images(tmp_path), AugmentConfig(64, 32, 0.5, seed=1), report_bad_files=True)
    keys = [(0, index) for index in range(len(dataset))]
    in_process = [dataset[key] for key in keys]
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, sampler=keys, num_workers=2)
    batches = list(loader)
    images = torch.cat([batch[0] for batch in batches])
    reports = [report for batch in batches for report in batch[3]]
    assert torch.equal(images, torch.stack([item[0] for item in in_process]))
    assert reports == [item[3] for item in in_process]


def test_dataset_without_reports_logs_each_bad_file_once(tmp_path, caplog):
    write_photos(tmp_path, 3)
    (tmp_path / "empty.jpg").write_bytes(b"")
    dataset = PretrainDataset(find_images(tmp_path), AugmentConfig(64, 32, 0.5, seed=0), repeat=3)
    with caplog.at_level(logging.WARNING, logger="fcmae.data"):
        items = [dataset[(0, index)] for index in range(len(dataset))]
    assert all(len(item) == 3 for item in items)
    messages = [r.getMessage() for r in caplog.records if "empty.jpg" in r.getMessage()]
    assert len(messages) == 1
    assert "cannot identify image file" in messages[0]


def test_eval_images_with_limit_skip_bad_files(tmp_path, caplog):
    (tmp_path / "a_empty.jpg").write_bytes(b"")
    write_photos(tmp_path, 3)
    batch = load_eval_images(find_images(tmp_path), 64, limit=2)
    assert batch.shape == (2, 3, 64, 64)
    assert "a_empty.jpg" in caplog.text


def tiny_config(data, output_dir, **overrides) -> PretrainConfig:
    values = dict(model="convnextv2_atto", data=str(data), output_dir=str(output_dir), epochs=1, warmup_epochs=0,
                  batch_size=8, input_size=64, mask_ratio=0.5, num_workers=0, data_repeat=2, lr=1e-3,
                  decoder_dim=64, log_every=1, save_every_minutes=0, recon_every=1, collapse_every=0, seed=7)
    values.update(overrides)
    config = PretrainConfig(**values)
    config.validate()
    return config


def tensorboard_scalars(folder: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    return [event.value for event in events.Scalars(tag)]


def test_training_counts_bad_file_once_across_workers(tmp_path, caplog):
    data = tmp_path / "data"
    write_photos(data, 7)
    # Sorted first, so the reconstruction images at the end of the epoch must skip it too.
    (data / "a_truncated.jpg").write_bytes((data / "img_000.jpg").read_bytes()[:300])
    bad_path = str(data / "a_truncated.jpg")
    config = tiny_config(data, tmp_path / "run", num_workers=2, max_bad_fraction=0.2)

    with caplog.at_level(logging.WARNING):
        result = Trainer(config, DistEnv()).run()
    assert result.status == "completed"
    # 8 files x data_repeat 2 in 2 batches of 8, one per worker: the bad file is loaded twice.
    reports = [r for r in caplog.records if r.name == "fcmae.monitor" and bad_path in r.getMessage()]
    assert len(reports) == 1
    assert "1 of 8 files" in reports[0].getMessage()
    skipped = [r for r in caplog.records if r.name == "fcmae.data" and bad_path in r.getMessage()]
    assert skipped and "skipping image file" in skipped[0].getMessage()

    state = safe_load(CheckpointManager(tmp_path / "run").last_path)
    assert list(state["bad_files"]) == [bad_path]
    assert tensorboard_scalars(tmp_path / "run", "data/bad_files")[-1] == 1
    listing = (tmp_path / "run" / "bad_files.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in listing] == [bad_path]


def test_training_stops_when_bad_share_exceeds_limit(tmp_path):
    data = tmp_path / "data"
    write_photos(data, 7)
    (data / "empty.jpg").write_bytes(b"")
    config = tiny_config(data, tmp_path / "run", max_bad_fraction=0.1)

    with pytest.raises(BadFilesError) as error:
        Trainer(config, DistEnv()).run()
    message = str(error.value)
    assert "1 of 8 image files (12.50%) failed to decode" in message
    assert "--max_bad_fraction 0.1" in message
    assert f"{data / 'empty.jpg'}: UnidentifiedImageError" in message
    assert "check_data" in message


# ------------------------------------------------------------------ discovery
def test_find_images_handles_awkward_names_and_links(tmp_path):
    data = tmp_path / "data"
    write_photos(data / "class one", 1)
    (data / "class one" / "img_000.jpg").rename(data / "class one" / "photo with spaces.jpg")
    write_photos(data / "klasse_ü", 1)
    (data / "klasse_ü" / "img_000.jpg").rename(data / "klasse_ü" / "café 写真.JPG")
    (data / "class one" / "notes.txt").write_text("not an image")
    (data / "class one" / "labels.json").write_text("{}")
    (data / "class one" / "Thumbs.db").write_bytes(b"\x00")
    (data / "class one" / ".hidden.jpg").write_bytes(b"")
    write_photos(data / ".cache", 2)
    write_photos(tmp_path / "outside", 2)
    (data / "linked").symlink_to(tmp_path / "outside")
    (data / "linked_again").symlink_to(tmp_path / "outside")   # the same folder through a second link
    (data / "class one" / "back_to_root").symlink_to(data)      # a loop

    found = find_images(data)
    names = sorted(path.name for path in found)
    assert names == ["café 写真.JPG", "img_000.jpg", "img_001.jpg", "photo with spaces.jpg"]
    dataset = PretrainDataset(found, AugmentConfig(64, 32, 0.5, seed=0), report_bad_files=True)
    for index in range(len(dataset)):
        assert dataset[(0, index)][3] == ""


# ------------------------------------------------------------------ check_data CLI
def check_data(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "analysis", "check_data", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def check_data_runs(tmp_path_factory):
    """Run the check_data cases concurrently (each process spends seconds importing torch)."""
    mixed = tmp_path_factory.mktemp("mixed")
    write_photos(mixed, 3)
    write_png_named_jpeg(mixed / "png_inside.JPEG")
    write_webp(mixed / "photo.webp")
    expected = write_bad_files(mixed)
    clean = tmp_path_factory.mktemp("clean")
    write_photos(clean, 2)
    cases = {
        "mixed": check_data(str(mixed), "--workers", "2"),
        "mixed_allowed": check_data(str(mixed), "--workers", "1", "--allow_unreadable"),
        "clean": check_data(str(clean)),
        "missing": check_data(str(mixed / "no_such_folder")),
        "bad_workers": check_data(str(clean), "--workers", "0"),
    }
    results = {}
    for name, process in cases.items():
        stdout, stderr = process.communicate(timeout=300)
        results[name] = (process.returncode, stdout, stderr)
    return mixed, expected, results


def test_check_data_lists_formats_and_unreadable_files(check_data_runs):
    mixed, expected, results = check_data_runs
    returncode, stdout, stderr = results["mixed"]
    assert returncode == 1, stderr
    assert "8 image files under" in stdout
    assert "5 decoded, 3 cannot be decoded" in stdout
    assert "  JPEG  3" in stdout
    assert "  PNG   1" in stdout
    assert "  WEBP  1" in stdout
    for name, reason in expected.items():
        assert f"{mixed / name}: " in stdout
        line = next(line for line in stdout.splitlines() if f"{mixed / name}: " in line)
        assert reason in line.lower()


def test_check_data_allow_unreadable_exits_zero(check_data_runs):
    _, _, results = check_data_runs
    returncode, stdout, stderr = results["mixed_allowed"]
    assert returncode == 0, stderr
    assert "3 cannot be decoded" in stdout


def test_check_data_clean_folder_exits_zero(check_data_runs):
    _, _, results = check_data_runs
    returncode, stdout, stderr = results["clean"]
    assert returncode == 0, stderr
    assert "2 decoded, 0 cannot be decoded" in stdout
    assert "files that cannot be decoded" not in stdout


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("bad_workers", "invalid --workers 0: it must be a positive integer"),
])
def test_check_data_rejects_invalid_input(check_data_runs, case, message):
    _, _, results = check_data_runs
    returncode, stdout, stderr = results[case]
    assert returncode == 2
    assert message in stderr
    assert "Traceback" not in stderr
