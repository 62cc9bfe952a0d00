"""Sweep folders: find the members, measure the missing ones and gather their numbers into tables.

A sweep folder SWEEP_DIR contains one run folder per member, SWEEP_DIR/<member>/, and usually
SWEEP_DIR/manifest.json ({"name", "members": {name: {"config", ...}}}, or a list of
{"name", "config", ...} entries). Without the
manifest, every direct subfolder that contains config.json is a member. Each member's
analysis lives in SWEEP_DIR/<member>/analysis/ (cosine_distance.csv and .json as written by
`python -m analysis cosine RUN --output_dir RUN/analysis`, and activations.png).

Members whose training has not completed are skipped with a logged note. The gathered
tables are written to SWEEP_DIR as summary.csv (one row per member), layer_distances.csv
(one row per member and layer) and collapse_history.csv (one row per in-training
measurement in RUN/collapse.jsonl and layer), so every figure can be redrawn from files.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from analysis import AnalysisError
from analysis.cosine import CSV_NAME, JSON_NAME, read_csv

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
CONFIG_FILE = "config.json"
FINAL_METRICS_FILE = "final_metrics.json"
PROGRESS_FILE = "progress.json"
RUN_INFO_FILE = "run_info.json"
COLLAPSE_FILE = "collapse.jsonl"
WEIGHTS_FILES = ("encoder.pth", "checkpoints/last.pt")
MEMBER_ANALYSIS_FOLDER = "analysis"
ACTIVATIONS_FILE = "activations.png"

SUMMARY_CSV = "summary.csv"
LAYER_CSV = "layer_distances.csv"
HISTORY_CSV = "collapse_history.csv"

# Member states, in the order a reader cares about them.
ANALYSED = "analysed"          # training completed and distances measured
NOT_MEASURED = "not measured"  # training completed, no cosine_distance.csv yet
INCOMPLETE = "incomplete"      # training not completed (running, failed or not started)
MISSING = "missing"            # listed in manifest.json, no run folder

MEMBER_COLUMNS = ("member", "model", "version", "size", "encoder_params", "mask_ratio", "epochs",
                  "effective_batch", "input_size", "seed")
SUMMARY_COLUMNS = (*MEMBER_COLUMNS, "status", "final_loss", "samples_seen", "mean_distance",
                   "final_layer_distance", "min_distance", "min_distance_layer", "num_layers",
                   "num_images", "note")
LAYER_COLUMNS = (*MEMBER_COLUMNS, "layer", "stage", "block", "normalized_layer", "distance", "dead_fraction")
# Columns that define a setting: members equal in all of them and with distinct seeds are its seeds.
SETTING_COLUMNS = ("model", "mask_ratio", "epochs", "input_size", "effective_batch")
HISTORY_COLUMNS = (*MEMBER_COLUMNS, "epoch", "step", "samples_seen", "layer", "stage", "block",
                   "normalized_layer", "distance", "dead_fraction")


@dataclass
class Member:
    """One run of a sweep: its folder, resolved config and training state."""

    name: str
    folder: Path
    config: dict = field(default_factory=dict)
    status: str = INCOMPLETE
    note: str = ""
    final_metrics: dict = field(default_factory=dict)

    @property
    def completed(self) -> bool:
        return self.status in (ANALYSED, NOT_MEASURED)

    @property
    def analysis_folder(self) -> Path:
        return self.folder / MEMBER_ANALYSIS_FOLDER

    @property
    def model(self) -> str | None:
        return self.config.get("model")


@dataclass
class Sweep:
    """A sweep folder and its members, in manifest order (else sorted by folder name)."""

    folder: Path
    name: str
    members: list[Member]
    has_manifest: bool

    def completed(self) -> list[Member]:
        return [member for member in self.members if member.completed]

    def skipped(self) -> list[Member]:
        return [member for member in self.members if not member.completed]


@dataclass
class SweepTables:
    """The gathered numbers: member summary, per-layer distances and in-training history."""

    summary: list[dict]
    layers: list[dict]
    history: list[dict]


# Finding the members.

def is_sweep_folder(path: Path) -> bool:
    """Return True for a folder with manifest.json, or without cosine_distance.csv but with member runs."""
    if not path.is_dir():
        return False
    if (path / MANIFEST_FILE).is_file():
        return True
    if (path / CSV_NAME).is_file():
        return False
    return any((child / CONFIG_FILE).is_file() for child in path.iterdir() if child.is_dir())


def load_sweep(folder: str | Path) -> Sweep:
    """Find the members of a sweep folder and the training state of each."""
    folder = Path(str(folder))
    if not folder.is_dir():
        raise AnalysisError(f"sweep folder {str(folder)!r} does not exist; pass the folder that contains "
                            f"{MANIFEST_FILE} or the member run folders")

    manifest_path = folder / MANIFEST_FILE
    if manifest_path.is_file():
        manifest = read_json(manifest_path)
        members = _manifest_members(manifest, manifest_path, folder)
        name = str(manifest.get("name") or folder.name)
        _warn_unlisted(folder, members)
    else:
        members = [Member(name=child.name, folder=child) for child in sorted(folder.iterdir())
                   if child.is_dir() and (child / CONFIG_FILE).is_file()]
        name = folder.name
        logger.info("%s has no %s; found %d member folders by their %s", folder, MANIFEST_FILE, len(members),
                    CONFIG_FILE)
    if not members:
        raise AnalysisError(f"{folder} contains no sweep members: no {MANIFEST_FILE} with members and no "
                            f"subfolder with {CONFIG_FILE}")

    for member in members:
        _read_member_state(member)
        if not member.completed:
            logger.info("skipping member %s (%s): %s", member.name, member.status, member.note)
    return Sweep(folder=folder, name=name, members=members, has_manifest=manifest_path.is_file())


def _manifest_members(manifest: dict, path: Path, folder: Path) -> list[Member]:
    entries = manifest.get("members")
    if isinstance(entries, dict):
        # The launcher's manifest maps member names to their entries.
        entries = [{"name": name, **entry} for name, entry in sorted(entries.items()) if isinstance(entry, dict)]
    if not isinstance(entries, list):
        raise AnalysisError(f"{path} has no 'members' list; expected {{\"name\": ..., \"members\": "
                            f"[{{\"name\": ..., \"config\": {{...}}}}, ...]}}")
    members = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or not entry.get("name"):
            raise AnalysisError(f"{path}: member {index} has no 'name'; every member needs the name of its "
                                f"run folder")
        config = entry.get("config") if isinstance(entry.get("config"), dict) else {}
        members.append(Member(name=str(entry["name"]), folder=folder / str(entry["name"]), config=dict(config)))
    return members


def _warn_unlisted(folder: Path, members: list[Member]) -> None:
    listed = {member.name for member in members}
    unlisted = [child.name for child in sorted(folder.iterdir())
                if child.is_dir() and child.name not in listed and (child / CONFIG_FILE).is_file()]
    if unlisted:
        logger.warning("ignoring run folders not listed in %s: %s", MANIFEST_FILE, ", ".join(unlisted))


def _read_member_state(member: Member) -> None:
    """Set the member's config, status and note from the files in its run folder."""
    if not member.folder.is_dir():
        member.status, member.note = MISSING, "no run folder (not started?)"
        return

    config_path = member.folder / CONFIG_FILE
    if config_path.is_file():
        member.config = read_json(config_path)
    if not member.model:
        member.status, member.note = INCOMPLETE, f"no model name in {CONFIG_FILE} or the manifest"
        return

    final_path = member.folder / FINAL_METRICS_FILE
    final = read_json(final_path) if final_path.is_file() else {}
    if final.get("status") != "completed":
        member.status, member.note = INCOMPLETE, _progress_note(member.folder)
        return
    if not any((member.folder / name).is_file() for name in WEIGHTS_FILES):
        member.status, member.note = INCOMPLETE, f"training completed but neither {' nor '.join(WEIGHTS_FILES)} exists"
        return

    member.final_metrics = final
    measured = (member.analysis_folder / CSV_NAME).is_file()
    member.status = ANALYSED if measured else NOT_MEASURED
    member.note = "" if measured else f"no {MEMBER_ANALYSIS_FOLDER}/{CSV_NAME}; run 'python -m analysis aggregate'"


def _progress_note(folder: Path) -> str:
    progress_path = folder / PROGRESS_FILE
    if not progress_path.is_file():
        return "training not completed (no progress.json yet)"
    progress = read_json(progress_path)
    return (f"training not completed: step {progress.get('step', '?')}/{progress.get('total_steps', '?')}, "
            f"epoch {progress.get('epoch', '?')}/{progress.get('epochs', '?')} at {progress.get('time', '?')}")


def read_json(path: Path) -> dict:
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise AnalysisError(f"{path} is not valid JSON ({error}); fix or delete it") from error
    if not isinstance(content, dict):
        raise AnalysisError(f"{path} contains a JSON {type(content).__name__}; expected an object")
    return content


# Member facts.

@functools.lru_cache(maxsize=None)
def encoder_parameter_count(model_name: str) -> int:
    """Count the encoder's parameters, head norm included and classifier excluded, on the meta device."""
    import torch

    from fcmae.registry import create_encoder

    with torch.device("meta"):
        encoder = create_encoder(model_name)
    return sum(parameter.numel() for parameter in encoder.parameters())


def effective_batch(member: Member) -> int | None:
    """Return images per optimizer step: samples seen / steps, else from the config and run_info.json."""
    steps = member.final_metrics.get("step")
    samples = member.final_metrics.get("samples_seen")
    if steps and samples:
        return int(samples) // int(steps)

    world_size = None
    run_info_path = member.folder / RUN_INFO_FILE
    if run_info_path.is_file():
        starts = read_json(run_info_path).get("starts") or []
        world_size = starts[-1].get("world_size") if starts else None
    batch_size, update_freq = member.config.get("batch_size"), member.config.get("update_freq", 1)
    if world_size is None or batch_size is None:
        return None
    return int(batch_size) * int(update_freq) * int(world_size)


def member_facts(member: Member) -> dict:
    """Return the MEMBER_COLUMNS values of a member with a known model."""
    from fcmae.registry import model_size, model_version

    model = member.model
    return {"member": member.name, "model": model, "version": model_version(model), "size": model_size(model),
            "encoder_params": encoder_parameter_count(model), "mask_ratio": member.config.get("mask_ratio"),
            "epochs": member.config.get("epochs"), "effective_batch": effective_batch(member),
            "input_size": member.config.get("input_size"), "seed": member.config.get("seed")}


def member_distance_rows(member: Member) -> list[dict]:
    """Return the member's rows of RUN/analysis/cosine_distance.csv, sorted by layer."""
    path = member.analysis_folder / CSV_NAME
    rows = read_csv(path)
    runs = sorted({row["run"] for row in rows})
    if len(runs) > 1:
        rows = [row for row in rows if row["run"] == member.name]
        if not rows:
            raise AnalysisError(f"{path} contains the runs {', '.join(runs)} but none named {member.name!r}; "
                                f"rerun 'python -m analysis cosine {member.folder} --output_dir "
                                f"{member.analysis_folder}'")
    return sorted(rows, key=lambda row: row["layer"])


def read_collapse_history(path: Path) -> list[dict]:
    """Read RUN/collapse.jsonl: one record per measurement, sorted by step.

    A line that is not valid JSON (a write cut short) is skipped with a warning; a later
    line for the same step replaces an earlier one.
    """
    records: dict[int, dict] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            logger.warning("skipping line %d of %s: not valid JSON", number, path)
            continue
        if not isinstance(record, dict) or not {"epoch", "step", "samples_seen", "layers"} <= set(record):
            logger.warning("skipping line %d of %s: expected keys epoch, step, samples_seen, layers", number, path)
            continue
        records[int(record["step"])] = record
    return [records[step] for step in sorted(records)]


# Gathering the tables.

def gather_tables(sweep: Sweep) -> SweepTables:
    """Collect the summary, per-layer and history rows of every member from its files."""
    summary, layers, history = [], [], []
    for member in sweep.members:
        if not member.completed:
            summary.append(_skipped_row(member))
            continue

        facts = member_facts(member)
        distance_rows = member_distance_rows(member) if member.status == ANALYSED else []
        summary.append(_summary_row(member, facts, distance_rows))
        layers.extend({**facts, **{column: row[column] for column in LAYER_COLUMNS if column in row}}
                      for row in distance_rows)
        history.extend(_history_rows(member, facts))
    return SweepTables(summary=summary, layers=layers, history=history)


def _skipped_row(member: Member) -> dict:
    row = dict.fromkeys(SUMMARY_COLUMNS)
    row.update(member=member.name, model=member.model, mask_ratio=member.config.get("mask_ratio"),
               epochs=member.config.get("epochs"), input_size=member.config.get("input_size"),
               seed=member.config.get("seed"), status=member.status, note=member.note)
    return row


def _summary_row(member: Member, facts: dict, distance_rows: list[dict]) -> dict:
    row = dict.fromkeys(SUMMARY_COLUMNS)
    row.update(facts, status=member.status, note=member.note, final_loss=member.final_metrics.get("final_loss"),
               samples_seen=member.final_metrics.get("samples_seen"))
    if distance_rows:
        distances = [r["distance"] for r in distance_rows]
        lowest = min(distance_rows, key=lambda r: r["distance"])
        row.update(mean_distance=sum(distances) / len(distances), final_layer_distance=distances[-1],
                   min_distance=lowest["distance"], min_distance_layer=lowest["layer"],
                   num_layers=len(distance_rows), num_images=_measured_images(member))
    return row


def _measured_images(member: Member) -> int | None:
    path = member.analysis_folder / JSON_NAME
    if not path.is_file():
        return None
    return read_json(path).get("images", {}).get("count")


def _history_rows(member: Member, facts: dict) -> list[dict]:
    path = member.folder / COLLAPSE_FILE
    if not path.is_file():
        return []
    rows = []
    for record in read_collapse_history(path):
        for layer in record["layers"]:
            rows.append({**facts, "epoch": record["epoch"], "step": record["step"],
                         "samples_seen": record["samples_seen"],
                         **{key: layer.get(key) for key in ("layer", "stage", "block", "normalized_layer",
                                                             "distance", "dead_fraction")}})
    return rows


def write_tables(sweep: Sweep, tables: SweepTables) -> list[Path]:
    """Write summary.csv, layer_distances.csv and collapse_history.csv to the sweep folder."""
    return [write_rows(sweep.folder / SUMMARY_CSV, SUMMARY_COLUMNS, tables.summary),
            write_rows(sweep.folder / LAYER_CSV, LAYER_COLUMNS, tables.layers),
            write_rows(sweep.folder / HISTORY_CSV, HISTORY_COLUMNS, tables.history)]


def write_rows(path: Path, columns: tuple[str, ...], rows: list[dict]) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
    return path


def format_summary(rows: list[dict]) -> str:
    """Format the summary as a fixed-width text table for logs."""
    headers = ("member", "model", "params", "mask", "final loss", "mean dist", "final dist", "min dist", "status")
    lines = [[row["member"], row["model"] or "-", _millions(row["encoder_params"]), _number(row["mask_ratio"], 2),
              _number(row["final_loss"], 4), _number(row["mean_distance"], 4),
              _number(row["final_layer_distance"], 4), _number(row["min_distance"], 4), row["status"]]
             for row in rows]
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *lines)]
    return "\n".join("  ".join(f"{str(cell):<{width}}" for cell, width in zip(line, widths))
                     for line in [list(headers), *lines])


def _number(value: object, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{float(value):.{digits}f}"


def _millions(value: object) -> str:
    return "-" if value is None else f"{int(value) / 1e6:.2f}M"


# Seed replicates.

def group_rows(rows: list[dict], key) -> dict:
    """Group rows by a column name or a function of the row, keeping first-seen order."""
    groups: dict = {}
    for row in rows:
        groups.setdefault(row[key] if isinstance(key, str) else key(row), []).append(row)
    return groups


def setting_key(row: dict) -> tuple:
    return tuple(row.get(column) for column in SETTING_COLUMNS)


def seed_groups(rows: list[dict]) -> list[list[dict]]:
    """Group rows by setting; a setting's members stay apart unless each has its own known seed.

    Members of one setting that share a seed (or have none, as in tables written before the
    seed column) differ in something the tables do not record, so they are not averaged.
    """
    groups = []
    for setting_rows in group_rows(rows, setting_key).values():
        members = group_rows(setting_rows, "member")
        seeds = {member_rows[0].get("seed") for member_rows in members.values()}
        if None in seeds or len(seeds) < len(members):
            groups += list(members.values())
        else:
            groups.append(setting_rows)
    return groups


# Measuring the members that lack distances.

def measure_members(sweep: Sweep, images: str, max_images: int | None, batch_size: int, input_size: int | None,
                    num_channels: int, num_images: int, force: bool) -> list[Path]:
    """Run cosine (and draw an activation grid) for each completed member that lacks them.

    A member is measured again when `force` is set or its weights are newer than its CSV.
    Returns the files written.
    """
    from analysis.activations import run_activations
    from analysis.cosine import run_cosine

    written = []
    for member in sweep.completed():
        output_dir = member.analysis_folder
        if force or _needs_measurement(member):
            logger.info("measuring member %s", member.name)
            written += run_cosine([member.folder], output_dir, input_size, images, max_images, batch_size,
                                  tensorboard=False)
            member.status, member.note = ANALYSED, ""
        grid = output_dir / ACTIVATIONS_FILE
        if force or not grid.is_file() or grid.stat().st_mtime < (output_dir / CSV_NAME).stat().st_mtime:
            written += run_activations([member.folder], None, output_dir, num_channels, num_images, 0, input_size,
                                       images, per_model=False)
    return written


def _needs_measurement(member: Member) -> bool:
    csv_path = member.analysis_folder / CSV_NAME
    if not csv_path.is_file():
        return True
    weights = [member.folder / name for name in WEIGHTS_FILES if (member.folder / name).is_file()]
    newest = max(path.stat().st_mtime for path in weights)
    if newest > csv_path.stat().st_mtime:
        logger.info("the weights of %s are newer than %s; measuring again", member.name, csv_path)
        return True
    return False
