"""DuckDB over a run directory: views ``rows``, ``cells``, ``images``, ``accuracy`` and
``accuracy_contrasts`` (where rows carry ground truth: ``dmx.analysis.accuracy``), and ``layers``
once ``dmx localize`` ran, on the Parquet files.

The run is verified on read (``RunDir.verify``): the rows come from the files the run's own
bookkeeping names (compacted files, then intact part files of planned chunks), never a stray or
truncated file. A run with missing or unreadable chunks is answered with a loud warning on
stderr naming them and the resume command - or refused where a complete run is required
(``require_complete=True``, as ``dmx check`` does). A run in an object store (``s3://``,
``gs://``) is read through Arrow datasets on pyarrow's filesystem (DuckDB's httpfs is not needed).
"""
from __future__ import annotations

import sys
from pathlib import Path

import duckdb
import pyarrow.parquet as pq

from dmx.results.store import Health, RunDir, RunDirError

from .queries import SQL_DIR, load_sql  # noqa: F401 - load_sql is imported from here too



def register_accuracy_views(con: duckdb.DuckDBPyConnection) -> None:
    from .accuracy import register_accuracy_views as define   # it loads SQL from here
    define(con)
_warned: set[str] = set()


def _sql_list(paths: list[str]) -> str:
    return "[" + ", ".join("'" + p.replace("'", "''") + "'" for p in paths) + "]"


def verify_run(path: str | Path | RunDir, require_complete: bool = False) -> Health:
    """Check the run's chunks; warn once per run on stderr, or raise IncompleteRunError."""
    health = (path if isinstance(path, RunDir) else RunDir(path)).verify()
    if require_complete:
        health.require_complete()
    elif not health.complete and health.location not in _warned:
        _warned.add(health.location)
        print(f"dmx: warning: {health.message()}; the numbers below leave those images out",
              file=sys.stderr)
    return health


QUERY_MEMORY = "2GB"   # DuckDB's memory for analysis queries; beyond it they spill to disk


def _connect() -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB in bounded memory: joins, sorts and aggregates over tens of millions
    of rows spill to a temporary folder instead of growing with the run."""
    import tempfile
    con = duckdb.connect()
    con.execute(f"SET memory_limit = '{QUERY_MEMORY}'")
    con.execute("SET enable_progress_bar = false")   # long queries must not draw on the console
    con.execute("SET temp_directory = ?", [str(Path(tempfile.gettempdir()) / "dmx-duckdb-spill")])
    return con


def open_run(path: str | Path | RunDir, con: duckdb.DuckDBPyConnection | None = None, *,
             require_complete: bool = False) -> duckdb.DuckDBPyConnection:
    """Connect DuckDB to a run; raises RunDirError if ``path`` holds no readable rows."""
    run = path if isinstance(path, RunDir) else RunDir(path)
    run.read_manifest()
    verify_run(run, require_complete)
    files = run.row_files()
    if not files:
        raise RunDirError(f"{run.uri} has no rows yet (the run wrote no readable chunk)")
    con = con or _connect()
    if run.remote:
        import pyarrow.dataset as pads   # imports pandas (0.4 s): only for runs in object storage
        schema = pq.read_schema(files[0], filesystem=run.fs)
        con.register("_dmx_rows", pads.dataset(files, schema=schema, filesystem=run.fs,
                                               format="parquet"))
        con.register("_dmx_cells", pq.read_table(run.path("cells.parquet"), filesystem=run.fs))
        images = run.path("images.parquet") if run.is_file("images.parquet") else run.path("_images")
        con.register("_dmx_images", pq.read_table(images, filesystem=run.fs))
        for view in ("rows", "cells", "images"):
            con.execute(f"CREATE OR REPLACE VIEW {view} AS SELECT * FROM _dmx_{view}")
        register_accuracy_views(con)
        return con
    root = str(run.root.resolve()).replace("'", "''")
    con.execute(f"CREATE OR REPLACE VIEW rows AS SELECT * FROM read_parquet({_sql_list(files)}, "
                "hive_partitioning = false, union_by_name = true)")
    con.execute(f"CREATE OR REPLACE VIEW cells AS SELECT * FROM read_parquet('{root}/cells.parquet')")
    images = run.root / "images.parquet"
    if images.is_file():
        con.execute(f"CREATE OR REPLACE VIEW images AS SELECT * FROM read_parquet('{root}/images.parquet')")
    else:
        con.execute(f"CREATE OR REPLACE VIEW images AS SELECT * FROM read_parquet('{root}/_images/*.parquet')")
    register_accuracy_views(con)
    if any((run.root / "layers").glob("cell=*.parquet")):  # written by dmx localize
        con.execute(f"CREATE OR REPLACE VIEW layers AS SELECT * FROM read_parquet("
                    f"'{root}/layers/cell=*.parquet', hive_partitioning = false, union_by_name = true)")
    return con
