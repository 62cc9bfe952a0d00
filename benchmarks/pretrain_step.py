"""Measure the speed and memory of one FCMAE pretraining step, and of the collapse metric.

A step is forward, backward and an AdamW step on a fixed batch of random images with a
fixed mask. All variants of one model size (V1/V2, dense/sparse encoder, fp32/bf16) are
timed round-robin, one step each per round, so a change in machine load hits every
variant alike. Figures are medians over the timed rounds, and ratios are medians of the
per-round ratios of paired steps.

Peak memory: on CUDA, torch.cuda.max_memory_allocated over one step (model, optimizer
state and activations). On the CPU, the growth of the process's resident set during one
step: VmHWM from /proc/self/status after the step minus VmRSS before it, with the high
water mark reset through /proc/self/clear_refs and freed heap returned by malloc_trim
first. That counts activations, gradients and temporaries, not the model or the
optimizer state that already exist before the step.

Run `python benchmarks/pretrain_step.py --help`; benchmarks/README.md has recorded output.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

# Run from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fcmae import build_fcmae  # noqa: E402
from fcmae.optim import build_optimizer  # noqa: E402

DTYPES = {"fp32": None, "bf16": torch.bfloat16}


# ---------------------------------------------------------------- machine facts
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def load_average() -> str:
    try:
        return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        return "unknown"


def prepare_device(name: str, threads: int | None) -> torch.device:
    """Return the torch device of --device and apply --threads; exit if CUDA is requested but missing."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"--device {name} requested but CUDA is not available; use --device cpu")
    if threads is not None:
        torch.set_num_threads(threads)
    return device


def machine_summary(device: torch.device) -> list[str]:
    """Describe the hardware and software behind a measurement, one fact per line."""
    flags = cpu_flags()
    lines = [
        f"cpu: {cpu_model()}, {os.cpu_count()} logical cores visible, torch threads {torch.get_num_threads()}",
        f"cpu bf16 support: amx_bf16 {'yes' if 'amx_bf16' in flags else 'no'}, "
        f"avx512_bf16 {'yes' if 'avx512_bf16' in flags else 'no'}",
        f"torch {torch.__version__}, python {platform.python_version()}",
        f"load average (1, 5, 15 min): {load_average()}",
    ]
    if device.type == "cuda":
        lines.append(f"gpu: {torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}")
    return lines


# ---------------------------------------------------------------- memory
def _read_status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_high_water_mark() -> bool:
    """Reset VmHWM to the current resident set (Linux 4.0+); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _release_free_heap() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the baseline then includes cached free memory


def measure_step_memory_mib(step, device: torch.device) -> float | None:
    """Return the peak memory of one call of `step` in MiB (see the module docstring), or None."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20

    gc.collect()
    _release_free_heap()
    baseline = _read_status_kib("VmRSS")
    if baseline is None or not _reset_high_water_mark():
        step()
        return None
    step()
    peak = _read_status_kib("VmHWM")
    return None if peak is None else (peak - baseline) / 1024


# ---------------------------------------------------------------- one variant
@dataclass
class Variant:
    """One model, encoder implementation and precision, with its timings in seconds."""

    model_name: str
    impl: str
    dtype: str
    step: object = field(repr=False)
    times: list[float] = field(default_factory=list)
    memory_mib: float | None = None

    @property
    def key(self) -> tuple[str, str, str]:
        return self.model_name, self.impl, self.dtype


def make_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
              mask: torch.Tensor, dtype: str, forward=None):
    """Return a function that runs one training step and waits for the device to finish."""
    forward = forward if forward is not None else model
    device = images.device
    amp_dtype = DTYPES[dtype]

    def step() -> float:
        with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            loss, _, _ = forward(images, mask)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return loss.item()

    return step


def build_model(model_name: str, impl: str, args: argparse.Namespace, device: torch.device):
    """Build a channels_last FCMAE and AdamW with FCMAE's betas (0.9, 0.95) and weight decay 0.05."""
    model = build_fcmae(model_name, input_size=args.input_size, mask_ratio=args.mask_ratio, encoder_impl=impl)
    model = model.to(device).to(memory_format=torch.channels_last).train()
    optimizer = build_optimizer(model, lr=1.5e-4, weight_decay=0.05, betas=(0.9, 0.95))
    return model, optimizer


def fixed_batch(model, args: argparse.Namespace, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (B, 3, S, S) channels_last images and a (B, L) mask, the same for every variant."""
    generator = torch.Generator().manual_seed(args.seed)
    images = torch.randn(args.batch_size, 3, args.input_size, args.input_size, generator=generator)
    images = images.to(device).contiguous(memory_format=torch.channels_last)
    mask = model.random_mask(args.batch_size, torch.device("cpu"), generator=generator).to(device)
    return images, mask


# ---------------------------------------------------------------- timing
def time_round_robin(variants: list[Variant], warmup: int, steps: int) -> None:
    """Run `warmup` untimed then `steps` timed rounds of one step per variant."""
    for _ in range(warmup):
        for variant in variants:
            variant.step()
    for _ in range(steps):
        for variant in variants:
            start = time.perf_counter()
            variant.step()
            variant.times.append(time.perf_counter() - start)


def images_per_second(variant: Variant, batch_size: int) -> float:
    return batch_size / statistics.median(variant.times)


def relative_spread(times: list[float]) -> float:
    """Return the interquartile range of the step times divided by their median: how noisy one figure is."""
    if len(times) < 4:
        return (max(times) - min(times)) / statistics.median(times)
    q1, _, q3 = statistics.quantiles(times, n=4)
    return (q3 - q1) / statistics.median(times)


def paired_speedup(slow: Variant | None, fast: Variant | None) -> float | None:
    """Return the median over rounds of the slow step time divided by the fast one.

    The two steps of one round ran close in time, so a change in machine load mostly cancels.
    """
    if slow is None or fast is None:
        return None
    return statistics.median(s / f for s, f in zip(slow.times, fast.times))


# ---------------------------------------------------------------- size groups
def model_names(size: str, versions: list[str]) -> list[str]:
    prefixes = {"v1": "convnext", "v2": "convnextv2"}
    return [f"{prefixes[v]}_{size}" for v in versions]


def measure_size(size: str, args: argparse.Namespace, device: torch.device) -> list[Variant]:
    """Time and measure memory for every variant of one model size."""
    variants = []
    for model_name in model_names(size, args.versions):
        for impl in args.impls:
            torch.manual_seed(args.seed)
            model, optimizer = build_model(model_name, impl, args, device)
            images, mask = fixed_batch(model, args, device)
            for dtype in args.dtypes:
                variants.append(Variant(model_name, impl, dtype, make_step(model, optimizer, images, mask, dtype)))

    load_before = load_average()
    time_round_robin(variants, args.warmup, args.steps)
    for variant in variants:
        variant.memory_mib = measure_step_memory_mib(variant.step, device)
    print(f"  measured {size}: load average {load_before} before, {load_average()} after", flush=True)
    return variants


# ---------------------------------------------------------------- tables
def format_number(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def print_step_table(variants: list[Variant], args: argparse.Namespace) -> None:
    by_key = {v.key: v for v in variants}
    header = f"{'model':<20} {'encoder':<7}"
    for dtype in args.dtypes:
        header += f" {dtype + ' img/s':>11} {'IQR':>5} {dtype + ' MiB':>9}"
    if len(args.dtypes) == 2:
        header += f" {'bf16/fp32':>9}"
    print(header)
    print("-" * len(header))

    rows = sorted({(v.model_name, v.impl) for v in variants}, key=_row_order(args))
    for model_name, impl in rows:
        line = f"{model_name:<20} {impl:<7}"
        for dtype in args.dtypes:
            variant = by_key[(model_name, impl, dtype)]
            line += (f" {images_per_second(variant, args.batch_size):>11.1f}"
                     f" {relative_spread(variant.times):>5.0%} {format_number(variant.memory_mib, 0):>9}")
        if len(args.dtypes) == 2:
            speedup = paired_speedup(by_key[(model_name, impl, "fp32")], by_key[(model_name, impl, "bf16")])
            line += f" {format_number(speedup, 2):>9}"
        print(line)


def _row_order(args: argparse.Namespace):
    sizes = {s: i for i, s in enumerate(args.sizes)}

    def key(row):
        model_name, impl = row
        version, size = model_name.split("_", 1)
        return sizes[size], version, impl

    return key


def print_ratio_table(variants: list[Variant], args: argparse.Namespace) -> dict:
    """Print sparse/dense and V2/V1 speed ratios per size and dtype; return them for JSON."""
    by_key = {v.key: v for v in variants}
    ratios = {}
    header = (f"{'size':<6} {'dtype':<5} {'sparse/dense V1':>15} {'sparse/dense V2':>15} "
              f"{'V2/V1 dense':>11} {'V2/V1 sparse':>12}")
    print(header)
    print("-" * len(header))
    for size in args.sizes:
        v1, v2 = f"convnext_{size}", f"convnextv2_{size}"
        for dtype in args.dtypes:
            def ratio(slow: tuple[str, str], fast: tuple[str, str]) -> float | None:
                return paired_speedup(by_key.get((*slow, dtype)), by_key.get((*fast, dtype)))

            row = {
                "sparse_over_dense_v1": ratio((v1, "dense"), (v1, "sparse")),
                "sparse_over_dense_v2": ratio((v2, "dense"), (v2, "sparse")),
                # V2 step time over V1 step time: above 1 means V2 is slower.
                "v2_over_v1_time_dense": ratio((v2, "dense"), (v1, "dense")),
                "v2_over_v1_time_sparse": ratio((v2, "sparse"), (v1, "sparse")),
            }
            ratios[f"{size}/{dtype}"] = row
            print(f"{size:<6} {dtype:<5} {format_number(row['sparse_over_dense_v1'], 2):>15} "
                  f"{format_number(row['sparse_over_dense_v2'], 2):>15} "
                  f"{format_number(row['v2_over_v1_time_dense'], 3):>11} "
                  f"{format_number(row['v2_over_v1_time_sparse'], 3):>12}")
    print("sparse/dense: dense step time / sparse step time (speed-up of the sparse encoder).")
    print("V2/V1: V2 step time / V1 step time (above 1: V2 is slower).")
    return ratios


# ---------------------------------------------------------------- torch.compile
def measure_compile(args: argparse.Namespace, device: torch.device) -> dict:
    """Time eager vs torch.compile for the V2 sparse step of the first size, per dtype."""
    model_name = f"convnextv2_{args.sizes[0]}"
    results = {}
    for dtype in args.dtypes:
        torch.manual_seed(args.seed)
        eager_model, eager_optimizer = build_model(model_name, "sparse", args, device)
        images, mask = fixed_batch(eager_model, args, device)
        torch.manual_seed(args.seed)
        compiled_model, compiled_optimizer = build_model(model_name, "sparse", args, device)
        compiled_forward = torch.compile(compiled_model)

        compiled_step = make_step(compiled_model, compiled_optimizer, images, mask, dtype, forward=compiled_forward)
        start = time.perf_counter()
        compiled_step()
        first_step = time.perf_counter() - start

        eager = Variant(model_name, "sparse", dtype, make_step(eager_model, eager_optimizer, images, mask, dtype))
        compiled = Variant(model_name, "sparse+compile", dtype, compiled_step)
        time_round_robin([eager, compiled], args.warmup, args.steps)
        results[dtype] = {
            "eager_img_s": images_per_second(eager, args.batch_size),
            "compiled_img_s": images_per_second(compiled, args.batch_size),
            "compiled_over_eager": paired_speedup(eager, compiled),
            "first_compiled_step_s": first_step,
        }
        torch._dynamo.reset()

    header = f"{'model':<20} {'dtype':<5} {'eager img/s':>11} {'compiled img/s':>14} {'speed-up':>8} {'1st step s':>10}"
    print(header)
    print("-" * len(header))
    for dtype, row in results.items():
        print(f"{model_name:<20} {dtype:<5} {row['eager_img_s']:>11.1f} {row['compiled_img_s']:>14.1f} "
              f"{format_number(row['compiled_over_eager'], 2):>8} {row['first_compiled_step_s']:>10.1f}")
    print("speed-up: eager step time / compiled step time. 1st step: includes compilation, which is much "
          "shorter when Inductor's on-disk cache already holds the graphs.")
    return results


# ---------------------------------------------------------------- profiler
def profile_step(args: argparse.Namespace, device: torch.device, top: int = 15) -> None:
    """Print the ops with the most self time in the sparse step of the first size, per version and dtype.

    On the CPU it also prints the self time grouped by kind of work (see `op_kind`).
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    steps = args.steps
    runs = [(model_name, dtype) for model_name in reversed(model_names(args.sizes[0], args.versions))
            for dtype in args.dtypes]
    for model_name, dtype in runs:
        torch.manual_seed(args.seed)
        model, optimizer = build_model(model_name, "sparse", args, device)
        images, mask = fixed_batch(model, args, device)
        step = make_step(model, optimizer, images, mask, dtype)
        for _ in range(max(args.warmup, 1)):
            step()
        with profile(activities=activities, record_shapes=True) as prof:
            for _ in range(steps):
                step()

        print(f"\n{model_name} sparse {dtype}: top {top} ops by self time over {steps} steps "
              f"(load average {load_average()})")
        print(prof.key_averages().table(sort_by=sort_by, row_limit=top, max_name_column_width=40))
        if device.type == "cpu":
            print_time_by_kind(prof.events(), steps)


def op_kind(event) -> str:
    """Name the kind of work of one profiled op, from its name, its shapes and its callers."""
    node = event
    while node is not None:
        if node.name.startswith(("Optimizer.step", "Optimizer.zero_grad")):
            return "AdamW step and zero_grad"
        node = node.cpu_parent

    name = event.name
    if "conv" in name:
        # A depthwise 7x7 weight has shape (C, 1, 7, 7).
        depthwise = any(len(shape) == 4 and shape[1:] == [1, 7, 7] for shape in event.input_shapes)
        return "depthwise 7x7 conv" if depthwise else "other convolutions (decoder 1x1)"
    kinds = {
        "matmul (linear layers, stem, downsampling)": ("aten::mm", "aten::addmm", "aten::bmm"),
        "GELU": ("aten::gelu", "aten::gelu_backward"),
        "LayerNorm": ("aten::native_layer_norm", "aten::native_layer_norm_backward"),
        "L2 norm (GRN)": ("aten::linalg_vector_norm",),
        "copies and dtype casts": ("aten::copy_",),
        "gather/scatter of visible tokens": ("aten::index", "aten::index_put_", "aten::_index_put_impl_",
                                             "aten::nonzero", "aten::index_add_"),
    }
    for kind, names in kinds.items():
        if name in names:
            return kind
    return "other element-wise ops and reductions"


def print_time_by_kind(events, steps: int) -> None:
    """Print self CPU time per step grouped by `op_kind`, largest first."""
    totals: dict[str, float] = {}
    for event in events:
        kind = op_kind(event)
        totals[kind] = totals.get(kind, 0.0) + event.self_cpu_time_total / 1000 / steps
    grand_total = sum(totals.values())
    print(f"self CPU time per step by kind of work, {grand_total:.0f} ms in all")
    for kind, ms in sorted(totals.items(), key=lambda item: -item[1]):
        print(f"  {kind:<44} {ms:>7.1f} ms {ms / grand_total:>6.1%}")


# ---------------------------------------------------------------- analysis throughput
def analysis_images(args: argparse.Namespace) -> tuple[torch.Tensor, str]:
    """Load the sample photos at the benchmark size, or draw random images where they are missing."""
    from fcmae.data import DataError, load_eval_images, sample_image_paths

    try:
        paths = sample_image_paths()
    except DataError as error:
        generator = torch.Generator().manual_seed(args.seed)
        images = torch.randn(8, 3, args.input_size, args.input_size, generator=generator)
        return images, f"8 random images ({error})"
    return load_eval_images(paths, args.input_size), f"{len(paths)} sample photos"


def measure_analysis(args: argparse.Namespace) -> dict:
    """Time the collapse metric over every layer of the V2 encoder of the first size, on the CPU."""
    from fcmae.collapse import cosine_distance, cosine_distance_reference, extract_features, layer_distances
    from fcmae.registry import create_encoder

    model_name = f"convnextv2_{args.sizes[0]}"
    torch.manual_seed(args.seed)
    encoder = create_encoder(model_name).eval()
    images, source = analysis_images(args)
    features = list(extract_features(encoder, images).values())
    num_images = images.shape[0]

    def identity():
        return [cosine_distance(f) for f in features]

    def reference():
        return [cosine_distance_reference(f) for f in features]

    def forward_and_identity():
        return layer_distances(encoder, images, batch_size=num_images)

    max_difference = max(float((a - b).abs().max()) for a, b in zip(identity(), reference()))
    rows = {"O(C*HW) identity": identity, "pairwise float64 reference": reference,
            "encoder forward + identity": forward_and_identity}
    timings = {name: [] for name in rows}
    for _ in range(max(args.steps, 3)):
        for name, run in rows.items():
            start = time.perf_counter()
            run()
            timings[name].append(time.perf_counter() - start)

    print(f"{model_name}, {len(features)} layers, {source} at {args.input_size} px, "
          f"median of {len(timings[next(iter(rows))])} runs")
    header = f"{'method':<28} {'images/s':>9} {'ms/image':>9}"
    print(header)
    print("-" * len(header))
    results = {}
    for name, times in timings.items():
        per_image = statistics.median(times) / num_images
        results[name] = 1.0 / per_image
        print(f"{name:<28} {1.0 / per_image:>9.1f} {1000 * per_image:>9.2f}")
    print(f"max |identity - reference| over images and layers: {max_difference:.2e}")
    results["max_abs_difference"] = max_difference
    return results


# ---------------------------------------------------------------- entry point
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sizes", default="atto,femto,pico,nano",
                        help="comma-separated model sizes; the first one is also used by --compile, "
                             "--profile and the analysis table")
    parser.add_argument("--versions", default="v1,v2", help="comma-separated ConvNeXt versions: v1, v2")
    parser.add_argument("--impls", default="dense,sparse", help="comma-separated encoder implementations")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated precisions: fp32, bf16 (autocast)")
    parser.add_argument("--batch_size", type=int, default=8, help="images per step")
    parser.add_argument("--input_size", type=int, default=224, help="image side in pixels, a multiple of 32")
    parser.add_argument("--mask_ratio", type=float, default=0.6, help="fraction of patches removed")
    parser.add_argument("--steps", type=int, default=7, help="timed steps per variant (median taken)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant before timing")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads on the CPU; default: torch's default")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, images and mask")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: atto only, 2 timed steps, 1 warm-up step")
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile against eager for the V2 sparse step")
    parser.add_argument("--profile", action="store_true",
                        help="also profile the sparse step of the first size over --steps steps with "
                             "torch.profiler and print the top ops by self time")
    parser.add_argument("--skip_step", action="store_true", help="skip the step table")
    parser.add_argument("--skip_analysis", action="store_true", help="skip the collapse-metric table")
    parser.add_argument("--output_json", default=None, help="also write every figure to this JSON file")
    args = parser.parse_args(argv)

    if args.quick:
        args.sizes, args.steps, args.warmup = "atto", 2, 1
    args.sizes = _split(args.sizes)
    args.versions = _split(args.versions)
    args.impls = _split(args.impls)
    args.dtypes = _split(args.dtypes)
    _check_choices(parser, "--versions", args.versions, ("v1", "v2"))
    _check_choices(parser, "--impls", args.impls, ("dense", "sparse"))
    _check_choices(parser, "--dtypes", args.dtypes, tuple(DTYPES))
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1:
        parser.error(f"invalid --steps {args.steps}, --warmup {args.warmup} or --batch_size {args.batch_size}: "
                     f"steps and batch size must be at least 1, warm-up at least 0")
    return args


def _split(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _check_choices(parser: argparse.ArgumentParser, option: str, values: list[str], valid: tuple) -> None:
    invalid = [v for v in values if v not in valid]
    if invalid or not values:
        parser.error(f"invalid {option} {','.join(values) or '(empty)'}; valid values: {', '.join(valid)}")


def main(argv=None) -> None:
    args = parse_args(argv)
    device = prepare_device(args.device, args.threads)

    print("\n".join(machine_summary(device)))
    print(f"batch {args.batch_size}, {args.input_size} px, mask ratio {args.mask_ratio}, channels_last, "
          f"AdamW; median of {args.steps} steps after {args.warmup} warm-up steps per variant")
    memory_note = ("CUDA max_memory_allocated over one step" if device.type == "cuda" else
                   "CPU resident-set growth during one step (VmHWM - VmRSS before)")
    results = {"machine": machine_summary(device), "args": vars(args)}

    if not args.skip_step:
        variants = []
        for size in args.sizes:
            variants += measure_size(size, args, device)
            # Keep what is measured so far in case a long run is stopped.
            results["variants"] = [variant_record(v, args.batch_size) for v in variants]
            write_json(results, args.output_json)
        print(f"\nStep throughput (images/s), IQR = interquartile range / median of step times; MiB: {memory_note}")
        print_step_table(variants, args)
        print()
        results["ratios"] = print_ratio_table(variants, args)
    if args.compile:
        print("\ntorch.compile vs eager")
        results["compile"] = measure_compile(args, device)
    if args.profile:
        profile_step(args, device)
    if not args.skip_analysis:
        print("\nCollapse-metric throughput on the CPU (all layers, per image)")
        results["analysis"] = measure_analysis(args)

    print(f"\nload average at the end: {load_average()}")
    write_json(results, args.output_json)


def variant_record(variant: Variant, batch_size: int) -> dict:
    return {"model": variant.model_name, "impl": variant.impl, "dtype": variant.dtype,
            "img_s": images_per_second(variant, batch_size), "step_s": variant.times,
            "peak_mib": variant.memory_mib}


def write_json(results: dict, path: str | None) -> None:
    if path:
        Path(path).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
