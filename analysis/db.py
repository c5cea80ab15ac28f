"""DuckDB over a run directory: views ``rows``, ``cells``, ``images`` (and ``layers`` once
``dmx localize`` ran) on the Parquet files."""
from __future__ import annotations

from pathlib import Path

import duckdb

from results.store import RunDir, RunDirError

SQL_DIR = Path(__file__).with_name("sql")


def load_sql(name: str) -> str:
    """A named query from ``analysis/sql/NAME.sql``."""
    return (SQL_DIR / f"{name}.sql").read_text(encoding="utf-8")


def open_run(path: str | Path, con: duckdb.DuckDBPyConnection | None = None) -> duckdb.DuckDBPyConnection:
    """Connect DuckDB to a run; raises RunDirError if ``path`` holds no rows."""
    run = RunDir(path)
    run.read_manifest()
    if not any(run.rows_dir.glob("chunk=*/part-0.parquet")):
        raise RunDirError(f"{path} has no rows yet (the run wrote no chunk)")
    con = con or duckdb.connect()
    root = str(run.root.resolve()).replace("'", "''")
    con.execute(f"CREATE OR REPLACE VIEW rows AS SELECT * FROM read_parquet('{root}/rows/*/part-0.parquet', "
                "hive_partitioning = true, union_by_name = true)")
    con.execute(f"CREATE OR REPLACE VIEW cells AS SELECT * FROM read_parquet('{root}/cells.parquet')")
    images = run.root / "images.parquet"
    if images.is_file():
        con.execute(f"CREATE OR REPLACE VIEW images AS SELECT * FROM read_parquet('{root}/images.parquet')")
    else:
        con.execute(f"CREATE OR REPLACE VIEW images AS SELECT * FROM read_parquet('{root}/_images/*.parquet')")
    if any((run.root / "layers").glob("cell=*.parquet")):  # written by dmx localize
        con.execute(f"CREATE OR REPLACE VIEW layers AS SELECT * FROM read_parquet("
                    f"'{root}/layers/cell=*.parquet', hive_partitioning = false, union_by_name = true)")
    return con
