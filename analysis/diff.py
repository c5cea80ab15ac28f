"""``dmx diff``: the same spec run twice (two machines, two library versions): what moved?

Rows are joined on (cell_id, image_id); cell ids hash a cell's factors, so they are stable across
runs of one spec. Per cell: mean and max |delta| of ``out_max_abs`` (logits) and of the cosine
distance to the reference, the top-1 agreement with the reference in each run, images whose top-1
class itself changed between the runs, the largest |delta| of the top-1 probability (the only
number that moves when the *reference* cell's own output moves, since its divergences are 0 by
construction), rows present in one run only, and rows whose status changed. Beside that, the
environment differences (packages, CPU ISA flags, libjpeg builds, backend precisions).

A cell has *moved* when any row is in one run only, changed status or top-1 class, or a delta
exceeds its tolerance: ``max_abs`` 1e-5 logits (torch.testing's fp32 atol), ``cos_dist`` 1e-6,
``top1_prob`` 1e-5 - or, where both runs' rows carry ``out_digest`` (sha256 of the output
tensor's bytes), when an image's output itself differs bit for bit. Only the digest sees a change
that moves every cell and the reference alike (a torch or Pillow upgrade) for every task: each
cell's divergence from its own reference stays the same, and detectors and tensor models have no
top-1 probability. Runs without the column are diffed as before, and the text says so.

Threads: the local executor gives a backend every core, a Ray worker one thread; another thread
count changes the order of floating-point reductions, so outputs move by rounding alone. A cell
whose rows ran with other threads (``threads_used``) and whose only change is such a numeric
delta is listed apart as *threads only*, not as moved; a status, top-1 or row change still moves
it, with the thread counts named.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import duckdb

from dmx.results.store import RunDir

from .db import load_sql, open_run
from .numbers import g, pct
from .queries import cell_passes, query_dicts
from .summary import Summary

DEFAULT_DIFF_TOLERANCES = {"max_abs": 1e-5, "cos_dist": 1e-6, "top1_prob": 1e-5}


class DiffError(ValueError):
    """The diff cannot be made as asked (unknown tolerance key)."""


@dataclass(frozen=True)
class CellDiff:
    """How one cell's rows moved from run A to run B (deltas are |B - A|)."""

    cell_id: str
    label: str
    rows_a: int
    rows_b: int
    only_a: int
    only_b: int
    status_changed: int
    compared: int
    max_abs_delta_mean: float | None
    max_abs_delta_max: float | None
    max_abs_image: str | None
    cos_delta_mean: float | None
    cos_delta_max: float | None
    top1_prob_delta_max: float | None
    top1_agree_a: float | None
    top1_agree_b: float | None
    top1_changed: int
    top1_image: str | None
    is_reference: bool
    reasons: tuple[str, ...]
    threads_a: int | None = None
    threads_b: int | None = None
    threads_only: bool = False      # numeric deltas only, and the thread counts differ
    outputs_compared: int = 0       # images whose out_digest both runs have
    outputs_changed: int = 0        # ... and differ bit for bit
    output_image: str | None = None

    @property
    def moved(self) -> bool:
        return bool(self.reasons) and not self.threads_only


@dataclass(frozen=True)
class EnvDiff:
    """One environment entry that differs: ``section`` (packages, cpu, libjpeg, ...), its key."""

    section: str
    key: str
    a: Any
    b: Any


@dataclass
class DiffResult:
    run_a: dict[str, Any]
    run_b: dict[str, Any]
    same_spec: bool
    tolerances: dict[str, float]
    cells: list[CellDiff]
    environment: list[EnvDiff]
    cell_status: list[dict[str, Any]] = field(default_factory=list)
    outputs_compared: bool = False  # both runs' rows carry out_digest
    digest_missing: tuple[str, ...] = ()   # the runs ("A", "B") whose rows carry no out_digest

    @property
    def outputs_changed(self) -> list[CellDiff]:
        """Cells whose outputs differ bit for bit between the runs."""
        return [c for c in self.cells if c.outputs_changed]

    @property
    def moved(self) -> list[CellDiff]:
        return sorted((c for c in self.cells if c.moved), key=_move_key)

    @property
    def threads_only(self) -> list[CellDiff]:
        """Cells whose rows moved numerically only while their thread counts differ."""
        return sorted((c for c in self.cells if c.threads_only), key=_move_key)

    def to_json(self) -> dict[str, Any]:
        return {"run_a": self.run_a, "run_b": self.run_b, "same_spec": self.same_spec,
                "tolerances": self.tolerances, "cells_compared": len(self.cells),
                "cells_moved": len(self.moved), "outputs_compared": self.outputs_compared,
                "cells_outputs_changed": len(self.outputs_changed),
                "moved": [_json_safe(asdict(c) | {"reasons": list(c.reasons)}) for c in self.moved],
                "threads_only": [_json_safe(asdict(c) | {"reasons": list(c.reasons)})
                                 for c in self.threads_only],
                "environment": [asdict(e) for e in self.environment],
                "cell_status": self.cell_status}


def _json_safe(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def _move_key(c: CellDiff) -> tuple:
    big = lambda v: -(v if v is not None and not math.isnan(v) else math.inf)  # noqa: E731
    return (not c.is_reference, -(c.only_a + c.only_b + c.status_changed + c.top1_changed),
            big(c.max_abs_delta_max), c.label)


def diff_runs(dir_a: str | Path, dir_b: str | Path,
              tolerances: Mapping[str, float] | None = None) -> DiffResult:
    """Compare run B against run A, per cell and per environment entry."""
    tol = dict(DEFAULT_DIFF_TOLERANCES)
    for k, v in (tolerances or {}).items():
        if k not in tol:
            raise DiffError(f"diff: unknown tolerance {k!r} (known: {', '.join(tol)})")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
            raise DiffError(f"diff: tolerance {k} must be a number >= 0, not {v!r}")
        tol[k] = float(v)
    ma, mb = RunDir(dir_a).read_manifest(), RunDir(dir_b).read_manifest()
    con_a, con_b = open_run(dir_a), open_run(dir_b)
    missing = tuple(side for side, c in (("A", con_a), ("B", con_b)) if "out_digest" not in _columns(c))
    refs = {ma.get("reference_cell"), mb.get("reference_cell")}
    same = _same_cells(Summary(con_a, RunDir(dir_a)), Summary(con_b, RunDir(dir_b)))
    found = sorted([*same.values(), *_diff_cells(con_a, con_b, set(same))], key=lambda d: d["cell_id"])
    cells = [_cell_diff(d, tol, d["cell_id"] in refs) for d in found]
    return DiffResult(
        run_a=_run_info(dir_a, ma), run_b=_run_info(dir_b, mb),
        same_spec=ma.get("spec_digest") == mb.get("spec_digest"), tolerances=tol, cells=cells,
        environment=environment_diff(ma, mb), cell_status=_cell_status_changes(con_a, con_b),
        outputs_compared=not missing, digest_missing=missing)


def _same_cells(a: Summary, b: Summary) -> dict[str, dict[str, Any]]:
    """Cells whose rows are the same in both runs, by the digests the runs' summaries keep
    (``diff_self.sql``), with what diff_cells.sql says of them: they need no join."""
    ta, tb = a.table("diff_self"), b.table("diff_self")
    if ta is None or tb is None:
        return {}
    digests = {d["cell_id"]: (d["n"], d["digest"]) for d in tb.to_pylist()}
    return {d["cell_id"]: {k: v for k, v in d.items() if k not in ("n", "digest")}
            for d in ta.to_pylist() if digests.get(d["cell_id"]) == (d["n"], d["digest"])}


def _diff_cells(con_a: duckdb.DuckDBPyConnection, con_b: duckdb.DuckDBPyConnection,
                skip: set[str] = frozenset()) -> list[dict[str, Any]]:
    """diff_cells.sql over both runs' rows of the cells not in ``skip``, one pass of cells at a
    time: each pass holds about half of ``ROWS_PER_PASS`` rows of each run in memory (both runs
    whole did not fit: 64 M rows each were killed at 24 GB)."""
    from . import queries
    cells = sorted({r[0] for c in (con_a, con_b)
                    for r in c.execute("SELECT cell_id FROM cells").fetchall()} - skip)
    if not cells:
        return []
    passes = cell_passes(cells, con_a, con_b, rows_per_pass=queries.ROWS_PER_PASS // 2)
    sql_a, sql_b, joined = _diff_rows_sql(con_a), _diff_rows_sql(con_b), load_sql("diff_cells")
    con = duckdb.connect()
    out: list[dict[str, Any]] = []
    for part in passes:
        con.register("a_rows", con_a.sql(sql_a, params={"cells": part}).to_arrow_table())
        con.register("b_rows", con_b.sql(sql_b, params={"cells": part}).to_arrow_table())
        out += query_dicts(con, joined)
        con.unregister("a_rows")
        con.unregister("b_rows")
    return out


def _columns(con: duckdb.DuckDBPyConnection) -> set[str]:
    return {r[0] for r in con.execute("DESCRIBE rows").fetchall()}


def _diff_rows_sql(con: duckdb.DuckDBPyConnection) -> str:
    """diff_rows.sql; a run written before rows recorded threads (or output digests) reads them
    as null."""
    sql = load_sql("diff_rows")
    columns = _columns(con)
    if "threads_used" not in columns:
        sql = sql.replace("r.threads_used", "NULL::INTEGER AS threads_used")
    if "out_digest" not in columns:
        sql = sql.replace("r.out_digest", "NULL::VARCHAR AS out_digest")
    return sql


def _run_info(path: str | Path, m: dict[str, Any]) -> dict[str, Any]:
    return {"path": str(path), "run_id": m.get("run_id"), "spec": m.get("spec", {}).get("name"),
            "spec_digest": m.get("spec_digest"), "started": m.get("started"),
            "hostname": m.get("environment", {}).get("hostname")}


def _cell_diff(d: dict[str, Any], tol: dict[str, float], is_reference: bool) -> CellDiff:
    reasons = []
    structural = bool(d["only_a"] or d["only_b"] or d["status_changed"] or d["top1_changed"])
    if d["only_a"] or d["only_b"]:
        reasons.append(f"rows in one run only (A {d['only_a']}, B {d['only_b']})")
    if d["status_changed"]:
        reasons.append(f"{d['status_changed']} row(s) changed status")
    if d["top1_changed"]:
        reasons.append(f"top-1 class changed on {d['top1_changed']} image(s), e.g. {d['top1_image']}")
    if d.get("outputs_changed"):   # numeric, not structural: another thread count changes bits too
        reasons.append(f"output changed bit for bit on {d['outputs_changed']} of "
                       f"{d['outputs_compared']} images (out_digest), e.g. {d['output_image']}")
    for key, value, what in (("max_abs", d["max_abs_delta_max"], "max abs"),
                             ("cos_dist", d["cos_delta_max"], "cosine distance"),
                             ("top1_prob", d["top1_prob_delta_max"], "top-1 probability")):
        if value is not None and (math.isnan(value) or value > tol[key]):
            reasons.append(f"{what} moved by up to {g(value)} (> {g(tol[key])})")
    threads_differ = (d.get("threads_a") is not None and d.get("threads_b") is not None
                      and d["threads_a"] != d["threads_b"])
    if threads_differ and reasons:
        reasons.append(f"threads differ (A {d['threads_a']}, B {d['threads_b']})")
    fields = {k: d[k] for k in CellDiff.__dataclass_fields__ if k in d}
    return CellDiff(**fields, is_reference=is_reference, reasons=tuple(reasons),
                    threads_only=threads_differ and bool(reasons) and not structural)


def _cell_status_changes(con_a: duckdb.DuckDBPyConnection,
                         con_b: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    """Cells whose status (ok / skipped / error) or skip reason differs, or that exist in one run."""
    q = "SELECT cell_id, label, status, skip_reason FROM cells"
    a = {d["cell_id"]: d for d in query_dicts(con_a, q)}
    b = {d["cell_id"]: d for d in query_dicts(con_b, q)}
    out = []
    for cid in sorted(a.keys() | b.keys()):
        x, y = a.get(cid), b.get(cid)
        if x is None or y is None or (x["status"], x["skip_reason"]) != (y["status"], y["skip_reason"]):
            out.append({"cell_id": cid, "label": (x or y)["label"], "a": _status(x), "b": _status(y)})
    return out


def _status(cell: dict[str, Any] | None) -> str:
    if cell is None:
        return "absent"
    return cell["status"] + (f": {cell['skip_reason']}" if cell["skip_reason"] else "")


def environment_diff(ma: dict[str, Any], mb: dict[str, Any]) -> list[EnvDiff]:
    """Entries of the two manifests' environments (and backends' read-back precision and
    version) that differ."""
    ea, eb = ma.get("environment", {}), mb.get("environment", {})
    out: list[EnvDiff] = []
    for section, xa, xb in (
            ("python", {"version": ea.get("python")}, {"version": eb.get("python")}),
            ("platform", {"platform": ea.get("platform")}, {"platform": eb.get("platform")}),
            ("packages", ea.get("packages", {}), eb.get("packages", {})),
            ("cpu", {k: v for k, v in ea.get("cpu", {}).items() if k != "isa"},
             {k: v for k, v in eb.get("cpu", {}).items() if k != "isa"}),
            ("cpu isa", ea.get("cpu", {}).get("isa", {}), eb.get("cpu", {}).get("isa", {})),
            ("libjpeg", ea.get("libjpeg", {}), eb.get("libjpeg", {})),
            ("executor", {k: v for k, v in (ma.get("executor") or {}).items() if k in ("name", "threads")},
             {k: v for k, v in (mb.get("executor") or {}).items() if k in ("name", "threads")}),
            ("backend", _backends(ma), _backends(mb))):
        for key in sorted(set(xa) | set(xb)):
            if xa.get(key) != xb.get(key):
                out.append(EnvDiff(section, key, xa.get(key), xb.get(key)))
    return out


def _backends(m: dict[str, Any]) -> dict[str, str]:
    """Per inference setting: the version and the precision the backend actually ran."""
    return {setting: f"{info.get('version')} ran {info.get('precision_effective')}"
            for setting, info in (m.get("backends") or {}).items() if isinstance(info, dict)}


def render_diff_text(d: DiffResult, limit: int = 30) -> str:
    """What moved, for a terminal: environment first (the likely cause), then the cells."""
    a, b = d.run_a, d.run_b
    moved = d.moved
    out = [f"dmx diff - A {a['run_id']} ({a['path']}) vs B {b['run_id']} ({b['path']}): "
           f"{len(moved)} of {len(d.cells)} cells moved"]
    changed = d.outputs_changed
    ref = next((c for c in changed if c.is_reference), None)
    if ref is not None:
        every = "every cell" if len(changed) == len(d.cells) else f"{len(changed)} of {len(d.cells)} cells"
        out.append(f"  outputs changed bit for bit in {every}, the reference included ({ref.outputs_changed} "
                   f"of {ref.outputs_compared} images): the runs compute differently (model, library "
                   "or platform), which each cell's divergence from its own reference does not show")
    elif changed:
        out.append(f"  outputs changed bit for bit in {len(changed)} of {len(d.cells)} cells "
                   "(the reference's did not)")
    if d.digest_missing:
        out.append(f"  note: outputs not compared bit for bit (the rows of run {' and '.join(d.digest_missing)} "
                   "carry no out_digest): a change that moves the reference too is seen only through "
                   "top-1 for classifiers, not at all for detection and tensor models")
    if not d.same_spec:
        out.append(f"  note: different specs (digest {a['spec_digest']} vs {b['spec_digest']}); "
                   "only cells with the same factors are compared")
    if d.environment:
        out.append("Environment differences (A -> B):")
        width = max(len(f"{e.section} {e.key}") for e in d.environment)
        for e in d.environment:
            out.append(f"  {e.section + ' ' + e.key:<{width}}  {_short(e.a)} -> {_short(e.b)}")
    else:
        out.append("Environment: identical (packages, CPU, libjpeg, backends)")
    for s in d.cell_status:
        out.append(f"  cell {s['label']}: {s['a']} -> {s['b']}")
    quiet = d.threads_only
    if quiet:
        pairs = sorted({(c.threads_a, c.threads_b) for c in quiet}, key=str)
        out.append(f"{len(quiet)} cell(s) differ by rounding only, and ran with other threads "
                   f"({', '.join(f'A {a} -> B {b}' for a, b in pairs)}): another thread count "
                   "reorders floating-point sums; not counted as moved (largest d max abs "
                   f"{g(max((c.max_abs_delta_max or 0.0) for c in quiet))})")
    if moved:
        out.append("Cells that moved (|B - A| per image, max abs in logits; top-1 agreement is with "
                   "each run's reference):")
        for c in moved[:limit]:
            out.append(f"  {'[reference] ' if c.is_reference else ''}{c.label}  ({c.cell_id})")
            out.append(f"      {'; '.join(c.reasons)}")
            out.append(f"      d max abs mean {g(c.max_abs_delta_mean)}, max {g(c.max_abs_delta_max)} "
                       f"({c.max_abs_image or '-'}) | d cos dist max {g(c.cos_delta_max)} | top-1 "
                       f"agreement {pct(c.top1_agree_a)} -> {pct(c.top1_agree_b)} | "
                       f"{c.compared} images compared")
        if len(moved) > limit:
            out.append(f"  ... and {len(moved) - limit} more (--json lists all)")
    else:
        out.append(f"No cell moved beyond max abs {g(d.tolerances['max_abs'])}, cosine distance "
                   f"{g(d.tolerances['cos_dist'])}, top-1 probability {g(d.tolerances['top1_prob'])}.")
    return "\n".join(out)


def _short(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v, default=str)
    return s if len(s) <= 40 else s[:37] + "..."
