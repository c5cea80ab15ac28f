"""Running a named, parameterised query and getting plain dicts back."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb


def query_dicts(con: duckdb.DuckDBPyConnection, sql: str,
                params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The rows of ``sql`` (named parameters ``$name`` from ``params``) as dicts by column."""
    res = con.execute(sql, params or {})
    names = [d[0] for d in res.description]
    return [dict(zip(names, r)) for r in res.fetchall()]


SQL_DIR = Path(__file__).with_name("sql")


def load_sql(name: str) -> str:
    """A named query from ``analysis/sql/NAME.sql``."""
    return (SQL_DIR / f"{name}.sql").read_text(encoding="utf-8")
