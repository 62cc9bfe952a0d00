"""Measure the FCMAE input pipeline: decode, RandomResizedCrop, flip, normalize and mask.

Two tables. The first splits the cost of one sample into its stages, timed in this
process on one thread. The second runs `PretrainDataset` through a DataLoader with 0, 1,
2, ... workers, exactly as fcmae/training.py builds it, and reports images/s after the
first batch (worker start-up is reported apart). The per-worker rate, divided into a
training step's images/s, gives the number of workers a run needs:

    workers = ceil(step images/s / per-worker images/s)

Run `python benchmarks/data_pipeline.py --help`; benchmarks/README.md has recorded output.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

# Run from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torchvision.transforms.functional as TF  # noqa: E402
from torchvision.transforms import InterpolationMode  # noqa: E402

from fcmae.data import (AugmentConfig, PretrainDataset, ResumableSampler, load_rgb, normalize,  # noqa: E402
                        random_patch_mask, random_resized_crop_params, resolve_data, sample_seed, worker_init)
from fcmae.registry import ENCODER_STRIDE  # noqa: E402

from pretrain_step import load_average, machine_summary  # noqa: E402


def describe_images(paths: list[Path]) -> str:
    """Summarize the files measured in one line: count, formats, mean size in pixels and bytes."""
    from PIL import Image

    formats, pixels, sizes = {}, [], []
    for path in paths:
        with Image.open(path) as image:
            formats[image.format] = formats.get(image.format, 0) + 1
            pixels.append(image.width * image.height)
        sizes.append(path.stat().st_size)
    kinds = ", ".join(f"{count} {kind}" for kind, count in sorted(formats.items()))
    return (f"{len(paths)} files ({kinds}), mean {statistics.mean(pixels) / 1e6:.2f} Mpixel, "
            f"mean {statistics.mean(sizes) / 1024:.0f} KiB")


def stage_breakdown(paths: list[Path], augment: AugmentConfig, rounds: int) -> dict[str, float]:
    """Time each stage of one sample, as PretrainDataset.__getitem__ runs it; mean ms per image.

    Means rather than medians, so the stages add up to the whole sample: the files differ
    in size and format, and a median per stage would pick a different file for each.
    """
    num_patches = (augment.input_size // augment.patch_size) ** 2
    timings = {"decode (PIL, RGB)": [], "RandomResizedCrop + flip": [], "to_tensor + normalize": [],
               "mask": [], "whole sample": []}
    dataset = PretrainDataset(paths, augment, repeat=rounds)

    for index in range(len(paths) * rounds):
        rng = random.Random(sample_seed(augment.seed, 0, index))
        path = paths[index % len(paths)]

        start = time.perf_counter()
        image = load_rgb(path, dataset.min_side)
        decoded = time.perf_counter()
        top, left, h, w = random_resized_crop_params(image.width, image.height, rng, scale=augment.scale)
        image = TF.resized_crop(image, top, left, h, w, [augment.input_size] * 2,
                                interpolation=InterpolationMode.BICUBIC)
        if rng.random() < 0.5:
            image = TF.hflip(image)
        cropped = time.perf_counter()
        normalize(TF.to_tensor(image))
        converted = time.perf_counter()
        random_patch_mask(num_patches, augment.mask_ratio, torch.Generator().manual_seed(index))
        masked = time.perf_counter()
        dataset[(0, index)]
        whole = time.perf_counter()

        timings["decode (PIL, RGB)"].append(decoded - start)
        timings["RandomResizedCrop + flip"].append(cropped - decoded)
        timings["to_tensor + normalize"].append(converted - cropped)
        timings["mask"].append(masked - converted)
        timings["whole sample"].append(whole - masked)
    return {name: 1000 * statistics.mean(times) for name, times in timings.items()}


def loader_throughput(dataset: PretrainDataset, batch_size: int, num_workers: int, num_batches: int,
                      seed: int) -> dict[str, float]:
    """Iterate a DataLoader built like the training loop's; return start-up seconds and images/s."""
    sampler = ResumableSampler(len(dataset), batch_size, world_size=1, rank=0, seed=seed,
                               iters_per_epoch=num_batches + 1)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        worker_init_fn=worker_init if num_workers > 0 else None, drop_last=False)
    start = time.perf_counter()
    iterator = iter(loader)
    next(iterator)
    first_batch = time.perf_counter()

    # Steady state: the batches after the first. Batches prefetched while the first one was
    # loading make this slightly optimistic, by at most 2 batches per worker.
    images = 0
    for batch in iterator:
        images += batch[0].shape[0]
    elapsed = time.perf_counter() - first_batch
    del iterator
    return {"startup_s": first_batch - start, "img_s": images / elapsed}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", default="sample", help="image folder, or 'sample' for the shipped photos")
    parser.add_argument("--input_size", type=int, default=224, help="crop side in pixels")
    parser.add_argument("--mask_ratio", type=float, default=0.6, help="fraction of patches removed")
    parser.add_argument("--batch_size", type=int, default=8, help="images per DataLoader batch")
    parser.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts")
    parser.add_argument("--num_batches", type=int, default=40,
                        help="batches timed per worker count, after the first")
    parser.add_argument("--rounds", type=int, default=8, help="passes over the files in the stage breakdown")
    parser.add_argument("--repeats", type=int, default=3,
                        help="times each worker count is measured (median reported)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads in this process; DataLoader workers always use 1")
    parser.add_argument("--step_img_s", type=float, default=None,
                        help="a training step's images/s (from pretrain_step.py) to size --num_workers for")
    parser.add_argument("--seed", type=int, default=0, help="seed of crops, flips and masks")
    parser.add_argument("--output_json", default=None, help="also write every figure to this JSON file")
    args = parser.parse_args(argv)
    try:
        args.workers = [int(w) for w in args.workers.split(",")]
    except ValueError:
        parser.error(f"invalid --workers {args.workers!r}: expected comma-separated integers such as 0,1,2")
    if min(args.workers) < 0 or args.num_batches < 1 or args.rounds < 1 or args.repeats < 1:
        parser.error("--workers must not be negative; --num_batches, --rounds and --repeats must be at least 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    paths = resolve_data(args.data)
    augment = AugmentConfig(args.input_size, ENCODER_STRIDE, args.mask_ratio, args.seed)
    print("\n".join(machine_summary(torch.device("cpu"))))
    print(f"data: {args.data}: {describe_images(paths)}; crops of {args.input_size} px, bicubic")
    results = {"machine": machine_summary(torch.device("cpu")), "args": vars(args)}

    print(f"\nCost per sample in one process, {args.threads} torch thread(s), mean over "
          f"{len(paths) * args.rounds} samples")
    breakdown = stage_breakdown(paths, augment, args.rounds)
    print(f"{'stage':<26} {'ms/image':>9}")
    print("-" * 36)
    for stage, ms in breakdown.items():
        print(f"{stage:<26} {ms:>9.2f}")
    results["stage_ms"] = breakdown

    # Enough repeats of the files that no sample index is reused within one measurement. The
    # bad-file reports are on, as in the training loop.
    needed = (args.num_batches + 1) * args.batch_size
    dataset = PretrainDataset(paths, augment, repeat=math.ceil(needed / len(paths)), report_bad_files=True)
    print(f"\nDataLoader throughput, batch {args.batch_size}, {args.num_batches} batches after the first, "
          f"median of {args.repeats} measurements")
    header = f"{'workers':>7} {'images/s':>9} {'per worker':>10} {'start-up s':>10}  load average"
    print(header)
    print("-" * (len(header) + 10))
    rows = {}
    for workers in args.workers:
        runs = [loader_throughput(dataset, args.batch_size, workers, args.num_batches, args.seed)
                for _ in range(args.repeats)]
        rate = statistics.median(r["img_s"] for r in runs)
        startup = statistics.median(r["startup_s"] for r in runs)
        per_worker = rate / max(workers, 1)
        rows[workers] = {"img_s": rate, "per_worker_img_s": per_worker, "startup_s": startup}
        print(f"{workers:>7} {rate:>9.1f} {per_worker:>10.1f} {startup:>10.2f}  {load_average()}", flush=True)
    print("0 workers: the main process loads the data, between training steps in a real run.")
    results["loader"] = rows

    per_worker = rows[1]["per_worker_img_s"] if 1 in rows else max(r["per_worker_img_s"] for r in rows.values())
    print(f"\nper-worker rate used below: {per_worker:.1f} images/s")
    print("workers needed = ceil(step images/s / per-worker images/s)")
    if args.step_img_s:
        needed_workers = math.ceil(args.step_img_s / per_worker)
        print(f"for a step of {args.step_img_s:.1f} images/s: --num_workers {needed_workers}")
        results["recommended_num_workers"] = needed_workers
    print(f"load average at the end: {load_average()}")

    if args.output_json:
        Path(args.output_json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
