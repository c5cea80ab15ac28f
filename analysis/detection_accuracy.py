"""A detector's accuracy against its ground truth, per cell and per cell against the reference.

The ground truth is the run's own (``labels_boxes.parquet`` and ``labels_images.parquet``,
written by ``dmx run`` from ``dataset.labels``), never the spec's file. Per cell: COCO
mAP@[.5:.95] and mAP@.5 in **points** over the images it judged (``COCOeval`` through
``dmx.analysis.paired_map``), the per-image true positives, false positives and missed boxes at
IoU 0.5 (``image_matches``, equal to COCOeval's own), and for each non-reference cell the change
against the reference over the images both judged, with a paired bootstrap interval over images
(``paired_from_evals``: the same draws for both sides).

Cost: one ``COCOeval.evaluate`` per cell (the reference's serves every cell judged on the same
images), then ``resamples`` accumulations per non-reference cell and side; see
``dmx.analysis.paired_map`` for measured times (200 resamples of 1,000 images ~1 min per cell
on 2 cores). Results are kept beside the run (``RUN/summary/detection_accuracy*``, keyed like
explain's summary by the row files, the ground truth, the resamples, the seed and this code), so
explain, check, report and sql pay once per run, not once per command; a run directory that
cannot be written to is computed again by each command.

Views (``register_detection_accuracy``): ``detection_accuracy`` (one row per cell) and
``detection_matches`` (one row per cell and image), plus ``detection_truth`` (the boxes, in
pixels) and ``detection_truth_images``.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from dmx.results.store import RunDir

from .paired_map import Boxes, PairedMap, coco_eval, image_matches, paired_from_evals, _summary
from .queries import load_sql

__all__ = ["BOX_IMAGES_FILE", "BOXES_FILE", "DEFAULT_RESAMPLES", "DETECTION_VIEWS",
           "CellMap", "detection_accuracy", "has_detection_labels", "register_detection_accuracy"]

# The names dmx.runner.labels writes (analysis imports nothing from runner; a test keeps them equal).
BOXES_FILE, BOX_IMAGES_FILE = "labels_boxes.parquet", "labels_images.parquet"
DEFAULT_RESAMPLES = 200
DETECTION_VIEWS = ("detection_accuracy", "detection_matches", "detection_truth",
                   "detection_truth_images")


@dataclass(frozen=True)
class CellMap:
    """One cell's COCO metrics (points) over the ``n`` labelled images it judged, its matches at
    IoU 0.5 summed over them, and for a non-reference cell the paired change against the
    reference over the ``n_paired`` images both judged (None for the reference)."""

    cell_id: str
    is_reference: bool
    n: int
    map: float
    map50: float
    tp: int
    fp: int
    fn: int
    n_paired: int = 0
    map_ref: float | None = None
    delta: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    map50_ref: float | None = None
    delta50: float | None = None
    ci50_low: float | None = None
    ci50_high: float | None = None
    resamples: int = 0
    level: float = 0.95

    @property
    def indistinguishable(self) -> bool:
        """The change's interval holds 0: at this n it cannot be told from no change."""
        return self.ci_low is not None and self.ci_low <= 0 <= self.ci_high

    def text(self) -> str:
        """``mAP -3.1 pts [-4.0, -2.2] (n=500)`` (and mAP@.5's change)."""
        if self.delta is None:
            return f"mAP {self.map:.1f} (n={self.n})"
        return (f"mAP {self.delta:+.1f} pts [{self.ci_low:+.1f}, {self.ci_high:+.1f}] "
                f"(n={self.n_paired}; {self.map_ref:.1f} -> {self.map_ref + self.delta:.1f}; "
                f"mAP@.5 {self.delta50:+.1f} [{self.ci50_low:+.1f}, {self.ci50_high:+.1f}])")


def has_detection_labels(run: str | Path | RunDir) -> bool:
    """The run directory holds a detector's ground truth (``dmx run`` with ``dataset.labels``)."""
    run = run if isinstance(run, RunDir) else RunDir(run)
    return run.is_file(BOXES_FILE) and run.is_file(BOX_IMAGES_FILE)


_memo: dict[tuple, tuple[dict[str, CellMap], pa.Table]] = {}
CACHE = "summary/detection_accuracy"      # .parquet (cells), -matches.parquet, .json (the key)


def _cache_key(run: RunDir, resamples: int, seed: int) -> dict[str, Any]:
    """What a stored result describes: the rows (explain's summary key), the ground truth files,
    the bootstrap's parameters and the code and queries that computed it."""
    import hashlib

    from . import paired_map
    code = hashlib.sha256()
    for source in (paired_map.__file__, __file__):
        code.update(Path(source).read_bytes())
    for name in ("detection_truth", "detection_truth_images", "detection_cell_boxes",
                 "detection_cell_images"):
        code.update(load_sql(name).encode())
    truth = run.fs.get_file_info([run.path(BOXES_FILE), run.path(BOX_IMAGES_FILE)])
    return {"rows": run.files_key(), "truth": [i.size for i in truth], "resamples": resamples,
            "seed": seed, "code": code.hexdigest()}


def _stored(run: RunDir, key: dict[str, Any]) -> tuple[dict[str, CellMap], pa.Table] | None:
    import json
    try:
        if json.loads(run.read_bytes(CACHE + ".json").decode()) != key:
            return None
        cells = run.read_parquet(CACHE + ".parquet").to_pylist()
        matches = run.read_parquet(CACHE + "-matches.parquet")
    except (OSError, ValueError, pa.ArrowInvalid):
        return None
    return {c["cell_id"]: CellMap(**c) for c in cells}, matches


def _store(run: RunDir, key: dict[str, Any], cells: dict[str, CellMap], matches: pa.Table) -> None:
    import json
    try:
        if run.is_file(CACHE + ".json"):
            run.delete([run.path(CACHE + ".json")])     # no key while its tables are replaced
        run.write_parquet(CACHE + ".parquet", _cell_table(cells))
        run.write_parquet(CACHE + "-matches.parquet", matches)
        run.write_bytes(CACHE + ".json", json.dumps(key).encode())   # the commit point
    except OSError:
        pass            # a run directory dmx may not write to: each command computes it again


def _cell_table(cells: dict[str, CellMap]) -> pa.Table:
    return pa.Table.from_pylist([asdict(c) for c in cells.values()], schema=_CELL_SCHEMA)


def register_detection_accuracy(con: duckdb.DuckDBPyConnection, run: str | Path | RunDir, *,
                                resamples: int = DEFAULT_RESAMPLES, seed: int = 0
                                ) -> dict[str, CellMap] | None:
    """Define the detection views over an open run (``db.open_run``) and return each cell's
    ``CellMap``; None, and no view, when the run has no detection ground truth."""
    run = run if isinstance(run, RunDir) else RunDir(run)
    if not has_detection_labels(run):
        return None
    con.register("_dmx_labels_boxes", run.read_parquet(BOXES_FILE))
    con.register("_dmx_labels_images", run.read_parquet(BOX_IMAGES_FILE))
    con.execute("CREATE OR REPLACE VIEW detection_truth_images AS "
                + load_sql("detection_truth_images"))
    con.execute("CREATE OR REPLACE VIEW detection_truth AS " + load_sql("detection_truth"))
    manifest = run.read_manifest()
    memo = (run.uri, manifest.get("run_id"), manifest.get("finished"), resamples, seed)
    if memo not in _memo:
        key = _cache_key(run, resamples, seed)
        found = _stored(run, key)
        if found is None:
            found = detection_accuracy(con, resamples=resamples, seed=seed)
            _store(run, key, *found)
        _memo[memo] = found
    cells, matches = _memo[memo]
    con.register("_dmx_detection_accuracy", _cell_table(cells))
    con.register("_dmx_detection_matches", matches)
    con.execute("CREATE OR REPLACE VIEW detection_accuracy AS SELECT c.label AS cell, d.* "
                "FROM _dmx_detection_accuracy d JOIN cells c USING (cell_id) ORDER BY d.delta, d.cell_id")
    con.execute("CREATE OR REPLACE VIEW detection_matches AS SELECT * FROM _dmx_detection_matches")
    return cells


def _arrow(t: type | str) -> pa.DataType:
    t = str(t)
    return (pa.string() if t.startswith("str") else pa.bool_() if t.startswith("bool")
            else pa.int64() if t.startswith("int") else pa.float64())


_CELL_SCHEMA = pa.schema([(f.name, _arrow(f.type)) for f in fields(CellMap)])


def _boxes(d: dict[str, np.ndarray], sel: np.ndarray, remap: np.ndarray, truth: bool) -> Boxes:
    return Boxes(image=remap[d["img"][sel].astype(np.int64)], xyxy=np.c_[d["x1"][sel], d["y1"][sel], d["x2"][sel],
                                                        d["y2"][sel]].astype(np.float64),
                 cls=d["label_index" if truth else "cls"][sel].astype(np.int64),
                 score=None if truth else d["score"][sel].astype(np.float64),
                 iscrowd=d["iscrowd"][sel].astype(bool) if truth else None,
                 area=d["area"][sel].astype(np.float64) if truth else None)


class _Images:
    """Ground truth and one cell's boxes restricted to a subset of the images, renumbered."""

    def __init__(self, gt: dict[str, np.ndarray], n_all: int) -> None:
        self.gt, self.n_all = gt, n_all

    def restrict(self, imgs: np.ndarray, d: dict[str, np.ndarray], truth: bool) -> Boxes:
        remap = np.full(self.n_all, -1, np.int64)
        remap[imgs] = np.arange(len(imgs))
        sel = remap[d["img"].astype(np.int64)] >= 0
        return _boxes(d, sel, remap, truth)


def detection_accuracy(con: duckdb.DuckDBPyConnection, *, resamples: int = DEFAULT_RESAMPLES,
                       seed: int = 0) -> tuple[dict[str, CellMap], pa.Table]:
    """Every cell's ``CellMap`` and the per-image matches table (cell_id, image_id, tp, fp, fn)
    from a connection with ``detection_truth`` and ``detection_truth_images`` defined."""
    ids = [r[0] for r in con.execute("SELECT image_id FROM detection_truth_images ORDER BY img").fetchall()]
    gt = con.execute(load_sql("detection_truth")).fetchnumpy()
    dets = con.execute(load_sql("detection_cell_boxes")).fetchnumpy()
    judged = con.execute(load_sql("detection_cell_images")).fetchall()
    space = _Images(gt, len(ids))
    cell_of = np.asarray(dets["cell_id"], dtype=object)
    ref_row = next((j for j in judged if j[1]), None)
    ref_imgs = np.asarray(ref_row[2] if ref_row else [], np.int64)
    ref_dets = {k: v[cell_of == ref_row[0]] for k, v in dets.items()} if ref_row else None
    evals: dict[tuple, Any] = {}

    def evaluate(cell: str, d: dict[str, np.ndarray], imgs: np.ndarray):
        k = (cell, imgs.tobytes())
        if k not in evals:
            evals[k] = coco_eval(space.restrict(imgs, gt, True), space.restrict(imgs, d, False),
                                 len(imgs))
        return evals[k]

    cells: dict[str, CellMap] = {}
    match_cols: dict[str, list] = {"cell_id": [], "image_id": [], "tp": [], "fp": [], "fn": []}
    for cell_id, is_ref, imgs in judged:
        imgs = np.asarray(imgs, np.int64)
        d = ref_dets if is_ref else {k: v[cell_of == cell_id] for k, v in dets.items()}
        g, b = space.restrict(imgs, gt, True), space.restrict(imgs, d, False)
        m = image_matches(g, b, len(imgs))
        match_cols["cell_id"] += [cell_id] * len(imgs)
        match_cols["image_id"] += [ids[i] for i in imgs]
        for name in ("tp", "fp", "fn"):
            match_cols[name].append(getattr(m, name))
        own = _summary(copy.copy(evaluate(cell_id, d, imgs)))
        base = dict(cell_id=cell_id, is_reference=bool(is_ref), n=len(imgs), map=float(own.map),
                    map50=float(own.map50), tp=int(m.tp.sum()), fp=int(m.fp.sum()), fn=int(m.fn.sum()))
        if is_ref or ref_dets is None:
            cells[cell_id] = CellMap(**base)
            continue
        both = np.intersect1d(imgs, ref_imgs)
        if not len(both):
            cells[cell_id] = CellMap(**base)
            continue
        p: PairedMap = paired_from_evals(evaluate(cell_id, d, both), evaluate(ref_row[0], ref_dets, both),
                                         len(both), resamples=resamples, seed=seed)
        cells[cell_id] = CellMap(**base, n_paired=p.n, resamples=p.resamples, level=p.level,
                                 **{k: float(getattr(p, k)) for k in (
                                     "map_ref", "delta", "ci_low", "ci_high", "map50_ref",
                                     "delta50", "ci50_low", "ci50_high")})
    matches = pa.table({"cell_id": pa.array(match_cols["cell_id"], pa.string()),
                        "image_id": pa.array(match_cols["image_id"], pa.string()),
                        **{k: pa.array(np.concatenate(match_cols[k]) if match_cols[k]
                                       else np.zeros(0, np.int64), pa.int64())
                           for k in ("tp", "fp", "fn")}})
    return cells, matches
