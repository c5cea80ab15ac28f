"""``dmx sql RUN [QUERY]``: query a run's Parquet files with DuckDB, or open a small prompt."""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from .common import CliError, add_map_resamples

NAME = "sql"


def add_parser(sub) -> None:
    p = sub.add_parser("sql", help="query a run with DuckDB (views rows, cells, images, contrasts, "
                                   "effects, interactions, accuracy, accuracy_contrasts, a "
                                   "detector's detection_accuracy and detection_matches; layers "
                                   "once dmx localize ran)")
    p.add_argument("run_dir")
    p.add_argument("query", nargs="?", help="SQL; omit for an interactive prompt")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    add_map_resamples(p)


def run(a: argparse.Namespace) -> int:
    import duckdb
    from dmx.analysis.db import open_run
    from dmx.analysis.explain import explain_run, register_views
    con = open_run(a.run_dir)
    # The attribution views cost a full explain (seconds on millions of rows): only when used.
    if not a.query or re.search(r"\b(contrasts|effects|interactions)\b", a.query, re.I):
        register_views(con, explain_run(a.run_dir))
    # A detector's mAP views cost COCOeval and the bootstrap per cell: only when used.
    if not a.query or re.search(r"\bdetection_(accuracy|matches|truth|truth_images)\b", a.query, re.I):
        from dmx.analysis.detection_accuracy import register_detection_accuracy
        register_detection_accuracy(con, a.run_dir, resamples=a.map_resamples)
    if not a.query:
        return _prompt(con, a.run_dir)
    try:
        rel = con.sql(a.query)
    except duckdb.Error as e:
        raise CliError(f"SQL: {str(e).splitlines()[0]}") from None
    if rel is None:
        return 0
    if a.format == "csv":
        write_csv(rel.columns, rel.fetchall(), sys.stdout)
    elif a.format == "json":
        cols = rel.columns
        print(json.dumps([dict(zip(cols, r)) for r in rel.fetchall()], default=str, indent=1))
    else:
        rel.show(max_rows=200, max_width=200)
    return 0


def write_csv(columns, rows, out) -> None:
    """A header and the rows as CSV with ``\\n`` line ends (csv's default ``\\r\\n`` leaves a
    ``\\r`` on every line of a shell pipeline: ``cut``, ``awk``, ``sort``)."""
    import csv
    w = csv.writer(out, lineterminator="\n")
    w.writerow(columns)
    w.writerows(rows)


def _prompt(con, run_dir: str) -> int:
    import duckdb
    root = Path(run_dir).resolve()
    print(f"dmx sql: views rows, cells, images, contrasts, effects, interactions, accuracy, "
          f"accuracy_contrasts over {root}. End a statement with ';', quit with "
          f"Ctrl-D.\nIn the duckdb CLI: CREATE VIEW rows AS SELECT * FROM "
          f"read_parquet('{root}/rows/*/part-0.parquet', hive_partitioning=true);")
    if not sys.stdin.isatty():
        return 0
    buf = ""
    while True:
        try:
            line = input("dmx> " if not buf else "...> ")
        except EOFError:
            print()
            return 0
        buf += line + "\n"
        if buf.strip().endswith(";"):
            try:
                rel = con.sql(buf)
                if rel is not None:
                    rel.show(max_rows=50, max_width=200)
            except duckdb.Error as e:
                print(f"error: {str(e).splitlines()[0]}")
            buf = ""
