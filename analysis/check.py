"""The CI gate: does every cell of a run stay within tolerance of the reference cell?

What is judged, per non-reference cell whose status is ``ok`` (rows of the reference cell
are never judged; skipped cells are listed, not failed):

- ``precision``: the cell ran at the precision it asked for, or a more precise one. An OpenVINO
  cell that asked fp32 and ran bf16 (the CPU plugin's default on avx512_bf16/AMX machines)
  fails here. ``allow_lower_precision: true`` turns this off.
- ``max_rel_l2``: worst per-image ``out_rel_l2 = ||out - ref|| / ||ref||``. The default depends on
  the precision the cell *effectively* ran at: ``10 x rtol`` of torch.testing's table, fp32 1.3e-6
  -> 1.3e-5, fp16 1e-3 -> 1e-2, bf16 1.6e-2 -> 1.6e-1; tf32 (10-bit mantissa, not in the table)
  is given fp16's rtol; int8 gets no default. Why relative L2 rather than torch.testing's
  elementwise ``|out - ref| <= atol + rtol * |ref|``: rows carry only summaries, not the logits,
  so the elementwise test cannot be evaluated, and ``|ref|`` cannot be recovered from them. The
  norm-wise form ``||out - ref|| <= rtol * ||ref||`` is what the elementwise test implies (up to
  the atol term, negligible next to the norm of a logit vector) and is scale-free. The factor
  10 allows for a whole forward pass rather than one op (measured here: ONNX Runtime and
  OpenVINO-f32 vs torch on MobileNetV2 reach 1.6e-6, above fp32's per-op 1.3e-6).
- ``min_cosine``: worst per-image cosine similarity of the logits; default 0.999 for floating
  point precisions, none for int8.
- ``min_top1_agreement``: share of images whose top-1 class equals the reference's; default 1.0.
- ``max_abs``: worst per-image max abs difference, in output units (logits). No default: a
  tolerance in logits depends on the model's logit scale, which the rows do not carry.
- ``errors``: a row that fails (decode, preprocess, infer) on an image the reference cell
  handled is a failure. ``allow_errors: true`` turns this off.
- ``max_reference_errors``: how many images the reference cell itself may fail on (default 0).
  Where the reference failed, no other cell can be compared: those rows are ``ok`` but carry no
  metrics and are *not judged*. More reference failures than this fail the gate.
- ``batch_dependence``: the reuse guard re-infers sampled batches in another composition and
  size; a cell whose outputs then move by more than its ``max_rel_l2`` limit fails (a reused
  output would stand for an inference the cell does not reproduce).
- ``not_judged``: a gate never passes what it did not judge. A cell whose ok rows all lack
  metrics (every image it ran was one the reference failed on) fails; a cell with some such rows
  is reported with their count.

``scope``: ``all`` (default) judges every row: a resize or decoder change is a pipeline change,
and a gate on a pipeline must catch it. ``same-input`` judges only rows whose model input equals
the reference's bit for bit (``px_equal``), i.e. the numerics of backend and precision alone;
``errors`` and ``precision`` are judged in both scopes.

Tolerances come from, lowest priority first: these defaults, the spec's ``check:`` section
(stored in the manifest), the ``tolerances`` argument (the CLI's flags). A key set to ``null``
turns that check off.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import duckdb
import pyarrow as pa

from dmx.matrix.axes import AXES
from dmx.results.store import RunDir

from .db import load_sql, open_run
from .numbers import g, pct
from .queries import query_dicts
from .summary import Summary
from .tolerances import (DEFAULT_MIN_COSINE, DEFAULT_MIN_TOP1, MANTISSA_BITS, RTOL, TORCH_TESTING,
                         WHOLE_MODEL_ALLOWANCE, default_limits, precision_family, split_text)

__all__ = ["CheckError", "CheckResult", "Failure", "check_run", "default_limits", "describe_failure",
           "precision_family", "render_check_text", "resolve_tolerances", "DEFAULTS", "KEYS",
           "RTOL", "TORCH_TESTING", "WHOLE_MODEL_ALLOWANCE", "DEFAULT_MIN_COSINE", "MANTISSA_BITS"]


class CheckError(ValueError):
    """A tolerance cannot be used as given (unknown key, wrong type, unknown scope)."""


SCOPES = ("all", "same-input")
AUTO = "auto"

NUMBER_KEYS = ("max_abs", "max_rel_l2", "min_cosine", "min_top1_agreement")
FLAG_KEYS = ("allow_lower_precision", "allow_errors")
COUNT_KEYS = ("max_reference_errors",)
ACCURACY_KEY = "max_accuracy_drop"
KEYS = NUMBER_KEYS + FLAG_KEYS + COUNT_KEYS + ("scope", ACCURACY_KEY)
DEFAULTS: dict[str, Any] = {"max_abs": None, "max_rel_l2": AUTO, "min_cosine": AUTO,
                            "min_top1_agreement": DEFAULT_MIN_TOP1, "scope": "all",
                            "allow_lower_precision": False, "allow_errors": False,
                            "max_reference_errors": 0, ACCURACY_KEY: None}


def resolve_tolerances(*layers: Mapping[str, Any] | None) -> dict[str, Any]:
    """Merge tolerance layers (later wins) over ``DEFAULTS``; validates keys and values."""
    out = dict(DEFAULTS)
    for layer in layers:
        for key, value in (layer or {}).items():
            if key not in KEYS:
                raise CheckError(f"check: unknown tolerance {key!r} (known: {', '.join(KEYS)})")
            out[key] = _validate(key, value)
    return out


def _points(key: str, value: Any) -> float:
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value)
            or not 0 <= value <= 100):
        raise CheckError(f"check.{key}: must be a drop in top-1 points from 0 to 100, not {value!r}")
    return float(value)


def _validate(key: str, value: Any) -> Any:
    if key == ACCURACY_KEY:
        if value is None:
            return None
        if isinstance(value, dict):
            if not value:
                raise CheckError(f"check.{key}: give at least one selector, e.g. {{'*': 0.5}}")
            return {str(k): _points(f"{key}.{k}", v) for k, v in value.items()}
        return _points(key, value)
    if key == "scope":
        if value not in SCOPES:
            raise CheckError(f"check.scope: {value!r} is not one of {', '.join(SCOPES)}")
        return value
    if key in FLAG_KEYS:
        if not isinstance(value, bool):
            raise CheckError(f"check.{key}: must be true or false, not {value!r}")
        return value
    if key in COUNT_KEYS:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise CheckError(f"check.{key}: must be a whole number of images >= 0 or null, not {value!r}")
        return value
    if value is None or value == AUTO:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise CheckError(f"check.{key}: must be a number, 'auto' or null, not {value!r}")
    if value < 0 or (key in ("min_cosine", "min_top1_agreement") and value > 1):
        raise CheckError(f"check.{key}: {value} is out of range")
    return float(value)


@dataclass(frozen=True)
class Failure:
    """One cell breaking one tolerance, with the numbers seen."""

    cell_id: str
    cell: str
    check: str
    limit: float | str | None
    seen: float | str | None
    rows_bad: int
    rows: int
    image_id: str | None = None
    precision: str | None = None
    precision_effective: str | None = None
    note: str | None = None      # the whole verdict where numbers alone do not say it (accuracy)


@dataclass
class CheckResult:
    run_id: str
    spec_name: str
    tolerances: dict[str, Any]
    cells_judged: int
    failures: list[Failure]
    not_judged: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    limits_by_precision: dict[str, dict[str, float | None]] = field(default_factory=dict)
    images: int = 0
    reference_errors: dict[str, Any] = field(default_factory=dict)
    not_judged_rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    rows_judged: int = 0
    reuse_guard: dict[str, Any] = field(default_factory=dict)
    splits: dict[str, str] = field(default_factory=dict)   # label -> "ran bf16 on 10 and fp32 on 10 of 20 images"
    accuracy: list[dict[str, Any]] = field(default_factory=list)  # the accuracy gate per cell

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def failing_cells(self) -> list[str]:
        return list(dict.fromkeys(f.cell_id for f in self.failures))

    def to_json(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "spec": self.spec_name, "passed": self.passed,
                "tolerances": self.tolerances, "limits_by_precision": self.limits_by_precision,
                "cells_judged": self.cells_judged, "failing_cells": len(self.failing_cells),
                "failures": [_json_safe(asdict(f)) for f in self.failures],
                "not_judged": self.not_judged, "not_judged_rows": self.not_judged_rows,
                "rows_judged": self.rows_judged, "images": self.images,
                "reference_errors": self.reference_errors, "reuse_guard": self.reuse_guard,
                "precision_splits": self.splits, "skipped_cells": self.skipped,
                "accuracy": [_json_safe(a) for a in self.accuracy]}


def _json_safe(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def check_run(run_dir: str | Path, tolerances: Mapping[str, Any] | None = None,
              map_resamples: int | None = None) -> CheckResult:
    """Judge every non-reference ok cell of a run; ``tolerances`` overrides the spec's
    ``check:`` section, which overrides the defaults (see the module docstring).
    ``map_resamples``: the paired bootstrap's resamples for a detector's mAP change (default
    ``dmx.analysis.detection_accuracy.DEFAULT_RESAMPLES``)."""
    run = RunDir(run_dir)
    manifest = run.read_manifest()
    tol = resolve_tolerances(manifest.get("spec", {}).get("check"), tolerances)
    con = open_run(run_dir, require_complete=True)  # never judge (or pass) an incomplete run
    stored = Summary(con, run)      # the aggregates kept at compaction, when they fit these rows
    cells = query_dicts(con, "SELECT * FROM cells")
    parts = _parts(stored.rows("cell_precision"))
    effective = {cid: ps[0][0] for cid, ps in parts.items()}
    judged = [c for c in cells if not c["is_reference"] and c["status"] == "ok"]
    limits, used, failures = _limits(judged, parts, tol)
    splits = {c["label"]: split_text(parts[c["cell_id"]]) for c in judged
              if len(parts.get(c["cell_id"], [])) > 1}

    stats: dict[str, list[dict[str, Any]]] = {}
    for st in _stats(con, stored, limits, tol["scope"] == "same-input"):
        stats.setdefault(st["cell_id"], []).append(st)
    errors = {e["cell_id"]: e for e in stored.rows("check_new_errors")}
    unjudged = {d["cell_id"]: d for d in stored.rows("check_not_judged")}
    images = int(stored.rows("check_images")[0]["n"] or 0)
    ref_err = stored.rows("check_reference_errors")[0]
    ref_cell = next((c for c in cells if c["is_reference"]), None)
    ref_failed = int(ref_err["n"] or 0)
    limit_ref = tol["max_reference_errors"]
    if ref_cell is not None and limit_ref is not None and ref_failed > limit_ref:
        failures.append(Failure(ref_cell["cell_id"], ref_cell["label"], "reference_errors", limit_ref,
                                f"{ref_err['stage']}: {ref_err['example']}", ref_failed, images,
                                ref_err["image_id"]))
    batch_failures, reuse_guard = _batch_dependence(con, stored, cells, limits, tol)
    failures += batch_failures
    not_judged, not_judged_rows, rows_judged = [], {}, 0
    for c in judged:
        cid, label = c["cell_id"], c["label"]
        asked, eff = c.get("precision") or "fp32", effective.get(cid)
        if not tol["allow_errors"] and cid in errors:
            e = errors[cid]
            failures.append(Failure(cid, label, "errors", 0, f"{e['stage']}: {e['example']}",
                                    int(e["n"]), int(e["n"]), e["image_id"], asked, eff))
        u = unjudged.get(cid)
        if u and u["n"]:
            not_judged_rows[label] = {"cell_id": cid, "rows": int(u["n"]), "of": int(u["n_ok"]),
                                      "reference_failed": int(u["n_reference_failed"]),
                                      "image_id": u["image_id"]}
            if u["n"] == u["n_ok"]:  # every row this cell ran carries no metric: never a pass
                failures.append(Failure(cid, label, "not_judged", "judged rows", f"0 of {u['n_ok']}",
                                        int(u["n"]), int(u["n_ok"]), u["image_id"], asked, eff))
        measured = [s for s in stats.get(cid, []) if s["n"]]
        if not measured:
            not_judged.append(label)
            continue
        for s in measured:
            rows_judged += int(s["n"])
            failures += _limit_failures(c, s, limits[cid, s["precision_effective"]], tol)
    accuracy: list[dict[str, Any]] = []
    if tol[ACCURACY_KEY] is not None:
        task = (manifest.get("model") or {}).get("task")
        acc_failures, accuracy = (
            _map_gate(con, run_dir, cells, judged, tol[ACCURACY_KEY], map_resamples)
            if task == "detection" else _accuracy_gate(con, stored, cells, judged, tol[ACCURACY_KEY]))
        failures += acc_failures
    return CheckResult(
        run_id=manifest["run_id"], spec_name=manifest["spec"]["name"], tolerances=tol,
        cells_judged=len(judged), failures=failures, not_judged=not_judged, accuracy=accuracy,
        skipped={c["label"]: c["skip_reason"] for c in cells if c["status"] == "skipped"},
        limits_by_precision=used, images=images,
        reference_errors={"images": ref_failed, "limit": limit_ref, "stage": ref_err["stage"],
                          "example": ref_err["example"], "image_id": ref_err["image_id"]},
        not_judged_rows=not_judged_rows, rows_judged=rows_judged, reuse_guard=reuse_guard,
        splits=splits)


def drop_limit(limits: float | Mapping[str, float], cell: Mapping[str, Any],
               axes: list[str]) -> float | None:
    """The accuracy drop (points) a cell may show: a number is every cell's; in a mapping the
    most specific selector that matches the cell wins - its cell id, then ``axis=level`` pairs
    (more pairs first; the smaller limit on a tie), then ``*``. None: no selector applies."""
    if not isinstance(limits, Mapping):
        return float(limits)
    best: tuple[int, float] | None = None
    for selector, points in limits.items():
        rank = _selector_rank(selector, cell, axes)
        if rank is not None and (best is None or (rank, -points) > (best[0], -best[1])):
            best = (rank, points)
    return None if best is None else best[1]


def _selector_rank(selector: str, cell: Mapping[str, Any], axes: list[str]) -> int | None:
    """How specifically ``selector`` names ``cell`` (higher = more), None if it does not."""
    sel = selector.strip()
    if sel == "*":
        return 0
    if sel == cell["cell_id"]:
        return 10 ** 6
    pairs = [p.partition("=") for p in sel.split()]
    if not pairs or any(not eq for _, eq, _ in pairs):
        return None
    if all(a in axes and str(cell.get(a)) == v for a, _, v in pairs):
        return len(pairs)
    return None


def _check_selectors(limits: float | Mapping[str, float], cells: list[dict[str, Any]],
                     axes: list[str]) -> None:
    """A selector that names no cell is a typo, not a silent no-op."""
    if not isinstance(limits, Mapping):
        return
    for selector in limits:
        if not any(_selector_rank(selector, c, axes) is not None for c in cells):
            raise CheckError(f"check.{ACCURACY_KEY}: selector {selector!r} names no cell of this "
                             "run; use '*', a cell id or axis=level pairs such as "
                             "'backend=openvino precision=fp16'")


def _accuracy_gate(con: duckdb.DuckDBPyConnection, stored: Summary, cells: list[dict[str, Any]],
                   judged: list[dict[str, Any]], limits: float | Mapping[str, float]
                   ) -> tuple[list[Failure], list[dict[str, Any]]]:
    """Each judged cell's top-1 change against the reference, paired over the images both
    judged (``dmx.analysis.accuracy``), through ``dmx.analysis.paired.accuracy_gate``: a cell fails only
    when its drop is beyond its limit with 95% confidence; one that cannot be judged (no labels,
    no labelled image judged on both sides) fails as not judged."""
    from .accuracy import accuracy_by_cell, has_labels
    from .paired import accuracy_gate, paired_from_counts

    axes = [k for k in (cells[0] if cells else {}) if k in AXES]
    _check_selectors(limits, cells, axes)
    acc = accuracy_by_cell(stored.rows) if has_labels(con) else {}
    failures, report = [], []
    for c in judged:
        limit = drop_limit(limits, c, axes)
        if limit is None:
            continue
        a = acc.get(c["cell_id"])
        r = a.top1 if a is not None and a.top1 is not None else paired_from_counts(0, 0, 0, 0)
        gate = accuracy_gate(r, limit)
        message = gate.message if acc else ("accuracy not judged: the run has no ground truth "
                                            "(dataset.labels) on its rows")
        report.append({"cell_id": c["cell_id"], "cell": c["label"], "status": gate.status,
                       "limit": limit, "drop": gate.drop, "bound": gate.bound,
                       "conclusive": gate.conclusive, "n": r.n, "message": message})
        if gate.status != "pass":
            check = ACCURACY_KEY if gate.status == "fail" else "accuracy_not_judged"
            failures.append(Failure(c["cell_id"], c["label"], check, limit,
                                    None if gate.status != "fail" else gate.bound,
                                    r.right_to_wrong, r.n, note=message))
    return failures, report


def map_gate(m: Any, max_drop: float) -> tuple[str, float, float, str]:
    """A detector cell's mAP change (``CellMap``) against ``max_drop`` points: (status, drop,
    bound, message). It fails only when the drop is beyond the limit with confidence: the
    interval's bound nearest zero (``-ci_high``) exceeds it."""
    if max_drop < 0 or math.isnan(max_drop):
        raise ValueError(f"max_drop is a drop in points, >= 0; got {max_drop}")
    if m is None or m.delta is None or math.isnan(m.ci_high):
        return ("not_judged", float("nan"), float("nan"),
                "mAP not judged: no image with ground truth judged on both sides")
    drop, bound, worst = -m.delta, -m.ci_high, -m.ci_low
    lvl = f"{m.level:.0%}"
    if bound > max_drop:
        return ("fail", drop, bound, f"{m.text()}: a drop beyond {max_drop:.2f} pts with {lvl} "
                                     f"confidence (at least {bound:.2f} pts, n = {m.n_paired})")
    tail = "" if worst <= max_drop else f"; a drop up to {worst:.2f} pts is not ruled out at n = {m.n_paired}"
    return "pass", drop, bound, f"{m.text()}: no mAP drop beyond {max_drop:.2f} pts shown{tail}"


def _map_gate(con: duckdb.DuckDBPyConnection, run_dir: str | Path, cells: list[dict[str, Any]],
              judged: list[dict[str, Any]], limits: float | Mapping[str, float],
              resamples: int | None) -> tuple[list[Failure], list[dict[str, Any]]]:
    """A detector's gate on ``max_accuracy_drop``: each judged cell's COCO mAP@[.5:.95] change
    against the reference (points, paired bootstrap over images: ``dmx.analysis.
    detection_accuracy``), through ``map_gate``; a run without detection ground truth fails
    every cell as not judged."""
    from .detection_accuracy import DEFAULT_RESAMPLES, register_detection_accuracy

    axes = [k for k in (cells[0] if cells else {}) if k in AXES]
    _check_selectors(limits, cells, axes)
    maps = register_detection_accuracy(con, run_dir, resamples=resamples or DEFAULT_RESAMPLES) or {}
    failures, report = [], []
    for c in judged:
        limit = drop_limit(limits, c, axes)
        if limit is None:
            continue
        m = maps.get(c["cell_id"])
        status, drop, bound, message = map_gate(m, limit)
        if not maps:
            message = ("accuracy not judged: the run has no detection ground truth "
                       "(dataset.labels: COCO JSON or YOLO txt)")
        n = m.n_paired if m is not None else 0
        report.append({"cell_id": c["cell_id"], "cell": c["label"], "status": status,
                       "limit": limit, "drop": drop, "bound": bound, "metric": "mAP",
                       "conclusive": status == "fail" or (m is not None and m.delta is not None
                                                         and -m.ci_low <= limit),
                       "n": n, "message": message})
        if status != "pass":
            check = ACCURACY_KEY if status == "fail" else "accuracy_not_judged"
            failures.append(Failure(c["cell_id"], c["label"], check, limit,
                                    bound if status == "fail" else None, 0, n, note=message))
    return failures, report


def _limit_failures(c: dict[str, Any], s: dict[str, Any], lim: dict[str, float | None],
                    tol: dict[str, Any]) -> list[Failure]:
    """The numeric limits one cell (or one precision part of it, ``s``) breaks."""
    cid, label, asked, eff = c["cell_id"], c["label"], c.get("precision") or "fp32", s["precision_effective"]
    out = []
    for check, worst, image, bad, limit in (
            ("max_rel_l2", s["rel_l2"], s["rel_l2_image"], s["rel_l2_bad"], lim["max_rel_l2"]),
            ("min_cosine", s["cosine"], s["cosine_image"], s["cosine_bad"], lim["min_cosine"]),
            ("max_abs", s["max_abs"], s["max_abs_image"], s["max_abs_bad"], lim["max_abs"])):
        if limit is not None and bad:
            out.append(Failure(cid, label, check, limit, _seen(worst), int(bad), int(s["n"]),
                               image, asked, eff))
    min_top1 = tol["min_top1_agreement"]
    if min_top1 is not None and s["n_top1"]:
        agreement = 1 - s["top1_flips"] / s["n_top1"]
        if agreement < min_top1:
            out.append(Failure(cid, label, "min_top1_agreement", min_top1, agreement,
                               int(s["top1_flips"]), int(s["n_top1"]), s["top1_image"], asked, eff))
    return out


def _batch_dependence(con: duckdb.DuckDBPyConnection, stored: Summary, cells: list[dict[str, Any]],
                      limits: dict[tuple[str, str | None], dict[str, float | None]],
                      tol: dict[str, Any]) -> tuple[list[Failure], dict[str, Any]]:
    """The reuse guard reaches the gate: a cell (the reference included) whose sampled outputs
    move, when re-inferred in another batch, by more than its rel L2 limit fails, since a reused
    output then stands for an inference the cell would not have reproduced."""
    columns = {r[0] for r in con.execute("DESCRIBE rows").fetchall()}
    if "batch_rel_l2" not in columns:
        return [], {}
    by_id = {c["cell_id"]: c for c in cells}
    out = []
    found = stored.rows("check_batch")
    summary = {"rows_sampled": sum(int(d["n"]) for d in found),
               "max_rel_l2": max((d["rel_l2"] for d in found), default=None),
               "max_abs": max((d["max_abs"] for d in found), default=None)}
    for d in found:
        c = by_id.get(d["cell_id"])
        if c is None or c["status"] != "ok":
            continue
        asked, eff = c.get("precision") or "fp32", d["precision_effective"]
        lim = (limits.get((d["cell_id"], eff))
               or _cell_limits(tol, precision_family(eff) or precision_family(asked)))
        if lim["max_rel_l2"] is not None and d["rel_l2"] > lim["max_rel_l2"]:
            out.append(Failure(d["cell_id"], c["label"], "batch_dependence", lim["max_rel_l2"],
                               d["rel_l2"], 1, int(d["n"]), d["image_id"], asked, eff))
    return out, summary


def _cell_limits(tol: dict[str, Any], family: str | None) -> dict[str, float | None]:
    auto = default_limits(family)
    return {k: (auto[k] if tol[k] == AUTO else tol[k]) for k in ("max_abs", "max_rel_l2", "min_cosine")}


Limits = dict[tuple[str, str | None], dict[str, float | None]]   # (cell, effective precision) -> limits
LIMIT_KEYS = ("max_abs", "max_rel_l2", "min_cosine")
# limit -> (check_cells.sql's worst value, its rows beyond the limit)
_WORST = {"max_abs": ("max_abs", "max_abs_bad"), "max_rel_l2": ("rel_l2", "rel_l2_bad"),
          "min_cosine": ("cosine", "cosine_bad")}


def _parts(rows: list[dict[str, Any]]) -> dict[str, list[tuple[str, int]]]:
    """cell -> [(effective precision, rows)], most rows first (``cell_precision.sql``)."""
    parts: dict[str, list[tuple[str, int]]] = {}
    for d in rows:
        parts.setdefault(d["cell_id"], []).append((d["precision_effective"], int(d["n"])))
    return parts


def _limits(judged: list[dict[str, Any]], parts: dict[str, list[tuple[str, int]]],
            tol: dict[str, Any]) -> tuple[Limits, dict[str, dict[str, float | None]], list[Failure]]:
    """The numeric limits of each judged cell's parts, those used per precision family, and the
    cells that ran below the precision they asked for. A cell may have run at several
    precisions (bf16 on the nodes with AMX, fp32 elsewhere): each part is judged by its own
    precision's limits."""
    failures: list[Failure] = []
    limits: Limits = {}
    used: dict[str, dict[str, float | None]] = {}
    for c in judged:
        asked = c.get("precision") or "fp32"
        cell_parts = parts.get(c["cell_id"], [])
        for eff, n in [(None, 0)] + cell_parts:   # None: rows that name no precision
            family = precision_family(eff) or precision_family(asked)
            limits[c["cell_id"], eff] = _cell_limits(tol, family)
            if eff is not None or not cell_parts:
                used.setdefault(family or "unknown", limits[c["cell_id"], eff])
            if (eff is not None and not tol["allow_lower_precision"] and precision_family(eff)
                    and precision_family(asked)
                    and MANTISSA_BITS[precision_family(eff)] < MANTISSA_BITS[precision_family(asked)]):
                failures.append(Failure(c["cell_id"], c["label"], "precision", asked, eff, n,
                                        sum(k for _, k in cell_parts), precision=asked,
                                        precision_effective=eff))
    return limits, used, failures


def _limits_table(limits: Limits) -> pa.Table:
    return pa.table({"cell_id": pa.array([k[0] for k in limits], pa.string()),
                     "precision_effective": pa.array([k[1] for k in limits], pa.string()),
                     **{k: pa.array([lim[k] for lim in limits.values()], pa.float64())
                        for k in LIMIT_KEYS}})


def _cell_stats(con: duckdb.DuckDBPyConnection, limits: Limits, same_input: bool) -> pa.Table:
    """Worst values and rows breaking the limits, per cell and effective precision
    (``check_cells.sql``), of the parts in ``limits``."""
    con.register("limits", _limits_table(limits))
    try:
        return con.sql(load_sql("check_cells"), params={"same_input": same_input}).to_arrow_table()
    finally:
        con.unregister("limits")


def stored_tables(con: duckdb.DuckDBPyConnection, manifest: Mapping[str, Any],
                  precision_rows: list[dict[str, Any]]) -> dict[str, pa.Table]:
    """What the run's summary keeps for ``check``: ``check_cells`` at the run's own tolerances
    (its spec's ``check:`` over the defaults) in both scopes (column ``same_input``), and the
    limits they were counted at (``check_limits``). A spec whose ``check:`` is not valid keeps
    nothing (``dmx check`` says what is wrong)."""
    try:
        tol = resolve_tolerances(manifest.get("spec", {}).get("check"))
    except CheckError:
        return {}
    cells = query_dicts(con, "SELECT * FROM cells")
    judged = [c for c in cells if not c["is_reference"] and c["status"] == "ok"]
    limits, _, _ = _limits(judged, _parts(precision_rows), tol)   # cell_precision.sql's rows
    tables = [_cell_stats(con, limits, same) for same in (False, True)]
    tables = [t.append_column("same_input", pa.array([same] * t.num_rows, pa.bool_()))
              for same, t in zip((False, True), tables)]
    return {"check_cells": pa.concat_tables(tables), "check_limits": _limits_table(limits)}


def _breaks(key: str, s: Mapping[str, Any], limit: float | None) -> bool:
    """Whether the worst value of ``s`` (a ``check_cells`` row) breaks ``limit`` - i.e. whether
    any of its rows does (NaN breaks every limit; -2 is check_cells.sql's mark for a NaN cosine)."""
    worst = s[_WORST[key][0]]
    if limit is None or worst is None:
        return False
    if key == "min_cosine":
        return worst == -2.0 or worst < limit
    return math.isnan(worst) or worst > limit


def _stats(con: duckdb.DuckDBPyConnection, stored: Summary, limits: Limits,
           same_input: bool) -> list[dict[str, Any]]:
    """``check_cells`` at ``limits``. From the summary where it describes the rows: a part at
    the limits it was counted at is read back; a part whose limits differ is read back too when
    its worst value breaks none of the changed ones (then no row does: 0 rows beyond them), and
    only the parts left are counted from the rows."""
    kept, kept_limits = stored.table("check_cells"), stored.table("check_limits")
    if kept is None or kept_limits is None:
        return _cell_stats(con, limits, same_input).to_pylist()
    before = {(d["cell_id"], d["precision_effective"]): d for d in kept_limits.to_pylist()}
    rows = {(d["cell_id"], d["precision_effective"]): d for d in kept.to_pylist()
            if d.pop("same_input") == same_input}
    out: list[dict[str, Any]] = []
    recount: Limits = {}
    for part, lim in limits.items():
        old = before.get(part)
        if old is None:
            recount[part] = lim
            continue
        s = rows.get(part)
        if s is None:                 # no row of this part in scope, whatever the limits
            continue
        changed = [k for k in LIMIT_KEYS if lim[k] != old[k]]
        if any(_breaks(k, s, lim[k]) for k in changed):
            recount[part] = lim
            continue
        out.append({**s, **{_WORST[k][1]: 0 for k in changed}})
    if recount:
        out += _cell_stats(con, recount, same_input).to_pylist()
    return out


def _seen(v: float | None) -> float | str | None:
    if v is None:
        return None
    return "nan" if math.isnan(v) or v == -2.0 else v  # -2: check_cells.sql's mark for a NaN cosine


CHECK_WORDS = {"precision": "precision", "errors": "errors", "reference_errors": "reference errors",
               "not_judged": "not judged", "batch_dependence": "batch dependence",
               "max_rel_l2": "rel L2", ACCURACY_KEY: "accuracy drop",
               "accuracy_not_judged": "accuracy not judged",
               "min_cosine": "cosine", "max_abs": "max abs", "min_top1_agreement": "top-1 agree"}


def describe_failure(f: Failure) -> str:
    """One line: what broke, the limit and the number seen."""
    if f.check == "precision":
        return f"precision: asked {f.limit}, ran {f.seen}" + (
            f" on {f.rows_bad} of {f.rows} images" if f.rows_bad < f.rows else "")
    if f.check == "errors":
        return f"errors: {f.rows_bad} row(s) failed where the reference did not (e.g. {f.image_id}: {f.seen})"
    if f.check == "reference_errors":
        return (f"the reference failed on {f.rows_bad} of {f.rows} images (allowed "
                f"{f.limit}; e.g. {f.image_id}: {f.seen}): no cell was compared on them")
    if f.check == "batch_dependence":
        return (f"reuse guard: an output moved by rel L2 {g(_num(f.seen))} > {g(_num(f.limit))} when "
                f"re-inferred in another batch (e.g. {f.image_id}, {f.rows} sampled): reused "
                "outputs stand for inferences this cell would not reproduce")
    if f.check == "not_judged":
        return (f"not judged: none of its {f.rows} rows carries a metric (the reference failed on "
                f"those images, e.g. {f.image_id})")
    if f.check in (ACCURACY_KEY, "accuracy_not_judged"):
        return f.note or f.check
    if f.check == "min_top1_agreement":
        return (f"top-1 agreement {pct(_num(f.seen))} < {pct(_num(f.limit))} "
                f"({f.rows_bad}/{f.rows} flipped, e.g. {f.image_id})")
    op = ">" if f.check.startswith("max") else "<"
    digits = 6 if f.check == "min_cosine" else 3
    return (f"{CHECK_WORDS[f.check]} {g(_num(f.seen), digits)} {op} {g(_num(f.limit), digits)} "
            f"on {f.rows_bad}/{f.rows} images (worst {f.image_id})")


def _num(v: float | str | None) -> float | None:
    if isinstance(v, str):
        return float(v) if v == "nan" else None
    return v


def render_check_text(r: CheckResult) -> str:
    """The gate's verdict for a terminal or a CI log."""
    tol = r.tolerances
    lines = [f"dmx check - run {r.run_id} (spec {r.spec_name!r}), scope {tol['scope']}: "
             f"{'PASS' if r.passed else 'FAIL'} - {len(r.failing_cells)} of {r.cells_judged} "
             f"judged cell(s) break a tolerance"]
    limits = "; ".join(f"{p}: rel L2 <= {g(v['max_rel_l2'])}, cosine >= {g(v['min_cosine'], 6)}"
                       + (f", max abs <= {g(v['max_abs'])}" if v["max_abs"] is not None else "")
                       for p, v in sorted(r.limits_by_precision.items()))
    if limits:
        lines.append(f"limits per effective precision - {limits}; top-1 agreement >= "
                     f"{g(tol['min_top1_agreement'])}")
    drop = tol.get(ACCURACY_KEY)
    if drop is not None:
        unit = ("COCO mAP@[.5:.95] points" if any(a.get("metric") == "mAP" for a in r.accuracy)
                else "top-1 points")
        per = (f"{g(drop)} {unit}" if not isinstance(drop, Mapping) else
               ", ".join(f"{k}: {g(v)}" for k, v in drop.items()) + f" ({unit})")
        lines.append(f"accuracy: a cell fails when it loses more than {per} against the reference "
                     "with 95% confidence (the paired interval's bound); not judged is not passed")
    by_cell: dict[str, list[Failure]] = {}
    for f in r.failures:
        by_cell.setdefault(f.cell_id, []).append(f)
    for cid, fs in by_cell.items():
        lines.append(f"  FAIL {cid} {fs[0].cell}")
        split = fs[0].cell in r.splits
        for f in fs:
            part = f"[{f.precision_effective} part] " if split and f.precision_effective else ""
            lines.append(f"       {part}{describe_failure(f)}")
    for label, text in r.splits.items():
        lines.append(f"  SPLIT {label}: {text}; each part judged by the limits of the precision it ran")
    for label, u in r.not_judged_rows.items():
        why = (f", the reference failed on {u['reference_failed']} of them"
               if u["reference_failed"] else "")
        lines.append(f"  NOT JUDGED {u['rows']}/{u['of']} image(s) of {label}{why} (e.g. {u['image_id']})")
    if r.not_judged:
        lines.append(f"  {len(r.not_judged)} cell(s) have no rows in scope {tol['scope']}: only their "
                     "precision and errors were judged")
    if r.skipped:
        lines.append(f"  skipped cells (not judged): {len(r.skipped)}")
    for a in r.accuracy:
        if a["status"] == "pass":
            lines.append(f"  ACCURACY {a['cell']}: {a['message']}")
    guard = r.reuse_guard
    if guard.get("rows_sampled"):
        lines.append(f"  reuse guard: {guard['rows_sampled']} sampled outputs re-inferred in another "
                     f"batch; worst rel L2 {g(guard['max_rel_l2'])}, max abs {g(guard['max_abs'])}")
    return "\n".join(lines)
