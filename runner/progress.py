"""Progress on stderr: a live line on a terminal, plain periodic lines otherwise."""
from __future__ import annotations

import sys
import time
from typing import TextIO


def _fmt_eta(seconds: float) -> str:
    s = int(max(0, seconds))
    return f"{s // 60}:{s % 60:02d}"


class Progress:
    def __init__(self, total_images: int, total_chunks: int, cells: int, *,
                 stream: TextIO | None = None, enabled: bool = True, interval_s: float = 5.0) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.enabled = enabled
        self.total_images, self.total_chunks, self.cells = total_images, total_chunks, cells
        self.images = self.chunks = self.errors = 0
        self.start = time.perf_counter()
        self.last_print = 0.0
        self.interval_s = interval_s

    def skip(self, images: int, chunks: int) -> None:
        """Chunks already done by an earlier, interrupted run (resume)."""
        self.total_images -= images
        self.total_chunks -= chunks

    def update(self, images: int, errors: int) -> None:
        self.images += images
        self.chunks += 1
        self.errors += errors
        now = time.perf_counter()
        if self.enabled and (self.tty or now - self.last_print >= self.interval_s
                             or self.chunks == self.total_chunks):
            self.last_print = now
            self._print(now)

    def _print(self, now: float) -> None:
        elapsed = now - self.start
        rate = self.images / elapsed if elapsed > 0 else 0.0
        eta = (self.total_images - self.images) / rate if rate > 0 else 0.0
        width = 24
        done = int(width * self.chunks / max(1, self.total_chunks))
        bar = "#" * done + "-" * (width - done)
        line = (f"[{bar}] {self.images}/{self.total_images} images x {self.cells} cells "
                f"| chunk {self.chunks}/{self.total_chunks} | {rate:.1f} img/s "
                f"| errors {self.errors} | ETA {_fmt_eta(eta)}")
        if self.tty:
            self.stream.write("\r" + line + ("\n" if self.chunks == self.total_chunks else ""))
        else:
            self.stream.write("dmx: " + line + "\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        if self.enabled:
            self.stream.write(("\n" if self.tty and 0 < self.chunks < self.total_chunks else "")
                              + f"dmx: {text}\n")
            self.stream.flush()
