"""One checkpoint manager: atomic saves, newest-valid lookup, rotation and timm export.

Layout under OUTPUT_DIR/checkpoints/:
- checkpoint-<step>.pt: one file per save, each written to a temporary name, fsynced and
  renamed, so a file with this name is always complete;
- last.pt: a hard link to (or, where links fail, a copy of) the newest checkpoint, also
  replaced atomically.
Temporary files start with a dot and end in .tmp, so no pattern above matches them.
Checkpoints hold plain types and tensors only, so every load uses weights_only=True.
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LAST = "last.pt"
ENCODER_FILE = "encoder.pth"
_PATTERN = re.compile(r"^checkpoint-(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """Raised when a checkpoint cannot be written or no usable one can be read."""


def safe_load(path: str | Path) -> dict:
    """Load a checkpoint with weights_only=True; the error explains why a file is rejected.

    weights_only loading never runs code from the file: a pickled reference to a function or
    class other than tensors and plain types is rejected before anything is called.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        detail = _unpickler_detail(error)
        if "Unsupported global" in detail:
            raise CheckpointError(f"{path} was rejected: it refers to Python code ({detail}), and weights_only "
                                  f"loading accepts only tensors and plain types, so nothing from it was run. "
                                  f"Only load files you trust, and re-save them as plain state dicts") from None
        raise CheckpointError(f"{path} is not a readable checkpoint: the weights_only unpickler rejected it "
                              f"({detail}); it is corrupt or was not written by torch.save") from None
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except Exception as error:  # torch reports truncated or foreign files with many exception types
        raise CheckpointError(f"{path} is not a readable checkpoint, probably truncated or corrupt "
                              f"({type(error).__name__}: {_first_line(error)})") from None


def _unpickler_detail(error: pickle.UnpicklingError) -> str:
    """Return the specific part of torch's weights_only error, e.g. 'Unsupported global: GLOBAL os.system ...'."""
    text = str(error)
    marker = "WeightsUnpickler error:"
    if marker not in text:
        return _first_line(error)
    detail = text.split(marker, 1)[1].strip().split("\n")[0]
    return detail.split(" was not an allowed global")[0].strip()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class _WriteErrorKeeper:
    """A binary file wrapper that keeps the OSError of a failed write.

    torch.save reports a failed write of its zip writer as a RuntimeError ('unexpected
    pos ...') without the cause. The kept error reads 'No space left on device' instead.
    """

    def __init__(self, handle):
        self.handle = handle
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.handle.flush()


def atomic_torch_save(obj, path: Path) -> None:
    """Write `obj` to `path` through a temporary file in the same folder, fsync and rename.

    Raises OSError when the file cannot be written (disk full, permission denied). The
    temporary file is then removed, and an existing file at `path` stays unchanged.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            writer = _WriteErrorKeeper(handle)
            try:
                torch.save(obj, writer)
            except RuntimeError:
                if writer.error is None:
                    raise
                raise writer.error from None
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
        _fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointManager:
    """Save and find the training checkpoints of one output folder."""

    def __init__(self, output_dir: str | Path, keep_last: int = 2):
        self.folder = Path(output_dir) / CHECKPOINT_DIR
        self.keep_last = keep_last

    @property
    def last_path(self) -> Path:
        return self.folder / LAST

    def checkpoints(self) -> list[Path]:
        """Return the numbered checkpoint files, newest (highest step) first."""
        if not self.folder.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.folder.iterdir() if (m := _PATTERN.match(p.name))]
        return [p for _, p in sorted(found, reverse=True)]

    def save(self, state: dict, step: int) -> Path:
        """Write `state` as the checkpoint of `step`, point last.pt at it, prune old ones.

        Expects to be the folder's only writer (the training run holds the run lock), so
        temporary files of a save that was killed can be removed first.
        """
        path = self.folder / f"checkpoint-{step:09d}.pt"
        try:
            self._remove_stale_temp_files()
            atomic_torch_save(state, path)
            self._link_last(path)
        except OSError as error:
            previous = f"the previous checkpoint {self.last_path} is unchanged" if self.last_path.exists() \
                else "no earlier checkpoint exists"
            raise CheckpointError(f"failed to write checkpoint {path}: {error}; {previous}. "
                                  f"{_save_error_hint(error, self.folder)}") from error
        self._prune()
        return path

    def _remove_stale_temp_files(self) -> None:
        if not self.folder.is_dir():
            return
        for stale in self.folder.iterdir():
            if stale.name.startswith((".checkpoint-", f".{LAST}.")) and stale.name.endswith(".tmp"):
                stale.unlink(missing_ok=True)
                logger.info("removed %s, the partial file of an interrupted checkpoint save", stale)

    def _link_last(self, path: Path) -> None:
        tmp = self.folder / f".{LAST}.tmp"
        if tmp.exists():
            tmp.unlink()
        try:
            os.link(path, tmp)
        except OSError:
            shutil.copyfile(path, tmp)
        os.replace(tmp, self.last_path)
        _fsync_dir(self.folder)

    def _prune(self) -> None:
        for old in self.checkpoints()[self.keep_last:]:
            old.unlink(missing_ok=True)

    def load_latest(self) -> tuple[dict, Path] | None:
        """Return (state, path) of the newest readable checkpoint, or None when there is none.

        Files are tried newest first (see `_candidates`). When newer files cannot be read, one
        warning names each of them with the reason and the older file that is used instead.
        """
        failed = []
        for path in self._candidates():
            try:
                state = safe_load(path)
            except CheckpointError as error:
                target = self._last_target() if path == self.last_path else None
                failed.append(f"{error} [{LAST} links to {target.name}]" if target else str(error))
                continue
            if failed:
                logger.warning("using the older checkpoint %s because the newer one(s) cannot be read: %s",
                               path, "; ".join(failed))
            return state, path
        if failed:
            raise CheckpointError(f"no readable checkpoint in {self.folder}: {'; '.join(failed)}. Restore a "
                                  f"checkpoint there, or move the folder away to start from scratch")
        return None

    def _candidates(self) -> list[Path]:
        """Return the checkpoint files to try, newest first.

        last.pt is a hard link to the newest numbered file, unless a save was killed between
        writing checkpoint-N and relinking last.pt. Numbered files newer than its target then
        come first. A last.pt that links to no numbered file (a copy) comes first.
        """
        numbered = self.checkpoints()
        if not self.last_path.exists():
            return numbered
        target = self._last_target()
        if target is None:
            return [self.last_path] + numbered
        position = numbered.index(target)
        return numbered[:position] + [self.last_path] + numbered[position + 1:]

    def _last_target(self) -> Path | None:
        """Return the numbered checkpoint that last.pt is a hard link to, if any."""
        for path in self.checkpoints():
            try:
                if os.path.samefile(path, self.last_path):
                    return path
            except FileNotFoundError:  # pruned by a training run that is still writing
                continue
        return None


def _save_error_hint(error: OSError, folder: Path) -> str:
    """Return what to do about a failed checkpoint write, by its errno."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        free_mb = shutil.disk_usage(folder).free / 2**20 if folder.is_dir() else float("nan")
        return (f"The disk or quota is full ({free_mb:.0f} MiB free in {folder}); free space or move the "
                f"run to a larger disk, then resume")
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"Make {folder} writable for this user, then resume"
    return "Fix the cause above, then resume"


def export_encoder(encoder_state: dict[str, torch.Tensor], output_dir: str | Path) -> Path:
    """Write the encoder weights (timm keys) to OUTPUT_DIR/encoder.pth atomically."""
    path = Path(output_dir) / ENCODER_FILE
    atomic_torch_save(encoder_state, path)
    return path


def encoder_state_from_checkpoint(state: dict) -> dict[str, torch.Tensor]:
    """Extract the timm-format encoder weights from an FCMAE checkpoint's model state."""
    prefix = "encoder."
    return {k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)}
