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
    # start: the child waits for "rows" on stdin, compacts, then for "summary" (end of input
    # first: it exits, touching nothing; after "rows": the rows stay compacted, no summary)
    p.add_argument("--when-told", action="store_true", help=argparse.SUPPRESS)


def run(a: argparse.Namespace) -> int:
    import time
    from dmx.results.compact import compact_run
    told = getattr(a, "when_told", False)
    if told:
        import dmx.analysis.aggregates  # noqa: F401 - the summary's imports, before the wait
        if _told() != "rows":
            return 0       # the run failed or was interrupted: nothing to compact
    t = time.perf_counter()
    c = compact_run(a.run_dir)
    if not told or _told() == "summary":   # told: once the run's image facts are merged
        summarise(a.run_dir)
    print(f"dmx: {a.run_dir}: {c.files_before} file(s) -> {c.files_after} ({c.rows} rows of "
          f"{c.chunks} chunks, sorted by cell) in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    return 0


def _told() -> str:
    """The next word ``dmx run`` writes on stdin ("" at its end, or if interrupted)."""
    try:
        return sys.stdin.readline().strip()
    except KeyboardInterrupt:
        return ""
