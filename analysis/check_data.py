"""Check an image folder before training: files per format and every file that cannot be decoded.

Each file is decoded exactly as the training data loader decodes it (fcmae.data.decode_rgb,
with the JPEG draft size of a 224-pixel run), in a pool of worker processes.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from analysis import AnalysisError

logger = logging.getLogger(__name__)

# The draft size of the default --input_size 224 with the default crop scale (0.2, 1.0).
CHECK_INPUT_SIZE = 224


@dataclass
class ScanReport:
    """Result of a folder scan: decoded files per format and (path, reason) of the others."""

    root: str
    workers: int
    formats: Counter = field(default_factory=Counter)
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.formats.values()) + len(self.unreadable)


def check_file(path: str) -> tuple[str, str | None, str | None]:
    """Decode one file; return (path, format, None) or (path, None, reason)."""
    from fcmae.data import decode_min_side, decode_rgb, describe_decode_error

    try:
        _, file_format = decode_rgb(Path(path), decode_min_side(CHECK_INPUT_SIZE, (0.2, 1.0)))
    except Exception as error:  # Pillow's decoders raise many exception types
        return path, None, describe_decode_error(error)
    return path, file_format or "unknown", None


def scan_images(data: str, workers: int | None = None) -> ScanReport:
    """Decode every image file under `data` ('sample' or a folder) with `workers` processes."""
    from fcmae.data import resolve_data

    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise AnalysisError(f"invalid --workers {workers!r}: it must be a positive integer")

    paths = [str(path) for path in resolve_data(str(data))]
    logger.info("checking %d image files under %s with %d worker process(es)", len(paths), data, workers)
    start = time.monotonic()
    if workers == 1:
        results = map(check_file, paths)
        report = _collect(data, workers, results)
    else:
        chunksize = max(1, min(256, len(paths) // (workers * 8)))
        with ProcessPoolExecutor(max_workers=workers) as pool:
            report = _collect(data, workers, pool.map(check_file, paths, chunksize=chunksize))
    report.seconds = time.monotonic() - start
    logger.info("checked %d files in %.1f s: %d cannot be decoded", report.total, report.seconds,
                len(report.unreadable))
    return report


def _collect(data: str, workers: int, results) -> ScanReport:
    report = ScanReport(str(data), workers)
    for path, file_format, reason in results:
        if reason is None:
            report.formats[file_format] += 1
        else:
            report.unreadable.append((path, reason))
    return report


def format_report(report: ScanReport) -> str:
    """Return the scan as text: a summary line, files per format, then each unreadable file."""
    lines = [f"{report.total} image files under {report.root}: {report.total - len(report.unreadable)} "
             f"decoded, {len(report.unreadable)} cannot be decoded ({report.workers} workers, "
             f"{report.seconds:.1f} s)",
             "files per format (from the file content, not the extension):"]
    width = max((len(name) for name in report.formats), default=0)
    lines += [f"  {name:<{width}}  {count}" for name, count in sorted(report.formats.items())]
    if report.unreadable:
        lines.append("files that cannot be decoded (training replaces each by another file and "
                     "stops above --max_bad_fraction):")
        lines += [f"  {path}: {reason}" for path, reason in sorted(report.unreadable)]
    return "\n".join(lines)


def run_check_data(path: str, workers: int | None = None, allow_unreadable: bool = False) -> str:
    """Scan `path` and return the report; print it and exit with status 1 if files cannot be decoded.

    With `allow_unreadable` the report is returned (exit status 0) in every case.
    """
    import sys

    report = scan_images(path, workers)
    text = format_report(report)
    if report.unreadable and not allow_unreadable:
        print(text)
        sys.stdout.flush()
        sys.exit(1)
    return text
