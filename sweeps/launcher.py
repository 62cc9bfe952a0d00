"""Launch, inspect, resume and cancel sweeps as Slurm job arrays.

The sweep folder holds manifest.json (members, resolved configs, config hashes, job ids,
submission times) and one run folder per member. Members with equal resources go into
one job array; each member's analysis runs as a dependent job (afterok), and one
aggregation job (afterany on every member) runs `python -m analysis aggregate`, which
builds the sweep's figures, TensorBoard summary and report.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from jobs.executor import Resources, make_executor, resolve_cluster
from jobs.pretrain import PretrainJob
from jobs.status import last_error_line, newest_checkpoint, slurm_state

from fcmae.config import PretrainConfig
from fcmae.optim import scaled_lr

from .spec import Member, SweepError, SweepSpec, make_resources

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SUSPENDED",
          "CONFIGURING", "COMPLETING", "PREEMPTED", "STAGE_OUT", "SIGNALING"}
RESUMABLE = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
             "NOT_SUBMITTED"}


class AnalysisJob:
    """Run `python -m analysis ARGS` as a Slurm job (member analysis or sweep aggregation)."""

    def __init__(self, args: list[str]):
        self.args = list(args)

    def __call__(self) -> str:
        command = [sys.executable, "-m", "analysis", *self.args]
        result = subprocess.run(command, capture_output=True, text=True)
        sys.stderr.write(result.stderr)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed with exit status {result.returncode}")
        return result.stdout


def now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def load_manifest(sweep_dir: Path) -> dict | None:
    path = sweep_dir / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def save_manifest(sweep_dir: Path, manifest: dict) -> None:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    tmp = sweep_dir / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, sweep_dir / MANIFEST)


def member_state(entry: dict) -> tuple[str, int, str | None]:
    """(state, requeues, exit code) of a manifest entry's newest job."""
    if not entry.get("job_id"):
        return "NOT_SUBMITTED", 0, None
    return slurm_state(entry["job_id"])


# --------------------------------------------------------------------------- launch
def launch(sweep_file: str, sweep_dir: str | None = None, dry_run: bool = False, force: bool = False,
           array_parallelism: int = 64, analysis: bool = True, cluster: str = "auto") -> str:
    """Validate every member, then submit those not yet submitted; returns a printable summary."""
    spec = SweepSpec.load(sweep_file)
    sweep_dir = Path(sweep_dir or Path("runs") / "sweeps" / spec.name).resolve()
    members = spec.members(sweep_dir, check_data=not dry_run)
    manifest = load_manifest(sweep_dir) or {"name": spec.name, "sweep_file": str(Path(sweep_file).resolve()),
                                             "created": now(), "members": {}}
    pending = members_to_submit(members, manifest, force)
    if dry_run:
        return dry_run_table(members, pending, sweep_dir)
    if array_parallelism < 1:
        raise SweepError(f"invalid --array_parallelism {array_parallelism}: it must be at least 1")
    if resolve_cluster(cluster) != "slurm":
        raise SweepError("sweeps run as Slurm job arrays, and no Slurm controller responds here; start one "
                         "(scripts/local_slurm.sh for a local cluster) or launch members one by one with "
                         "run_with_submitit.py pretrain")

    manifest["array_parallelism"] = array_parallelism
    submitted = submit_members(pending, sweep_dir, manifest, array_parallelism, analysis)
    save_manifest(sweep_dir, manifest)
    skipped = len(members) - len(pending)
    return (f"sweep {spec.name}: {len(members)} members, {len(submitted)} submitted, {skipped} already "
            f"submitted\nfolder: {sweep_dir}\nstatus: run_with_submitit.py sweep status {sweep_dir}")


def members_to_submit(members: list[Member], manifest: dict, force: bool) -> list[Member]:
    """Members never submitted; a submitted member whose config changed is an error unless `force`."""
    pending = []
    for member in members:
        entry = manifest["members"].get(member.name)
        if entry is None or not entry.get("job_id"):
            pending.append(member)
            continue
        if entry["config_hash"] != member.config_hash:
            if not force:
                raise SweepError(f"member {member.name} was submitted with a different config (hash "
                                 f"{entry['config_hash']}, now {member.config_hash}); pass --force to "
                                 f"resubmit it (its run folder is kept and moved aside) or use a new --sweep_dir")
            archive_member(Path(member.config.output_dir))
            pending.append(member)
    return pending


def archive_member(run_dir: Path) -> None:
    if run_dir.exists():
        target = run_dir.with_name(f"{run_dir.name}.replaced-{datetime.now():%Y%m%d-%H%M%S}")
        run_dir.rename(target)
        logger.warning("moved the previous run of %s to %s", run_dir.name, target)


def dry_run_table(members: list[Member], pending: list[Member], sweep_dir: Path) -> str:
    header = (f"{'member':<34} {'model':<18} {'mask':>5} {'epochs':>6} {'batch':>6} {'lr':>8} {'nodes':>5} "
              f"{'tasks':>5} {'gpus':>4} {'time':>6}  status")
    lines = [f"# dry run: nothing submitted; sweep folder {sweep_dir}", header]
    for m in members:
        r = m.resources
        state = "to submit" if m in pending else "submitted"
        batch, lr = member_batch_and_lr(m)
        lines.append(f"{m.name:<34} {m.config.model:<18} {m.config.mask_ratio:>5.2f} {m.config.epochs:>6} "
                     f"{batch:>6} {lr:>8.2e} {r.nodes:>5} {r.tasks_per_node:>5} {r.gpus_per_node:>4} "
                     f"{r.timeout_min:>6}  {state}")
    lines.append(f"{len(members)} members, {len(pending)} to submit, in {len(group_by_resources(pending))} "
                 f"job array(s)")
    for group in group_by_resources(members).values():
        lines.append(f"resources for {len(group)} member(s): {vars(group[0].resources)}")
    data_problems = sorted({problem for m in members if (problem := data_problem(m))})
    for problem in data_problems:
        lines.append(f"warning: {problem}; 'sweep launch' will reject it")
    return "\n".join(lines)


def member_batch_and_lr(member: Member) -> tuple[int, float]:
    """Return the member's effective batch (images per optimizer step) and the peak lr it trains with."""
    config, resources = member.config, member.resources
    batch = config.batch_size * config.update_freq * resources.nodes * resources.tasks_per_node
    return batch, config.lr if config.lr is not None else scaled_lr(config.blr, batch)


def data_problem(member: Member) -> str | None:
    try:
        member.config.check_data()
        return None
    except ValueError as error:
        return str(error)


def group_by_resources(members: list[Member]) -> dict[tuple, list[Member]]:
    groups: dict[tuple, list[Member]] = {}
    for member in members:
        key = tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in vars(member.resources).items()))
        groups.setdefault(key, []).append(member)
    return groups


def submit_members(members: list[Member], sweep_dir: Path, manifest: dict, array_parallelism: int,
                   analysis: bool) -> list[Member]:
    """Submit `members` as job arrays (one per resource group), then their analysis jobs."""
    for group in group_by_resources(members).values():
        resources = group[0].resources
        executor = make_executor("slurm", sweep_dir / "submitit" / "%j", f"sweep-{manifest['name']}", resources)
        executor.update_parameters(slurm_array_parallelism=array_parallelism)
        with executor.batch():
            jobs = [executor.submit(PretrainJob(m.config.to_dict(), threads=resources.cpus_per_task,
                                                timeout_min=resources.timeout_min,
                                                max_requeues=resources.max_requeues)) for m in group]
        for member, job in zip(group, jobs):
            record_member(manifest, member, job.job_id, str(job.paths.stdout))

    if analysis and members:
        submit_analysis(members, sweep_dir, manifest)
    return members


def record_member(manifest: dict, member: Member, job_id: str, log: str) -> None:
    entry = manifest["members"].setdefault(member.name, {"history": []})
    entry.update({"config": member.config.to_dict(), "config_hash": member.config_hash,
                  "resources": vars(member.resources), "output_dir": member.config.output_dir,
                  "job_id": job_id, "log": log, "submitted": now(), "analysis_job_id": None})
    entry["history"].append({"job_id": job_id, "submitted": entry["submitted"]})


def submit_analysis(members: list[Member], sweep_dir: Path, manifest: dict) -> None:
    """Submit one afterok job per member (cosine distances) and one afterany job for the whole sweep."""
    small = Resources(cpus_per_task=2, timeout_min=60, partition=members[0].resources.partition,
                      account=members[0].resources.account, qos=members[0].resources.qos)
    for member in members:
        entry = manifest["members"][member.name]
        run_dir = member.config.output_dir
        job = submit_with_dependency(small, sweep_dir, f"analysis-{member.name}", f"afterok:{entry['job_id']}",
                                     AnalysisJob(["cosine", run_dir, "--output_dir", str(Path(run_dir) / "analysis"),
                                                  "--tensorboard=False"]))
        entry["analysis_job_id"] = job.job_id

    active = [e["job_id"] for e in manifest["members"].values() if e.get("job_id")]
    job = submit_with_dependency(small, sweep_dir, f"aggregate-{manifest['name']}", "afterany:" + ":".join(active),
                                 AnalysisJob(["aggregate", str(sweep_dir)]))
    manifest["aggregate_job_id"] = job.job_id


def submit_with_dependency(resources: Resources, sweep_dir: Path, name: str, dependency: str, function):
    executor = make_executor("slurm", sweep_dir / "submitit" / "%j", name, resources)
    executor.update_parameters(slurm_dependency=dependency)
    return executor.submit(function)


# --------------------------------------------------------------------------- status
def sweep_status(sweep_dir: str | Path) -> list[dict]:
    """Return one status record per member: state, progress, loss, checkpoint age, failure reason."""
    sweep_dir = Path(sweep_dir)
    manifest = load_manifest(sweep_dir)
    if manifest is None:
        raise SweepError(f"{sweep_dir} contains no sweep ({MANIFEST} is missing); pass the folder printed by "
                         f"'sweep launch'")
    return [member_record(name, entry) for name, entry in sorted(manifest["members"].items())]


def member_record(name: str, entry: dict) -> dict:
    state, requeues, exit_code = member_state(entry)
    run_dir = Path(entry.get("output_dir", ""))
    progress = read_json(run_dir / "progress.json")
    checkpoint, age = newest_checkpoint(run_dir)
    record = {"name": name, "job_id": entry.get("job_id"), "state": state, "requeues": requeues,
              "exit_code": exit_code, "epoch": progress.get("epoch"), "epochs": entry["config"]["epochs"],
              "step": progress.get("step"), "total_steps": progress.get("total_steps"),
              "loss": progress.get("loss"), "checkpoint_age_s": age, "output_dir": str(run_dir),
              "log": entry.get("log"), "reason": None}
    if state not in ACTIVE and state not in ("COMPLETED", "NOT_SUBMITTED"):
        record["reason"] = failure_reason(entry, exit_code)
    return record


def failure_reason(entry: dict, exit_code: str | None) -> str:
    """Return the exit code and the last error line of the member's log."""
    log = Path(entry.get("log") or "")
    err = log.with_suffix(".err")
    line = last_error_line(err) or last_error_line(log) or "no error line in the log"
    return f"exit {exit_code}: {line} (log: {err if err.exists() else log})"


def format_status(records: list[dict]) -> str:
    header = (f"{'member':<30} {'job':>10} {'state':<13} {'rq':>2} {'epoch':>7} {'progress':>8} {'loss':>7} "
              f"{'ckpt age':>8}  output")
    lines = [header]
    for r in records:
        progress = f"{100 * r['step'] / r['total_steps']:.0f}%" if r["step"] and r["total_steps"] else "-"
        epoch = f"{r['epoch']}/{r['epochs']}" if r["epoch"] is not None else f"-/{r['epochs']}"
        loss = f"{r['loss']:.4f}" if r["loss"] is not None else "-"
        age = f"{r['checkpoint_age_s'] / 60:.0f} min" if r["checkpoint_age_s"] is not None else "-"
        lines.append(f"{r['name']:<30} {str(r['job_id'] or '-'):>10} {r['state']:<13} {r['requeues']:>2} "
                     f"{epoch:>7} {progress:>8} {loss:>7} {age:>8}  {r['output_dir']}")
        if r["reason"]:
            lines.append(f"{'':<30} reason: {r['reason']}")
    counts: dict[str, int] = {}
    for r in records:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    lines.append("total: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + f" ({len(records)} members)")
    return "\n".join(lines)


# --------------------------------------------------------------------------- resume and cancel
def resume(sweep_dir: str | Path, analysis: bool = True) -> str:
    """Resubmit members that failed, were cancelled or never started; they resume from checkpoints."""
    sweep_dir = Path(sweep_dir).resolve()
    manifest = load_manifest(sweep_dir)
    if manifest is None:
        raise SweepError(f"{sweep_dir} contains no sweep ({MANIFEST} is missing)")
    members = []
    for name, entry in sorted(manifest["members"].items()):
        state, _, _ = member_state(entry)
        if state in RESUMABLE:
            cancel_job(entry.get("analysis_job_id"))
            members.append(Member(name, PretrainConfig.from_dict(entry["config"]), make_resources(entry["resources"])))
    if not members:
        return f"sweep {manifest['name']}: nothing to resume"
    cancel_job(manifest.get("aggregate_job_id"))
    submit_members(members, sweep_dir, manifest, manifest.get("array_parallelism", 64), analysis)
    save_manifest(sweep_dir, manifest)
    return f"sweep {manifest['name']}: resubmitted {len(members)} member(s): {', '.join(m.name for m in members)}"


def cancel(sweep_dir: str | Path, member: str | None = None) -> str:
    sweep_dir = Path(sweep_dir)
    manifest = load_manifest(sweep_dir)
    if manifest is None:
        raise SweepError(f"{sweep_dir} contains no sweep ({MANIFEST} is missing)")
    names = [member] if member else sorted(manifest["members"])
    unknown = [n for n in names if n not in manifest["members"]]
    if unknown:
        raise SweepError(f"unknown member {unknown[0]!r}; members: {', '.join(sorted(manifest['members']))}")
    for name in names:
        entry = manifest["members"][name]
        cancel_job(entry.get("job_id"))
        cancel_job(entry.get("analysis_job_id"))
    if member is None:
        cancel_job(manifest.get("aggregate_job_id"))
    return f"cancelled {len(names)} member(s) of sweep {manifest['name']}; checkpoints are kept"


def cancel_job(job_id: str | None) -> None:
    if job_id:
        subprocess.run(["scancel", str(job_id)], capture_output=True, timeout=60)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
