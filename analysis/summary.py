"""The aggregates ``explain`` needs, computed once when a run is compacted, kept beside its rows.

``dmx explain`` runs about eight queries, each a scan of every row; on 10 M rows that is ~4 s
of DuckDB on two cores however the files are laid out. The same queries, run once when the run
is compacted (at the end of ``dmx run`` and by ``dmx compact``), give tables of a few hundred
rows (per cell, per cell and image property, a few worst images per cell) that ``explain``
reads instead.

A summary is used only while it describes exactly the rows being read: it is keyed by the run's
row files (names and sizes), ``cells.parquet`` and ``images.parquet``, and the text of the
queries and their parameters. After a resume adds rows, a recompaction, or a dmx whose queries
changed, the key differs and the queries run on the rows as before - a summary can make
``explain`` faster, never different.

``check`` and ``report`` read theirs from it too: the tables of the queries below, check's
worst values and rows beyond the run's own tolerances (``check.stored_tables``; other limits
recount only the cells whose worst value breaks them) and the report's panels
(``panels.panel_tables``); ``diff`` its per-cell digests (``diff_self``).
``aggregates.write_summary`` computes and stores them all.

    RUN/summary/<query>.parquet   one table per query (computed for every cell)
    RUN/summary/summary.json      the key; written last (the commit point)
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from dmx.results.store import RunDir

from .db import load_sql
from .queries import cell_passes, query_dicts
from .tolerances import COS_EPS

SUMMARY_DIR = "summary"
KEY_FILE = f"{SUMMARY_DIR}/summary.json"
ALL_CELLS = "*"          # a ``cells`` parameter computed for every cell, filtered on read
WORST_PER_CELL = 3       # explain's default

# query name -> the parameters it is computed with
QUERIES: dict[str, dict[str, Any]] = {
    "cell_stats": {"cells": ALL_CELLS, "cos_eps": COS_EPS},
    "median_ci": {"cells": ALL_CELLS},
    "cell_moments": {},
    "row_status": {},
    "node_counts": {},
    "worst_images": {"cells": ALL_CELLS, "per_cell": WORST_PER_CELL},
    "property_split": {"cells": ALL_CELLS, "cos_eps": COS_EPS},
    "det_cell_stats": {"cells": ALL_CELLS},
    "det_worst_images": {"cells": ALL_CELLS, "per_cell": WORST_PER_CELL},
    "accuracy_cells": {},
    "accuracy_pairs": {},
    "output_worst": {"cells": ALL_CELLS},
    # dmx check's and dmx report's queries without parameters
    "cell_precision": {},
    "check_new_errors": {},
    "check_not_judged": {},
    "check_reference_errors": {},
    "check_images": {},
    "check_batch": {},
    "report_error_images": {},
    "diff_self": {},     # dmx diff: each cell against itself, and a digest of its rows
}
# the code that computes the stored tables besides these queries' SQL (its text is in the key)
CODE_FILES = ("summary.py", "aggregates.py", "check.py", "panels.py", "tolerances.py", "queries.py",
              "db.py")
# queries that hold every value of a cell (exact quantiles, sorted lists): run in passes of
# cells (``queries.cell_passes``) so that their memory does not grow with the run
HOLD_VALUES = {"cell_stats", "median_ci", "det_cell_stats", "output_worst"}


def run_query(con: duckdb.DuckDBPyConnection, name: str, params: dict[str, Any]) -> pa.Table:
    """The named query's result; those in ``HOLD_VALUES`` one pass of cells at a time."""
    sql = load_sql(name)
    if name not in HOLD_VALUES:
        return con.sql(sql, params=params).to_arrow_table()
    return pa.concat_tables([con.sql(sql, params={**params, "cells": cells}).to_arrow_table()
                             for cells in cell_passes(params["cells"], con)])


def _code_digest() -> str:
    from dmx.matrix import axes       # the axes registry: levels, what the panels split by
    here = Path(__file__).parent
    code = {n: (here / n).read_text(encoding="utf-8") for n in CODE_FILES}
    code["matrix/axes.py"] = Path(axes.__file__).read_text(encoding="utf-8")
    text = json.dumps({"queries": QUERIES,
                       "sql": {p.name: p.read_text(encoding="utf-8")
                               for p in sorted((here / "sql").glob("*.sql"))},
                       "code": code},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def rows_key(run: RunDir) -> dict[str, Any]:
    """What the summary describes: the row files and side tables (relative names, sizes) and
    the code and SQL that computed it."""
    return {"files": run.files_key(), "queries": _code_digest()}


def _params(con: duckdb.DuckDBPyConnection, params: dict[str, Any]) -> dict[str, Any]:
    if params.get("cells") == ALL_CELLS:
        cells = [r[0] for r in con.execute("SELECT cell_id FROM cells").fetchall()]
        return {**params, "cells": cells}
    return params


def _applies(name: str, columns: set[str], task: str) -> bool:
    if name == "node_counts":
        return "node" in columns
    if name == "output_worst":
        return "outputs" in columns
    if name == "check_batch":
        return "batch_rel_l2" in columns
    if name == "diff_self":
        return {"threads_used", "out_digest"} <= columns
    if name.startswith("accuracy_"):
        return {"label", "correct_top1", "correct_top5"} <= columns
    return task == "detection" or not name.startswith("det_")


def _plain(table: pa.Table) -> pa.Table:
    """DuckDB's HUGEINT sums arrive as decimal128(38, 0): stored as int64, read back as ints
    (as ``fetchall`` gives them)."""
    for i, f in enumerate(table.schema):
        if pa.types.is_decimal(f.type):
            to = pa.int64() if f.type.scale == 0 else pa.float64()
            table = table.set_column(i, f.name, table.column(i).cast(to))
    return table


def query_tables(con: duckdb.DuckDBPyConnection, run: RunDir) -> dict[str, pa.Table]:
    """The results of ``QUERIES`` that apply to the run on ``con``."""
    task = (run.read_manifest().get("model") or {}).get("task") or "classification"
    columns = {r[0] for r in con.execute("DESCRIBE rows").fetchall()}
    return {name: _plain(run_query(con, name, _params(con, params)))
            for name, params in QUERIES.items() if _applies(name, columns, task)}


def store_tables(run: RunDir, tables: dict[str, pa.Table], key: dict[str, Any]) -> int:
    """Replace the run's summary by ``tables``, computed from the rows that ``key``
    (``rows_key``, taken *before* they were read) describes; returns the rows they hold.

    The key goes first and comes back last, so a summary half written is never read; it is the
    key of the rows before the queries ran, so rows that changed while they ran (a resume
    writing part files, a compaction) leave a key that no longer matches: never used. The key
    names its tables: a stored table it does not name (a query that no longer applies to the
    run) is removed and never read."""
    if run.is_file(KEY_FILE):
        run.delete([run.path(KEY_FILE)])          # no key while its tables are replaced
    for name, table in tables.items():
        run.write_parquet(f"{SUMMARY_DIR}/{name}.parquet", table)
    keep = {run.path(f"{SUMMARY_DIR}/{name}.parquet") for name in tables}
    run.delete(i.path for i in run._list(SUMMARY_DIR)
               if i.path.endswith(".parquet") and i.path not in keep)
    run.write_bytes(KEY_FILE, json.dumps({**key, "tables": sorted(tables)}).encode())
    return sum(t.num_rows for t in tables.values())


class Summary:
    """Answers explain's named queries from the stored summary when it describes the rows
    being read, else by running the query on ``con``."""

    def __init__(self, con: duckdb.DuckDBPyConnection, run: RunDir) -> None:
        self.con, self.run = con, run
        self.valid, self.names = False, frozenset()
        try:
            if run.is_file(KEY_FILE):
                stored = json.loads(run.read_bytes(KEY_FILE).decode())
                self.names = frozenset(stored.pop("tables", ()))
                self.valid = stored == rows_key(run)
        except (OSError, ValueError, TypeError, AttributeError):
            self.valid = False

    def table(self, name: str) -> pa.Table | None:
        """The stored table ``name`` when the summary describes the rows and holds it, else None."""
        if not self.valid or name not in self.names:
            return None
        try:
            return self.run.read_parquet(f"{SUMMARY_DIR}/{name}.parquet")
        except (OSError, pa.ArrowInvalid):
            return None

    def rows(self, name: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        params = params or {}
        stored = QUERIES.get(name)
        if stored is not None and self._same(stored, params):
            table = self.table(name)
            if table is not None:
                got = table.to_pylist()
                if "cells" in params:
                    wanted = set(params["cells"])
                    got = [r for r in got if r["cell_id"] in wanted]
                return got
        sql = load_sql(name)
        if name in HOLD_VALUES:
            return [d for cells in cell_passes(params["cells"], self.con)
                    for d in query_dicts(self.con, sql, {**params, "cells": cells})]
        return query_dicts(self.con, sql, params)

    @staticmethod
    def _same(stored: dict[str, Any], params: dict[str, Any]) -> bool:
        if set(stored) != set(params):
            return False
        return all(stored[k] == v for k, v in params.items() if k != "cells")
