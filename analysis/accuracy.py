"""Accuracy against ground truth, per cell and per cell against the reference.

Counts come from DuckDB (``sql/accuracy_cells.sql``, ``sql/accuracy_pairs.sql``): one row per
cell, never one per image. The interval and McNemar's p of each cell's change come from its four
paired counts (``dmx.analysis.paired.paired_from_counts``, exact for the paired bootstrap over
images). Accuracies and changes are in **points** (percentage points, 0-100).

A detector's mAP against boxes: ``dmx.analysis.detection_accuracy``.

Views (``register_accuracy_views``): ``accuracy`` (per cell: n labelled, n judged, top-1 and
top-5) and ``accuracy_contrasts`` (each non-reference cell against the reference, paired over
the images both judged: n, accuracies, change with its 95% interval, right->wrong,
wrong->right, McNemar p, verdict; top-5 alike).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import duckdb
from .effects import Attribution, CellStat, attribute
from .paired import PairedAccuracy, interval_from_counts, mcnemar_exact_p, paired_from_counts
from .queries import load_sql, query_dicts

__all__ = ["ACCURACY_VIEWS", "CellAccuracy", "accuracy_by_cell", "correctness_shares",
           "has_labels", "register_accuracy_views"]

Rows = Callable[[str], list[dict[str, Any]]]   # a named query's rows (Summary.rows)


def has_labels(con: duckdb.DuckDBPyConnection) -> bool:
    """The rows carry correctness (``correct_top1``) and at least one image has a label."""
    cols = {r[0] for r in con.execute("DESCRIBE rows").fetchall()}
    if not {"label", "correct_top1", "correct_top5"} <= cols:
        return False
    return con.execute("SELECT count(label) > 0 FROM rows").fetchone()[0]


@dataclass(frozen=True)
class CellAccuracy:
    """One cell's accuracy (points) and, for a non-reference cell, its paired change against
    the reference (``top1``/``top5``: ``PairedAccuracy``; None for the reference)."""

    cell_id: str
    is_reference: bool
    n_labelled: int            # rows of labelled images
    n: int                     # judged: the cell produced an output for the labelled image
    top1_right: int
    top5_right: int
    top1_points: float | None
    top5_points: float | None
    top1: PairedAccuracy | None = None
    top5: PairedAccuracy | None = None
    n_unpaired: int = 0        # labelled images the reference judged and this cell did not


def accuracy_by_cell(rows: Rows) -> dict[str, CellAccuracy]:
    """Every cell's accuracy and paired change, from the two named queries (``rows(name)``:
    ``Summary.rows`` or ``query_dicts`` over a run)."""
    pairs = {p["cell_id"]: p for p in rows("accuracy_pairs")}
    out = {}
    for c in rows("accuracy_cells"):
        p = pairs.get(c["cell_id"])
        t1 = t5 = None
        if p is not None and not c["is_reference"]:
            t1 = paired_from_counts(int(p["n"]), int(p["ref_right"]), int(p["right_to_wrong"]),
                                    int(p["wrong_to_right"]))
            t5 = paired_from_counts(int(p["n_top5"]), int(p["ref_right_top5"]),
                                    int(p["right_to_wrong_top5"]), int(p["wrong_to_right_top5"]))
        out[c["cell_id"]] = CellAccuracy(
            cell_id=c["cell_id"], is_reference=bool(c["is_reference"]),
            n_labelled=int(c["n_labelled"]), n=int(c["n"]), top1_right=int(c["top1_right"]),
            top5_right=int(c["top5_right"]), top1_points=c["top1"], top5_points=c["top5"],
            top1=t1, top5=t5, n_unpaired=int(p["n_unpaired"]) if p else 0)
    return out


def correctness_shares(acc: Mapping[str, CellAccuracy], cells: Sequence[dict[str, Any]],
                       axes: Sequence[str], reference: Mapping[str, Any] | None = None
                       ) -> Attribution:
    """Type-II shares per factor of the variance of top-1 correctness (1 right, 0 wrong, over
    the judged labelled rows), as ``dmx.analysis.effects`` does for divergence: a cell's mean is
    its accuracy k/n, its within-cell sum of squares k - k^2/n."""
    levels = {c["cell_id"]: c for c in cells}
    stats = [CellStat({a: levels[cid][a] for a in axes}, a.n, a.top1_right / a.n,
                      a.top1_right - a.top1_right ** 2 / a.n)
             for cid, a in acc.items() if cid in levels and a.n > 0]
    return attribute(stats, axes, reference)


def _ci(side: int) -> Callable[[int, int, int], float | None]:
    """One bound of the paired 95% interval (points) as a SQL function of (n, rw, wr)."""
    def bound(n: int, rw: int, wr: int) -> float | None:
        return interval_from_counts(n, rw, wr)[side] if n else None
    return bound


def _mcnemar(rw: int, wr: int) -> float:
    return mcnemar_exact_p(rw, wr)


ACCURACY_VIEWS = ("accuracy", "accuracy_contrasts")


def register_accuracy_views(con: duckdb.DuckDBPyConnection, run: Any = None) -> bool:
    """Define the ``accuracy`` and ``accuracy_contrasts`` views over an open run (``db.open_run``):
    plain SQL over ``rows`` and ``cells``, computed when queried (defining them reads nothing).
    The interval and p-value are SQL functions of a cell's counts (``dmx_ci_low``,
    ``dmx_ci_high``, ``dmx_mcnemar_p``). False, and no view, when the rows have no
    ground-truth columns (runs written before them).

    Given the ``run`` (a ``RunDir`` or path) whose directory holds a detector's ground truth,
    the detection views (``dmx.analysis.detection_accuracy``: ``detection_accuracy``,
    ``detection_matches``) are defined too; they are computed at once (COCOeval and the
    bootstrap, once per process), not when queried."""
    if run is not None:
        from .detection_accuracy import register_detection_accuracy
        register_detection_accuracy(con, run)
    cols = {r[0] for r in con.execute("DESCRIBE rows").fetchall()}
    if not {"label", "correct_top1", "correct_top5"} <= cols:
        return False
    have = {r[0] for r in con.execute("SELECT function_name FROM duckdb_functions() WHERE "
                                      "function_name LIKE 'dmx_%'").fetchall()}
    big, dbl = duckdb.sqltype("BIGINT"), duckdb.sqltype("DOUBLE")
    for name, fn, args in (("dmx_ci_low", _ci(0), [big, big, big]),
                           ("dmx_ci_high", _ci(1), [big, big, big]),
                           ("dmx_mcnemar_p", _mcnemar, [big, big])):
        if name not in have:
            con.create_function(name, fn, args, dbl)
    con.execute("CREATE OR REPLACE VIEW accuracy_cells_counts AS " + load_sql("accuracy_cells"))
    con.execute("CREATE OR REPLACE VIEW accuracy_pairs_counts AS " + load_sql("accuracy_pairs"))
    for view in ACCURACY_VIEWS:
        con.execute(f"CREATE OR REPLACE VIEW {view} AS " + load_sql(view))
    return True
