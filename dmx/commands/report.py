"""``dmx report RUN [-o FILE]``: write one self-contained HTML page about a run."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import add_map_resamples

NAME = "report"


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="write one self-contained HTML page about a run")
    p.add_argument("run_dir")
    p.add_argument("-o", "--out", default=None, help="HTML file to write (default: RUN_DIR/report.html)")
    add_map_resamples(p)


def run(a: argparse.Namespace) -> int:
    import time
    from dmx.analysis.report import write_report
    from dmx.results.fs import is_remote
    t = time.perf_counter()
    if a.out is None and is_remote(a.run_dir):  # a run in an object store gets its report there
        import tempfile
        from dmx.results import RunDir
        run_dir = RunDir(a.run_dir)
        with tempfile.TemporaryDirectory() as tmp:
            out = write_report(a.run_dir, Path(tmp) / "report.html", a.map_resamples)
            data = out.read_bytes()
        run_dir.write_bytes("report.html", data)
        where, size = f"{run_dir.uri}/report.html", len(data)
    else:
        out = write_report(a.run_dir, a.out or Path(a.run_dir) / "report.html", a.map_resamples)
        where, size = str(out), out.stat().st_size
    print(f"dmx: report written to {where} ({size / 1e6:.1f} MB in "
          f"{time.perf_counter() - t:.1f} s)", file=sys.stderr)
    return 0
