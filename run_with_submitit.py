#!/usr/bin/env python
"""Submit FCMAE pretraining jobs through submitit, to Slurm or to the local machine.

    python run_with_submitit.py pretrain --model convnextv2_atto --data /datasets/imagenet/train \\
        --output_dir runs/v2_atto --nodes 2 --tasks_per_node 8 --gpus_per_node 8 --partition gpu

Every option is checked here, on the login node, before anything is submitted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from datetime import datetime
from pathlib import Path

from fcmae.config import ConfigError, PretrainConfig, load_config, save_config
from jobs.executor import CLUSTERS, LaunchError, Resources, make_executor, resolve_cluster
from jobs.status import StatusError, cancel_run, format_status, record_submission, run_status

logger = logging.getLogger("run_with_submitit")

CONFIG_HELP = {
    "model": "encoder, e.g. convnextv2_atto (V2, GRN) or convnext_atto (V1)",
    "data": "image folder (flat or one sub-folder per class), or 'sample' for the photos shipped with "
            "scikit-image, scikit-learn and matplotlib",
    "output_dir": "run folder: checkpoints, logs, TensorBoard; an existing run there is resumed",
    "epochs": "training epochs",
    "warmup_epochs": "epochs of linear learning-rate warmup",
    "batch_size": "images per rank and micro-batch",
    "update_freq": "micro-batches accumulated per optimizer step",
    "blr": "base learning rate; lr = blr * batch_size * update_freq * world size / 256",
    "lr": "absolute learning rate (overrides --blr)",
    "min_lr": "learning rate at the end of the cosine schedule",
    "weight_decay": "AdamW weight decay (not applied to biases, norms, GRN, LayerScale, mask token)",
    "betas": "AdamW betas",
    "mask_ratio": "fraction of 32-pixel patches removed, in (0, 1)",
    "input_size": "crop size in pixels, a multiple of the patch size",
    "patch_size": "mask patch size in pixels (the encoder's total stride, 32)",
    "in_chans": "input image channels",
    "decoder_dim": "decoder width",
    "decoder_depth": "decoder ConvNeXt V2 blocks",
    "encoder_impl": "masked encoder implementation: dense (reference) or sparse",
    "num_workers": "DataLoader worker processes per rank",
    "seed": "seed of data order, augmentation, masks and initialization",
    "data_repeat": "times each image appears per epoch (default: 32 for --data sample, else 1)",
    "max_bad_fraction": "share of the image files that may fail to decode (each is replaced by another file) "
                        "before the run stops with a list of them",
    "bf16": "bfloat16 autocast",
    "channels_last": "channels-last memory format",
    "compile": "compile the model with torch.compile",
    "device": "auto, cpu or cuda",
    "clip_grad": "clip the gradient norm to this value",
    "log_every": "optimizer steps between progress lines",
    "save_every_steps": "optimizer steps between periodic checkpoints (0: off)",
    "save_every_minutes": "minutes between periodic checkpoints (0: off)",
    "keep_last": "numbered checkpoints kept besides last.pt",
    "recon_every": "epochs between reconstruction images in TensorBoard",
    "collapse_every": "epochs between per-layer feature cosine distance measurements (0: off)",
    "collapse_data": "image folder, or 'sample', for the collapse measurements",
    "collapse_images": "images per collapse measurement (centre crop, no masking)",
}
OPTIONAL_TYPES = {"lr": float, "data_repeat": int, "clip_grad": float}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = PretrainConfig()
    for f in dataclasses.fields(PretrainConfig):
        if f.name == "extra":
            continue
        default = getattr(defaults, f.name)
        help_text = f"{CONFIG_HELP[f.name]} (default: {default})"
        if isinstance(default, bool):
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif f.name == "betas":
            parser.add_argument("--betas", type=float, nargs=2, default=list(default), help=help_text)
        else:
            kind = OPTIONAL_TYPES.get(f.name, type(default))
            parser.add_argument(f"--{f.name}", type=kind, default=default, help=help_text)


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    r = Resources()
    group = parser.add_argument_group("launch")
    group.add_argument("--cluster", default="auto", choices=CLUSTERS,
                       help="auto: Slurm when sbatch is on PATH and a controller responds to sinfo, else "
                            "submitit's local executor (default: auto)")
    group.add_argument("--nodes", type=int, default=r.nodes)
    group.add_argument("--tasks_per_node", type=int, default=r.tasks_per_node, help="ranks per node")
    group.add_argument("--cpus_per_task", type=int, default=r.cpus_per_task, help="CPU cores per rank")
    group.add_argument("--gpus_per_node", type=int, default=r.gpus_per_node)
    group.add_argument("--mem_gb", type=float, default=None, help="memory per node in GB")
    group.add_argument("--timeout_min", type=int, default=r.timeout_min, help="job time limit in minutes")
    group.add_argument("--partition", default=None)
    group.add_argument("--account", default=None)
    group.add_argument("--qos", default=None)
    group.add_argument("--constraint", default=None)
    group.add_argument("--signal_delay_s", type=int, default=r.signal_delay_s,
                       help="seconds before the time limit at which Slurm signals the job to checkpoint")
    group.add_argument("--slurm_additional_parameters", type=json.loads, default={},
                       help='extra sbatch options as JSON, e.g. \'{"exclusive": true}\'')
    group.add_argument("--job_name", default=None, help="Slurm job name (default: fcmae-<model>)")
    group.add_argument("--max_requeues", type=int, default=r.max_requeues,
                       help="interruptions (preemptions, time limits) after which the job stops requeueing itself")
    group.add_argument("--wait", action="store_true", help="block, stream rank 0's log and return its result")
    group.add_argument("--dry_run", action="store_true",
                       help="validate and print the sbatch script (Slurm) or the job settings; submit nothing")
    group.add_argument("--resume", action="store_true",
                       help="continue the run in --output_dir with its saved config, ignoring changed options")
    group.add_argument("--force", action="store_true",
                       help="start a new run in --output_dir; an existing run there is moved to a "
                            "replaced-<time> sub-folder, never deleted")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    pretrain = commands.add_parser("pretrain", help="submit one FCMAE pretraining job")
    add_config_arguments(pretrain)
    add_launch_arguments(pretrain)
    status = commands.add_parser("status", help="show the state and progress of a run's newest job")
    status.add_argument("output_dir")
    status.add_argument("--format", choices=("table", "json"), default="table")
    cancel = commands.add_parser("cancel", help="cancel a run's newest job (checkpoints are kept)")
    cancel.add_argument("output_dir")
    add_sweep_arguments(commands.add_parser("sweep", help="launch, inspect, resume or cancel a sweep"))
    return parser


def add_sweep_arguments(sweep: argparse.ArgumentParser) -> None:
    actions = sweep.add_subparsers(dest="sweep_command", required=True)
    launch = actions.add_parser("launch", help="validate every member and submit them as Slurm job arrays")
    launch.add_argument("sweep_file")
    launch.add_argument("--sweep_dir", default=None, help="sweep folder (default: runs/sweeps/<name>)")
    launch.add_argument("--dry_run", action="store_true", help="print the member table and resources only")
    launch.add_argument("--force", action="store_true", help="resubmit members whose config changed")
    launch.add_argument("--array_parallelism", type=int, default=64, help="members running at once per array")
    launch.add_argument("--no_analysis", action="store_true", help="skip the dependent analysis jobs")
    launch.add_argument("--cluster", default="auto", choices=("auto", "slurm"))
    status = actions.add_parser("status", help="one row per member: state, progress, loss, failure reason")
    status.add_argument("sweep_dir")
    status.add_argument("--format", choices=("table", "json"), default="table")
    resume = actions.add_parser("resume", help="resubmit failed, cancelled or never started members")
    resume.add_argument("sweep_dir")
    resume.add_argument("--no_analysis", action="store_true")
    cancel = actions.add_parser("cancel", help="cancel the sweep's jobs, or one member's (checkpoints are kept)")
    cancel.add_argument("sweep_dir")
    cancel.add_argument("--member", default=None)


def run_sweep_command(args: argparse.Namespace) -> int:
    from sweeps import launcher

    if args.sweep_command == "launch":
        print(launcher.launch(args.sweep_file, args.sweep_dir, dry_run=args.dry_run, force=args.force,
                              array_parallelism=args.array_parallelism, analysis=not args.no_analysis,
                              cluster=args.cluster))
    elif args.sweep_command == "status":
        records = launcher.sweep_status(args.sweep_dir)
        print(json.dumps(records, indent=2) if args.format == "json" else launcher.format_status(records))
    elif args.sweep_command == "resume":
        print(launcher.resume(args.sweep_dir, analysis=not args.no_analysis))
    else:
        print(launcher.cancel(args.sweep_dir, args.member))
    return 0


def config_from_args(args: argparse.Namespace) -> PretrainConfig:
    names = [f.name for f in dataclasses.fields(PretrainConfig) if f.name != "extra"]
    return PretrainConfig(**{name: getattr(args, name) for name in names})


def resources_from_args(args: argparse.Namespace) -> Resources:
    return Resources(nodes=args.nodes, tasks_per_node=args.tasks_per_node, cpus_per_task=args.cpus_per_task,
                     gpus_per_node=args.gpus_per_node, mem_gb=args.mem_gb, timeout_min=args.timeout_min,
                     partition=args.partition, account=args.account, qos=args.qos, constraint=args.constraint,
                     signal_delay_s=args.signal_delay_s, max_requeues=args.max_requeues,
                     additional_parameters=args.slurm_additional_parameters)


def prepare_output_dir(config: PretrainConfig, resume: bool, force: bool) -> PretrainConfig:
    """Reconcile `config` with a run already in its output folder; return the config to run."""
    output_dir = Path(config.output_dir)
    saved = load_config(output_dir)
    if saved is None:
        return config
    changed = saved.diff(config)
    if not changed:
        logger.info("output folder %s contains this run; the job resumes from its newest checkpoint", output_dir)
        return config
    listing = "; ".join(f"{k}: saved {a!r}, requested {b!r}" for k, (a, b) in sorted(changed.items()))
    if resume:
        logger.warning("resuming the run in %s with its saved config; ignoring changed options: %s",
                       output_dir, listing)
        saved.output_dir = config.output_dir
        return saved
    if force:
        archive = unique_archive(output_dir)
        for entry in output_dir.iterdir():
            if entry != archive and not entry.name.startswith("replaced-"):
                entry.rename(archive / entry.name)
        logger.warning("moved the previous run in %s to %s", output_dir, archive)
        return config
    raise ConfigError(f"output folder {output_dir} holds a run with a different config ({listing}); pass "
                      f"--resume to continue that run, --force to start a new one (the old run is kept in a "
                      f"replaced-<time> sub-folder), or choose another --output_dir")


def unique_archive(output_dir: Path) -> Path:
    """Create and return OUTPUT_DIR/replaced-<time>[-N], a folder name no earlier run used."""
    stem = f"replaced-{datetime.now():%Y%m%d-%H%M%S}"
    for attempt in range(1000):
        archive = output_dir / (stem if attempt == 0 else f"{stem}-{attempt}")
        try:
            archive.mkdir()
            return archive
        except FileExistsError:
            continue
    raise ConfigError(f"could not create a replaced-<time> folder in {output_dir}; remove old ones")


def submit_pretrain(args: argparse.Namespace):
    """Validate, submit and report one pretraining job; returns the submitit job."""
    from jobs.pretrain import PretrainJob

    config = config_from_args(args)
    config.validate(check_data=False)
    resources = resources_from_args(args)
    resources.validate()
    config.check_epoch_fills_batch(len(config.check_data()), resources.world_size)
    cluster = resolve_cluster(args.cluster)
    name = args.job_name or f"fcmae-{config.model}"
    if args.dry_run:
        output_dir = Path(config.output_dir).resolve()
        config.output_dir = str(output_dir)
        print(dry_run_text(cluster, output_dir, name, resources, config))
        return None
    config = prepare_output_dir(config, args.resume, args.force)

    output_dir = Path(config.output_dir).resolve()
    config.output_dir = str(output_dir)

    executor = make_executor(cluster, output_dir / "submitit" / "%j", name, resources)
    save_config(config, output_dir)
    job = executor.submit(PretrainJob(config.to_dict(), threads=resources.cpus_per_task,
                                      timeout_min=resources.timeout_min, max_requeues=resources.max_requeues))
    record_submission(output_dir, job.job_id, cluster, resources.world_size)

    print(f"submitted job {job.job_id} ({config.model}, {cluster}, {resources.world_size} rank(s))")
    print(f"  log:    {job.paths.stdout}")
    print(f"  output: {output_dir}")
    sys.stdout.flush()
    return job


def dry_run_text(cluster: str, output_dir: Path, name: str, resources: Resources, config: PretrainConfig) -> str:
    """Describe what would be submitted: the sbatch script on Slurm, the settings elsewhere."""
    import tempfile

    header = f"# dry run: nothing submitted\n# config: {json.dumps(config.to_dict(), sort_keys=True)}\n"
    if cluster != "slurm":
        return header + f"# {cluster} job {name!r}: {dataclasses.asdict(resources)}"
    with tempfile.TemporaryDirectory() as scratch:
        executor = make_executor(cluster, Path(scratch) / "%j", name, resources)
        slurm = executor._executor
        script = slurm._make_submission_file_text(slurm._submitit_command_str, "dry-run")
    return header + script.replace(scratch, str(output_dir / "submitit"))


def stream_until_done(job, poll_s: float = 2.0) -> dict:
    """Print new lines of rank 0's stdout until the job finishes; return rank 0's result or raise."""
    position = 0
    while True:
        done = job.done()
        path = Path(job.paths.stdout)
        if path.exists():
            with open(path, "rb") as handle:
                handle.seek(position)
                chunk = handle.read()
                position += len(chunk)
            if chunk:
                sys.stdout.write(chunk.decode(errors="replace"))
                sys.stdout.flush()
        if done:
            return job.results()[0]
        time.sleep(poll_s)


def show_status(args: argparse.Namespace) -> int:
    status = run_status(args.output_dir)
    print(json.dumps(status, indent=2) if args.format == "json" else format_status(status))
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    try:
        if args.command == "status":
            return show_status(args)
        if args.command == "cancel":
            print(f"cancelled job {cancel_run(args.output_dir)}")
            return 0
        if args.command == "sweep":
            return run_sweep_command(args)
        job = submit_pretrain(args)
    except (ConfigError, LaunchError, StatusError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if job is None or not args.wait:
        return 0
    try:
        result = stream_until_done(job)
    except Exception as error:  # submitit re-raises the job's failure with its traceback
        print(f"error: job {job.job_id} failed: {error}", file=sys.stderr)
        return 1
    loss = "-" if result["loss"] is None else f"{result['loss']:.4f}"
    print(f"job {job.job_id} {result['status']}: step {result['step']}/{result['total_steps']}, "
          f"last-step loss {loss}, output {result['output_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
