"""``dmx compact RUN``: merge a run's part files into few large Parquet files sorted by cell."""
from __future__ import annotations

import argparse
import sys

from .common import summarise

NAME = "compact"


def add_parser(sub) -> None:
    p = sub.add_parser("compact", help="merge a run's part files into few large Parquet files "
                                       "sorted by cell (fast to query; safe to interrupt)")
    p.add_argument("run_dir", help="run directory (local folder, s3:// or gs://)")
    # ``dmx run`` starts the compaction before its run, so that the imports overlap the run's
    # start: the child waits for "go" on stdin (end of input: it exits, touching nothing)
    p.add_argument("--when-told", action="store_true", help=argparse.SUPPRESS)


def run(a: argparse.Namespace) -> int:
    import time
    from dmx.results.compact import compact_run
    if getattr(a, "when_told", False):
        import dmx.analysis.aggregates  # noqa: F401 - the summary's imports, before the wait
        try:
            if sys.stdin.readline().strip() != "go":
                return 0
        except KeyboardInterrupt:   # the run was interrupted: nothing to compact
            return 0
    t = time.perf_counter()
    c = compact_run(a.run_dir)
    summarise(a.run_dir)
    print(f"dmx: {a.run_dir}: {c.files_before} file(s) -> {c.files_after} ({c.rows} rows of "
          f"{c.chunks} chunks, sorted by cell) in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    return 0
