"""Logging set-up for entry points: rank 0 reports progress, every rank keeps its own file."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s [rank %(rank)s] %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


class _RankFilter(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


def configure_logging(rank: int = 0, log_dir: str | Path | None = None, level: int = logging.INFO) -> None:
    """Send INFO to stdout on rank 0 (WARNING on other ranks) and everything to LOG_DIR/rank<r>.log.

    Replaces handlers installed by an earlier call, so a requeued job does not log twice.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_fcmae", False):
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)
    formatter = logging.Formatter(FORMAT, DATE_FORMAT)
    rank_filter = _RankFilter(rank)

    stream = logging.StreamHandler(sys.stdout)
    stream.setLevel(level if rank == 0 else logging.WARNING)
    handlers = [stream]
    if log_dir is not None:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(log_dir) / f"rank{rank}.log"))
    # submitit's logger has a stdout handler of its own; keep its lines out of ours.
    logging.getLogger("submitit").propagate = False
    for handler in handlers:
        handler._fcmae = True
        handler.setFormatter(formatter)
        handler.addFilter(rank_filter)
        root.addHandler(handler)
