"""One checkpoint manager: atomic saves, newest-valid lookup, rotation and timm export.

Layout under OUTPUT_DIR/checkpoints/:
- checkpoint-<step>.pt: one file per save, each written to a temporary name, fsynced and
  renamed, so a file with this name is always complete;
- last.pt: a hard link to (or, where links fail, a copy of) the newest checkpoint, also
  replaced atomically.
Checkpoints hold plain types and tensors only, so every load uses weights_only=True.
"""

from __future__ import annotations

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
    """Load a checkpoint with weights_only=True, with an error that says why a file is rejected."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Unsupported global" in str(error) or "Weights only load failed" in str(error):
            raise CheckpointError(f"{path} was rejected: it holds Python objects other than tensors and plain "
                                  f"types, which weights_only loading refuses to run. Only load files you "
                                  f"trust, and re-save them as plain state dicts ({_first_line(error)})") from None
        raise CheckpointError(f"{path} is not a readable checkpoint (corrupt pickle: {_first_line(error)})") from None
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except Exception as error:  # torch reports truncated or foreign files with many exception types
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(error).__name__}: "
                              f"{_first_line(error)})") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def atomic_torch_save(obj, path: Path) -> None:
    """Write `obj` to `path` through a temporary file in the same folder, fsync and rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
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
        """Write `state` as the checkpoint of `step`, point last.pt at it, prune old ones."""
        path = self.folder / f"checkpoint-{step:09d}.pt"
        try:
            atomic_torch_save(state, path)
            self._link_last(path)
        except OSError as error:
            raise CheckpointError(f"failed to write checkpoint {path}: {error}. The previous checkpoint "
                                  f"{self.last_path} is unchanged; free space or fix permissions and resume") from error
        self._prune()
        return path

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

        last.pt is tried first; if it or a newer numbered file cannot be read, older ones are
        tried in turn and each skipped file is reported with a warning.
        """
        candidates = [self.last_path] if self.last_path.exists() else []
        candidates += self.checkpoints()
        failed = []
        for path in candidates:
            try:
                state = safe_load(path)
            except CheckpointError as error:
                failed.append(path)
                logger.warning("skipping checkpoint: %s", error)
                continue
            if failed:
                logger.warning("resuming from %s because newer checkpoint(s) could not be read: %s",
                               path, ", ".join(str(p) for p in failed))
            return state, path
        if failed:
            raise CheckpointError(f"no readable checkpoint in {self.folder}; unreadable: "
                                  f"{', '.join(str(p) for p in failed)}")
        return None


def export_encoder(encoder_state: dict[str, torch.Tensor], output_dir: str | Path) -> Path:
    """Write the encoder weights (timm keys) to OUTPUT_DIR/encoder.pth atomically."""
    path = Path(output_dir) / ENCODER_FILE
    atomic_torch_save(encoder_state, path)
    return path


def encoder_state_from_checkpoint(state: dict) -> dict[str, torch.Tensor]:
    """Extract the timm-format encoder weights from an FCMAE checkpoint's model state."""
    prefix = "encoder."
    return {k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)}
