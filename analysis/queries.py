"""Running a named, parameterised query and getting plain dicts back."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb

from dmx.results.compact import consecutive_groups

ROWS_PER_PASS = 4_000_000
"""Rows one pass of a query that holds every value of its groups may read. DuckDB's exact
``quantile_cont`` and ``list()`` keep all of a group's values in memory and do not spill (64 M
rows: three quantiles per cell ran out of a 2 GB limit), so such a query runs once per group of
consecutive cells of about this many rows: its memory follows this number (or the largest
cell), never the run's size. A run this small or smaller is one pass, as before."""


def query_dicts(con: duckdb.DuckDBPyConnection, sql: str,
                params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The rows of ``sql`` (named parameters ``$name`` from ``params``) as dicts by column."""
    res = con.execute(sql, params or {})
    names = [d[0] for d in res.description]
    return [dict(zip(names, r)) for r in res.fetchall()]


def cell_passes(cells: list[str], *cons: duckdb.DuckDBPyConnection,
                rows_per_pass: int | None = None) -> list[list[str]]:
    """``cells`` in passes of about ``rows_per_pass`` rows of the view ``rows`` each, in cell
    order (the order compaction sorts the rows in, so a pass reads only its own row groups).
    With several connections (diff's two runs) a cell weighs its most rows in any of them."""
    limit = rows_per_pass or ROWS_PER_PASS
    cells = sorted(cells)
    if all(c.execute("SELECT count(*) FROM rows").fetchall()[0][0] <= limit for c in cons):
        return [cells]                                   # counted from Parquet metadata
    counts: dict[str, int] = {}
    for con in cons:
        for cell, n in con.execute("SELECT cell_id, count(*) FROM rows WHERE list_contains("
                                   "$cells, cell_id) GROUP BY cell_id", {"cells": cells}).fetchall():
            counts[cell] = max(counts.get(cell, 0), n)
    return consecutive_groups([(c, counts.get(c, 0)) for c in cells], limit)


SQL_DIR = Path(__file__).with_name("sql")


def load_sql(name: str) -> str:
    """A named query from ``analysis/sql/NAME.sql``."""
    return (SQL_DIR / f"{name}.sql").read_text(encoding="utf-8")
