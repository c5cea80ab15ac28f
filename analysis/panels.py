"""What the report's interaction and distribution panels draw, from DuckDB aggregates and
samples in bounded memory whatever the row count - computed once when a run is compacted and
kept in its summary (``panel_tables``), or from the rows when no summary describes them.

- ``report_pairs``: mean cosine distance and rows per level and pair of levels (interactions);
- ``report_levels``: per axis, metric and level, the counts, range and box a panel draws;
- ``report_points``: the scattered points of each level (a reproducible hash sample).
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Mapping, Sequence

import duckdb
import numpy as np
import pyarrow as pa

from dmx.matrix.axes import AXES

from .db import load_sql
from .queries import query_dicts

COS_ROUNDING = 1e-15  # 1 - cos of two equal float32 vectors, computed in float64, is about 2e-16
PANEL_ZEROS = {"cos_dist": COS_ROUNDING, "max_abs": 0.0}   # metric -> values drawn "at 0"
NO_FLOOR = 1e-12      # the floor of a panel with no positive value


def _ident(axis: str) -> str:
    if axis not in AXES:
        raise ValueError(f"not an axis: {axis}")
    return f'"{axis}"'


def varying_axes(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Axes of the run with more than one non-null level among its cells, in column order."""
    cols = [r[0] for r in con.execute("DESCRIBE cells").fetchall() if r[0] in AXES]
    return [a for a in cols
            if con.execute(f"SELECT count(DISTINCT {_ident(a)}) FROM cells").fetchone()[0] > 1]


SAMPLE_POINTS = 400   # points drawn per level in a distribution panel
BOX_ROWS = 200_000    # rows per level the boxes are computed from (a uniform sample above)


_X = {"cos_dist": "1 - out_cosine", "max_abs": "out_max_abs"}
_SOURCES = itertools.count()
SHARED_SAMPLE_MAX = 100_000   # per million rows: the largest share the shared sample table holds


class LevelSource:
    """What the distribution panels of ``axes`` read, in two scans of the rows whatever the
    number of panels (one scan per panel and three queries each: 64 M rows, 10 panels, 155 s):

    - ``counts[(axis, key)]``: per level, n, values at or below the metric's zero, max, smallest
      positive - from every row, one GROUPING SETS scan for every axis and metric;
    - ``level_sample_N``: a temp table of the rows whose hash falls under the largest sampling
      threshold any panel needs (each panel's sample is a hash threshold too, so it is exactly
      the subset of this table it would have read from the rows). An axis whose boxes need
      every row (no level above ``BOX_ROWS``) reads the rows directly instead."""

    def __init__(self, con: duckdb.DuckDBPyConnection, axes: Sequence[str],
                 zeros: Mapping[str, float]) -> None:
        self.con, self.axes = con, list(axes)
        self.table = f"level_sample_{next(_SOURCES)}"     # its own: sources may coexist
        self.counts: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.threshold: dict[str, int | None] = {}
        if not self.axes:
            return
        cols = ", ".join(_ident(a) for a in self.axes)
        aggs = []
        for key in _X:
            fin = f"x_{key} IS NOT NULL AND isfinite(x_{key})"
            z = float(zeros[key])
            aggs += [f"count(*) FILTER (WHERE {fin}) AS n_{key}",
                     f"count(*) FILTER (WHERE {fin} AND x_{key} <= {z!r}) AS zeros_{key}",
                     f"max(x_{key}) FILTER (WHERE {fin}) AS hi_{key}",
                     f"min(x_{key}) FILTER (WHERE {fin} AND x_{key} > {z!r}) AS low_{key}"]
        grouping = ", ".join(f"GROUPING({_ident(a)}) AS g{i}" for i, a in enumerate(self.axes))
        q = (f"SELECT {cols}, {grouping}, {', '.join(aggs)} FROM (SELECT {cols}, "
             + ", ".join(f"{x} AS x_{k}" for k, x in _X.items())
             + " FROM rows WHERE status = 'ok' AND NOT is_reference AND out_cosine IS NOT NULL) "
             f"GROUP BY GROUPING SETS ({', '.join(f'({_ident(a)})' for a in self.axes)})")
        for d in query_dicts(con, q):
            axis = next(a for i, a in enumerate(self.axes) if d[f"g{i}"] == 0)
            if d[axis] is None:
                continue
            for key in _X:
                if d[f"n_{key}"]:
                    self.counts.setdefault((axis, key), []).append(
                        {"level": d[axis], "n": d[f"n_{key}"], "zeros": d[f"zeros_{key}"],
                         "hi": d[f"hi_{key}"], "low": d[f"low_{key}"]})
        for axis in self.axes:      # the largest share any of its panels samples its boxes at
            most = min(max((c["n"] for c in self.counts.get((axis, k), [])), default=0)
                       for k in _X)
            self.threshold[axis] = int(BOX_ROWS / most * 1_000_000) if most > BOX_ROWS else None
        for axis, t in self.threshold.items():    # a sample of most rows is no sample: those
            if t is not None and t > SHARED_SAMPLE_MAX:   # axes read the rows, as before
                self.threshold[axis] = None
        top = max((t for t in self.threshold.values() if t is not None), default=None)
        if top is not None:
            con.execute(f"CREATE OR REPLACE TEMP TABLE {self.table} AS SELECT * FROM ("
                        f"SELECT {cols}, " + ", ".join(f"{x} AS x_{k}" for k, x in _X.items())
                        + ", coalesce(px_equal, false) AS px_equal, hash(image_id, cell_id) AS h "
                        "FROM rows WHERE status = 'ok' AND NOT is_reference AND out_cosine IS NOT "
                        f"NULL) WHERE h % 1000000 < {top}")

    def view(self, axis: str, key: str) -> None:
        """``level_values``: (level, x, px_equal, h) of the ok non-reference rows where ``axis``
        applies and x is finite - from the sample where this axis is sampled, else every row;
        x is the cosine distance (1 - cos) or the max abs difference (logits), h a hash of the
        row (a uniform, reproducible sample)."""
        a = _ident(axis)
        if self.threshold.get(axis) is not None:
            source = f"SELECT {a} AS level, x_{key} AS x, px_equal, h FROM {self.table}"
        else:
            source = (f"SELECT {a} AS level, {_X[key]} AS x, coalesce(px_equal, false) AS "
                      "px_equal, hash(image_id, cell_id) AS h FROM rows WHERE status = 'ok' AND "
                      "NOT is_reference AND out_cosine IS NOT NULL")
        self.con.execute(f"CREATE OR REPLACE TEMP VIEW level_values AS SELECT * FROM ({source}) "
                         f"WHERE level IS NOT NULL AND x IS NOT NULL AND isfinite(x)")


def level_stats(con: duckdb.DuckDBPyConnection, axis: str, key: str, zero: float,
                source: LevelSource | None = None
                ) -> tuple[float, dict[str, dict[str, Any]], dict[str, np.ndarray]]:
    """What one distribution panel draws, from DuckDB in bounded memory whatever the row count:
    (floor, statistics per level, sampled points per level). Values <= ``zero`` are drawn at
    ``floor`` (a power of ten below the smallest positive value). The counts ("N rows, Z at
    0"), the floor and the axis range come from every row; the boxes from every row up to
    ``BOX_ROWS`` per level, above that from a uniform sample of about ``BOX_ROWS`` (by row
    hash); the scattered points are at most ``SAMPLE_POINTS`` per level (px_equal second).
    ``source``: the report's ``LevelSource`` (else one is made for this panel alone)."""
    if source is None:
        other = {k: 0.0 for k in _X}
        source = LevelSource(con, [axis], {**other, key: zero})
    counts = [dict(c) for c in source.counts.get((axis, key), [])]
    source.view(axis, key)
    low = min((d["low"] for d in counts if d["low"] is not None), default=None)
    floor = 10.0 ** (math.floor(math.log10(low)) - 1) if low else NO_FLOOR
    most = max((d["n"] for d in counts), default=0)
    keep = 1.0 if most <= BOX_ROWS else BOX_ROWS / most      # share of rows the boxes use
    con.execute("CREATE OR REPLACE TEMP VIEW level_box AS SELECT * FROM level_values "
                f"WHERE h % 1000000 < {int(keep * 1_000_000)}" if keep < 1 else
                "CREATE OR REPLACE TEMP VIEW level_box AS SELECT * FROM level_values")
    boxes = {d["level"]: d for d in query_dicts(con, load_sql("report_level_stats"),
                                                  {"zero": zero, "floor": floor})}
    stats = {d["level"]: {**d, **boxes.get(d["level"], {})} for d in counts}
    per = SAMPLE_POINTS / max(1, most)
    sample = con.execute(
        "SELECT level, CASE WHEN x > $zero THEN x ELSE $floor END, px_equal FROM ("
        " SELECT *, row_number() OVER (PARTITION BY level ORDER BY h) AS k FROM level_values"
        f" WHERE h % 1000000 < {max(1, int(min(1.0, 4 * per) * 1_000_000))}) WHERE k <= $n",
        {"zero": zero, "floor": floor, "n": SAMPLE_POINTS}).fetchall()
    points: dict[str, list] = {}
    for level, x, same in sample:
        points.setdefault(level, []).append((x, same))
    return floor, stats, {lv: np.array(p, dtype=float) for lv, p in points.items()}


def level_pair_means(con: duckdb.DuckDBPyConnection, axes: Sequence[str]) -> list[dict[str, Any]]:
    """Mean cosine distance and row count for every level of each axis and every pair of levels
    of two axes, over ok non-reference rows (GROUPING SETS). Keys: ``a``, ``la``, ``b``, ``lb``
    (``b``/``lb`` None for a single level), ``mean``, ``n``."""
    if not axes:
        return []
    cols = ", ".join(_ident(a) for a in axes)
    sets = [f"({_ident(a)})" for a in axes]
    sets += [f"({_ident(a)}, {_ident(b)})" for a, b in itertools.combinations(axes, 2)]
    grouping = ", ".join(f"GROUPING({_ident(a)}) AS g{i}" for i, a in enumerate(axes))
    q = (f"SELECT {cols}, {grouping}, avg(1 - out_cosine) AS mean, count(*) AS n FROM rows "
         f"WHERE status = 'ok' AND NOT is_reference AND out_cosine IS NOT NULL "
         f"GROUP BY GROUPING SETS ({', '.join(sets)})")
    out = []
    for d in query_dicts(con, q):
        present = [a for i, a in enumerate(axes) if d[f"g{i}"] == 0]
        if any(d[a] is None for a in present):
            continue
        a, b = (present + [None])[:2]
        out.append({"a": a, "la": d[a], "b": b, "lb": d[b] if b else None,
                    "mean": d["mean"], "n": d["n"]})
    return out


PAIRS_SCHEMA = pa.schema([("a", pa.string()), ("la", pa.string()), ("b", pa.string()),
                          ("lb", pa.string()), ("mean", pa.float64()), ("n", pa.int64())])
_BOX = ("q1", "med", "q3", "whislo", "whishi")
LEVELS_SCHEMA = pa.schema([("axis", pa.string()), ("key", pa.string()), ("floor", pa.float64()),
                           ("level", pa.string()), ("n", pa.int64()), ("zeros", pa.int64()),
                           ("hi", pa.float64()), ("low", pa.float64()),
                           *((k, pa.float64()) for k in _BOX)])
POINTS_SCHEMA = pa.schema([("axis", pa.string()), ("key", pa.string()), ("level", pa.string()),
                           ("x", pa.float64()), ("px_equal", pa.bool_())])
Panel = tuple[float, dict[str, dict[str, Any]], dict[str, np.ndarray]]   # level_stats' answer


def panels(con: duckdb.DuckDBPyConnection, axes: Sequence[str]) -> dict[str, dict[str, Panel]]:
    """``level_stats`` of every axis and metric (``PANEL_ZEROS``), from one ``LevelSource``."""
    source = LevelSource(con, axes, PANEL_ZEROS)
    return {axis: {key: level_stats(con, axis, key, zero, source)
                   for key, zero in PANEL_ZEROS.items()} for axis in axes}


def panel_tables(con: duckdb.DuckDBPyConnection) -> dict[str, pa.Table]:
    """The report's panels of the run on ``con`` as the tables its summary keeps."""
    axes = varying_axes(con)
    levels: list[dict[str, Any]] = []
    points: list[dict[str, Any]] = []
    for axis, per_key in panels(con, axes).items():
        for key, (floor, stats, pts) in per_key.items():
            levels += [{"axis": axis, "key": key, "floor": floor, **st} for st in stats.values()]
            points += [{"axis": axis, "key": key, "level": lv, "x": float(x), "px_equal": bool(s)}
                       for lv, p in pts.items() for x, s in p]
    return {"report_pairs": pa.Table.from_pylist(level_pair_means(con, axes), PAIRS_SCHEMA),
            "report_levels": pa.Table.from_pylist(levels, LEVELS_SCHEMA),
            "report_points": pa.Table.from_pylist(points, POINTS_SCHEMA)}


def panels_from_tables(levels: pa.Table, points: pa.Table) -> dict[str, dict[str, Panel]]:
    """``panels`` read back from the stored ``report_levels`` and ``report_points``."""
    out: dict[str, dict[str, Panel]] = {}
    for d in levels.to_pylist():
        floor, stats, _ = out.setdefault(d["axis"], {}).setdefault(d["key"], (d["floor"], {}, {}))
        stats[d["level"]] = {k: v for k, v in d.items() if k not in ("axis", "key", "floor")}
    by: dict[tuple[str, str, str], list[tuple[float, bool]]] = {}
    for d in points.to_pylist():
        by.setdefault((d["axis"], d["key"], d["level"]), []).append((d["x"], d["px_equal"]))
    for (axis, key, level), p in by.items():
        out[axis][key][2][level] = np.array(p, dtype=float)
    for per_key in out.values():           # a metric with no finite value draws nothing
        for key in PANEL_ZEROS:
            per_key.setdefault(key, (NO_FLOOR, {}, {}))
    return out
