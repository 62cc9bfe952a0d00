"""Check that bf16 autocast pretraining follows fp32.

Trains an FCMAE on the sample photos through `PretrainDataset` with a fixed learning rate,
once in fp32 and once with bf16 autocast applied as fcmae/training.py applies it, from the
same initial weights on the same batches and masks. This is repeated for --seeds seeds,
each giving other weights, crops and masks. Two comparisons:

- Same weights: at every fp32 step, bf16 also runs on the current fp32 weights, and the
  loss difference and the cosine between the two gradients measure bf16 rounding alone.
- Free-running: the two loss curves. At a small batch and a high learning rate, runs
  that differ by any rounding-sized amount drift apart, so single steps are not compared.
  The bound is on the mean over seeds of the signed difference of the last --tail losses,
  which cancels drift that goes either way and keeps a systematic bf16 bias. For the
  first seed, a third run in fp32 from initial weights with relative noise of bf16's
  unit round-off (2^-8) shows the size of that drift.

Exits with status 1 when a bound (--rtol, --min_gradient_cosine, --curve_rtol) fails.

Run `python benchmarks/bf16_check.py --help`; benchmarks/README.md has recorded output.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

# Run from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fcmae import build_fcmae  # noqa: E402
from fcmae.data import AugmentConfig, PretrainDataset, ResumableSampler, resolve_data  # noqa: E402
from fcmae.optim import build_optimizer  # noqa: E402
from fcmae.registry import ENCODER_STRIDE  # noqa: E402

from pretrain_step import load_average, machine_summary, prepare_device  # noqa: E402


def load_batches(args: argparse.Namespace, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Return `args.steps` (images, mask) batches, decoded once and reused by every run of `seed`."""
    paths = resolve_data(args.data)
    augment = AugmentConfig(args.input_size, ENCODER_STRIDE, args.mask_ratio, seed)
    needed = args.steps * args.batch_size
    dataset = PretrainDataset(paths, augment, repeat=-(-needed // len(paths)))
    sampler = ResumableSampler(len(dataset), args.batch_size, world_size=1, rank=0, seed=seed,
                               iters_per_epoch=args.steps)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=0)
    return [(images, mask) for images, mask, _ in loader]


def build_model(initial_state: dict, args: argparse.Namespace, device: torch.device):
    model = build_fcmae(args.model, input_size=args.input_size, mask_ratio=args.mask_ratio,
                        encoder_impl=args.encoder_impl)
    model.load_state_dict(initial_state)
    model = model.to(device).to(memory_format=torch.channels_last).train()
    return model, build_optimizer(model, lr=args.lr, weight_decay=0.05, betas=(0.9, 0.95))


def loss_and_gradient(model, images, mask, bf16: bool) -> tuple[float, torch.Tensor]:
    """Return the loss and the flattened gradient of one forward and backward pass, leaving .grad unset."""
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss, _, _ = model(images, mask)
    loss.backward()
    gradient = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    return loss.item(), gradient


def train(initial_state: dict, batches, args: argparse.Namespace, bf16: bool, device: torch.device,
          shadow_bf16: bool = False) -> dict[str, list[float]]:
    """Train from `initial_state` over `batches`, one optimizer step each.

    Returns the per-step losses under "loss". With `shadow_bf16`, every step also runs bf16
    autocast on the current fp32 weights and records its loss ("shadow_loss") and the
    cosine between its gradient and the fp32 gradient ("gradient_cosine"). The update uses
    the fp32 gradient only, so the trajectory is the plain fp32 one.
    """
    model, optimizer = build_model(initial_state, args, device)
    curves = {"loss": [], "shadow_loss": [], "gradient_cosine": []}
    for images, mask in batches:
        images = images.to(device).contiguous(memory_format=torch.channels_last)
        mask = mask.to(device)
        if shadow_bf16:
            shadow_loss, shadow_gradient = loss_and_gradient(model, images, mask, bf16=True)

        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, _, _ = model(images, mask)
        loss.backward()
        if shadow_bf16:
            gradient = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
            cosine = torch.nn.functional.cosine_similarity(gradient.double(), shadow_gradient.double(), dim=0)
            curves["shadow_loss"].append(shadow_loss)
            curves["gradient_cosine"].append(cosine.item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        curves["loss"].append(loss.item())
    return curves


def perturbed(state: dict, relative: float, seed: int) -> dict:
    """Copy a state dict with every float tensor scaled by (1 + relative * N(0, 1)) element-wise."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, tensor in state.items():
        if tensor.is_floating_point():
            noise = torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
            tensor = tensor * (1 + relative * noise)
        out[name] = tensor.clone()
    return out


def differences(reference: list[float], candidate: list[float]) -> tuple[list[float], list[float]]:
    """Per-step absolute and relative (to `reference`) differences of two loss curves."""
    absolute = [abs(c - r) for r, c in zip(reference, candidate)]
    relative = [a / abs(r) for a, r in zip(absolute, reference)]
    return absolute, relative


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    # What is trained.
    parser.add_argument("--model", default="convnextv2_atto", help="model name, e.g. convnextv2_atto")
    parser.add_argument("--encoder_impl", default="sparse", help="sparse or dense")
    parser.add_argument("--data", default="sample", help="image folder, or 'sample' for the shipped photos")
    parser.add_argument("--input_size", type=int, default=96, help="crop side in pixels, a multiple of 32")
    parser.add_argument("--mask_ratio", type=float, default=0.6, help="fraction of patches removed")
    parser.add_argument("--batch_size", type=int, default=8, help="images per step")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    parser.add_argument("--lr", type=float, default=1e-3,
                        help="fixed AdamW learning rate (no schedule), betas (0.9, 0.95), weight decay 0.05")

    # Bounds and the control run.
    parser.add_argument("--rtol", type=float, default=0.01,
                        help="bound on |bf16 - fp32| / fp32 loss per step on the same weights")
    parser.add_argument("--min_gradient_cosine", type=float, default=0.998,
                        help="bound on the cosine between bf16 and fp32 gradients on the same weights")
    parser.add_argument("--tail", type=int, default=10, help="last steps whose mean loss the curves compare")
    parser.add_argument("--curve_rtol", type=float, default=0.05,
                        help="bound on |mean over seeds of (bf16 - fp32) / fp32| of the last --tail steps' mean loss")
    parser.add_argument("--perturbation", type=float, default=2.0 ** -8,
                        help="standard deviation of the relative noise on the fp32 control run's initial weights")

    # Where it runs.
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads on the CPU")
    parser.add_argument("--seed", type=int, default=0, help="first seed of the weights, crops and masks")
    parser.add_argument("--seeds", type=int, default=5, help="number of seeds, from --seed on")
    parser.add_argument("--output_json", default=None, help="also write every curve to this JSON file")
    args = parser.parse_args(argv)

    if min(args.steps, args.batch_size, args.seeds) < 1 or min(args.lr, args.rtol, args.curve_rtol) <= 0:
        parser.error("--steps, --batch_size and --seeds must be at least 1; --lr, --rtol and --curve_rtol "
                     "must be positive")
    if not 1 <= args.tail <= args.steps:
        parser.error(f"invalid --tail {args.tail}: it must lie between 1 and --steps {args.steps}")
    return args


def tail_difference(reference: list[float], candidate: list[float], tail: int) -> float:
    """Signed relative difference of the mean loss over the last `tail` steps: (candidate - reference) / reference."""
    reference_mean = sum(reference[-tail:]) / tail
    return (sum(candidate[-tail:]) / tail - reference_mean) / abs(reference_mean)


def print_curves(fp32: dict, bf16: dict, control: dict) -> None:
    _, same_rel = differences(fp32["loss"], fp32["shadow_loss"])
    _, free_rel = differences(fp32["loss"], bf16["loss"])
    _, control_rel = differences(fp32["loss"], control["loss"])
    print(f"{'':>4} {'':>10} {'same weights':^22} {'free-running':^21} {'fp32 control':^21}")
    print(f"{'step':>4} {'fp32 loss':>10} {'bf16 rel':>9} {'grad cos':>12} {'bf16 loss':>10} {'rel':>10} "
          f"{'fp32 loss':>10} {'rel':>10}")
    print("-" * 84)
    rows = zip(fp32["loss"], same_rel, fp32["gradient_cosine"], bf16["loss"], free_rel, control["loss"], control_rel)
    for step, (loss, same, cosine, bf16_loss, free, control_loss, control_diff) in enumerate(rows, 1):
        print(f"{step:>4} {loss:>10.5f} {same:>9.3%} {cosine:>12.6f} {bf16_loss:>10.5f} {free:>10.3%} "
              f"{control_loss:>10.5f} {control_diff:>10.3%}")


def compare_seed(fp32: dict, bf16: dict, tail: int) -> dict:
    """Reduce one seed's fp32 run (with its bf16 shadow) and bf16 run to the checked figures."""
    same_abs, same_rel = differences(fp32["loss"], fp32["shadow_loss"])
    free_abs, free_rel = differences(fp32["loss"], bf16["loss"])
    return {
        "same_weights_max_abs": max(same_abs), "same_weights_max_rel": max(same_rel),
        "min_gradient_cosine": min(fp32["gradient_cosine"]),
        "free_max_abs": max(free_abs), "free_max_rel": max(free_rel),
        "free_tail_rel": tail_difference(fp32["loss"], bf16["loss"], tail),
    }


def print_seed_table(rows: dict[int, dict], tail: int) -> None:
    print(f"{'seed':>4} {'same-weights':>12} {'min grad':>9} {'free-running':>12} {'free-running':>12} "
          f"{'last ' + str(tail) + ' mean':>13}")
    print(f"{'':>4} {'max rel':>12} {'cosine':>9} {'max abs':>12} {'max rel':>12} {'(bf16-fp32)/fp32':>13}")
    print("-" * 68)
    for seed, row in rows.items():
        print(f"{seed:>4} {row['same_weights_max_rel']:>12.3%} {row['min_gradient_cosine']:>9.6f} "
              f"{row['free_max_abs']:>12.5f} {row['free_max_rel']:>12.3%} {row['free_tail_rel']:>+13.3%}")


def check_bounds(rows: dict[int, dict], args: argparse.Namespace) -> tuple[dict, bool]:
    """Print one PASS or FAIL line per bound; return the figures checked and whether all bounds hold."""
    summary = {
        "same_weights_max_rel": max(r["same_weights_max_rel"] for r in rows.values()),
        "min_gradient_cosine": min(r["min_gradient_cosine"] for r in rows.values()),
        "mean_tail_rel": sum(r["free_tail_rel"] for r in rows.values()) / len(rows),
    }
    checks = [
        ("same-weights loss", summary["same_weights_max_rel"] <= args.rtol,
         f"max rel {summary['same_weights_max_rel']:.3%}, bound --rtol {args.rtol:.2%}"),
        ("same-weights gradient", summary["min_gradient_cosine"] >= args.min_gradient_cosine,
         f"min cosine {summary['min_gradient_cosine']:.6f}, bound --min_gradient_cosine {args.min_gradient_cosine}"),
        ("free-running tail", abs(summary["mean_tail_rel"]) <= args.curve_rtol,
         f"mean over {len(rows)} seeds of the last-{args.tail}-step difference {summary['mean_tail_rel']:+.3%}, "
         f"bound --curve_rtol {args.curve_rtol:.1%}"),
    ]
    for name, passed, detail in checks:
        print(f"{'PASS' if passed else 'FAIL'} {name}: {detail}")
    return summary, all(passed for _, passed, _ in checks)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = prepare_device(args.device, args.threads)
    print("\n".join(machine_summary(device)))
    print(f"{args.model} ({args.encoder_impl} encoder), {args.input_size} px, batch {args.batch_size}, "
          f"{args.steps} steps, lr {args.lr}, mask ratio {args.mask_ratio}, data {args.data}, "
          f"seeds {args.seed}..{args.seed + args.seeds - 1}")

    start = time.perf_counter()
    rows, curves = {}, {}
    for seed in range(args.seed, args.seed + args.seeds):
        batches = load_batches(args, seed)
        torch.manual_seed(seed)
        initial_state = build_fcmae(args.model, input_size=args.input_size, mask_ratio=args.mask_ratio,
                                    encoder_impl=args.encoder_impl).state_dict()
        fp32 = train(initial_state, batches, args, bf16=False, device=device, shadow_bf16=True)
        bf16 = train(initial_state, batches, args, bf16=True, device=device)
        rows[seed] = compare_seed(fp32, bf16, args.tail)
        curves[seed] = {"fp32": fp32, "bf16": bf16}

        if seed == args.seed:
            control_state = perturbed(initial_state, args.perturbation, seed + 1)
            control = train(control_state, batches, args, bf16=False, device=device)
            curves[seed]["fp32_control"] = control
            print(f"\nSeed {seed}: loss curves (rel = |difference| / fp32 loss)")
            print_curves(fp32, bf16, control)
            _, control_rel = differences(fp32["loss"], control["loss"])
            control_tail = tail_difference(fp32["loss"], control["loss"], args.tail)
            print(f"fp32 control (initial weights perturbed by {args.perturbation:.2g}): "
                  f"max rel {max(control_rel):.3%}, last-{args.tail}-step mean {control_tail:+.3%}\n")

    print_seed_table(rows, args.tail)
    print(f"{time.perf_counter() - start:.0f} s for all runs; load average {load_average()}")
    summary, passed = check_bounds(rows, args)

    if args.output_json:
        Path(args.output_json).write_text(json.dumps(
            {"machine": machine_summary(device), "args": vars(args), "seeds": rows, "curves": curves,
             "summary": summary, "passed": passed}, indent=2) + "\n")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
