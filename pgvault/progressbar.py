"""A one-line progress bar on a terminal: bytes, files, rate and time left.

Commands show it only when stderr is a terminal; under cron or a pipe they stay
quiet. Updates may come from several threads and are drawn at most a few times
a second.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

WIDTH = 24


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def render(*, bytes_done: int, bytes_total: int, files_done: int, files_total: int, elapsed: float,
           note: str | None = None) -> str:
    """The bar's text: pure, so it can be tested."""
    fraction = min(1.0, bytes_done / bytes_total) if bytes_total else 0.0
    filled = int(fraction * WIDTH)
    rate = bytes_done / elapsed if elapsed > 0 else 0.0
    eta = format_duration((bytes_total - bytes_done) / rate) if rate > 0 and bytes_total > bytes_done else "-"
    text = (f"{fraction * 100:3.0f}% [{'#' * filled}{'-' * (WIDTH - filled)}] "
            f"{format_bytes(bytes_done)}/{format_bytes(bytes_total)}  {files_done}/{files_total} files  "
            f"{format_bytes(rate)}/s  ETA {eta}")
    return f"{text}  {note}" if note else text


class ProgressBar:
    def __init__(self, stream: TextIO = sys.stderr, *, interval: float = 0.2) -> None:
        self._stream = stream
        self._interval = interval
        self._started = time.monotonic()
        self._last = 0.0
        self._lock = threading.Lock()
        self._shown = False

    def update(self, *, bytes_done: int, bytes_total: int, files_done: int, files_total: int,
               note: str | None = None, force: bool = False) -> None:
        with self._lock:
            now = time.monotonic()
            if not force and now - self._last < self._interval:
                return
            self._last = now
            line = render(bytes_done=bytes_done, bytes_total=bytes_total, files_done=files_done,
                          files_total=files_total, elapsed=now - self._started, note=note)
            self._stream.write("\r\033[K" + line)
            self._stream.flush()
            self._shown = True

    def message(self, text: str) -> None:
        """Print a line above the bar (the bar is redrawn on the next update)."""
        with self._lock:
            self._stream.write(("\r\033[K" if self._shown else "") + text + "\n")
            self._stream.flush()
            self._last = 0.0

    def finish(self) -> None:
        with self._lock:
            if self._shown:
                self._stream.write("\r\033[K")
                self._stream.flush()
                self._shown = False
