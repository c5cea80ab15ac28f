"""The benchmark machine's load: benchmarks on a shared box should start when it is quiet."""
from __future__ import annotations

import sys
import time


def _busy_and_total() -> tuple[float, float]:
    with open("/proc/stat", encoding="ascii") as f:
        v = [float(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0.0)  # idle + iowait
    return sum(v) - idle, sum(v)


def busy_cores(window_s: float = 2.0) -> float:
    """CPU cores' worth of work done by all processes over the next ``window_s`` seconds."""
    import os
    b0, t0 = _busy_and_total()
    time.sleep(window_s)
    b1, t1 = _busy_and_total()
    return (b1 - b0) / max(1e-9, t1 - t0) * (os.cpu_count() or 1)


def wait_for_quiet(max_wait_s: float, threshold_cores: float = 0.15, window_s: float = 2.0) -> float:
    """Block until the machine runs less than ``threshold_cores`` of work over a window, or
    ``max_wait_s`` passes; returns the last measured load (cores). Reports on stderr."""
    deadline = time.monotonic() + max_wait_s
    load = busy_cores(window_s)
    while load > threshold_cores and time.monotonic() < deadline:
        print(f"waiting for a quiet machine: {load:.2f} cores busy", file=sys.stderr)
        load = busy_cores(window_s)
    return load
