"""The localize engine: run the reference and the variant over images, join every intermediate
tensor by its ONNX name, reduce each pair to a few numbers where it is computed, then find the
first tensor beyond tolerance and the layers that introduce error by themselves.

Memory: tensors are requested in groups whose batch-1 size fits ``budget_bytes`` (one
instrumented session per group, built once and run over every image), and each pair is
reduced and dropped as soon as both sides have it, so memory is bounded by the budget, not by
the model's depth.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np

from .graph import Layer, LocalizeError, graph_inputs, layers_of, tensor_bytes, value_types
from .metrics import compare
from .sides import Side

# Per-layer rel-L2 tolerance by the precision the variant ran at: the whole-model defaults of
# ``dmx check`` (analysis/check.py: 10 x torch.testing's rtol), repeated here by value because
# runner/ does not import analysis/. int8 has no default there; localize uses 0.1.
REL_L2_TOLERANCE = {"fp32": 1.3e-5, "tf32": 1e-2, "fp16": 1e-2, "bf16": 1.6e-1, "int8": 1e-1}
DEFAULT_BUDGET = 256 << 20
TOP_INTRODUCED = 8


def tolerance_for(precision: str) -> float:
    """``int8+bf16`` -> int8's; unknown labels get fp32's."""
    base = (precision or "fp32").split("+")[0].strip().lower()
    return REL_L2_TOLERANCE.get(base, REL_L2_TOLERANCE["fp32"])


@dataclass
class LocalizeResult:
    reference: str
    variant: str
    precision: str
    tolerance: float
    images: list[str]
    rows: list[dict[str, Any]]                       # one per (image, tensor)
    layers: list[dict[str, Any]]                     # one per tensor, worst over images
    first_divergent: dict[str, Any] | None
    instrumentation_changed_output: bool
    instrumentation: dict[str, float]     # variant's final output, all-marked vs plain
    final_output: dict[str, float]        # variant vs reference final output, plain / all-marked
    bisection: dict[str, Any] | None
    reference_check: dict[str, Any] | None = None
    torch_eager_check: dict[str, Any] | None = None   # interpreter vs eager torch, per torch side
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The JSON document (non-finite numbers, e.g. SQNR of equal tensors, become null)."""
        return _clean(self._json())

    def _json(self) -> dict[str, Any]:
        top = sorted((l for l in self.layers if l.get("introduced_rel_l2") is not None),
                     key=lambda l: -l["introduced_rel_l2"])
        return {"first_divergent": self.first_divergent,
                "layers": self.layers,
                "instrumentation_changed_output": self.instrumentation_changed_output,
                "instrumentation": self.instrumentation, "final_output": self.final_output,
                "most_introduced": [l["tensor"] for l in top],
                "reference": self.reference, "variant": self.variant,
                "precision": self.precision, "tolerance_rel_l2": self.tolerance,
                "images": self.images, "bisection": self.bisection,
                "reference_check": self.reference_check, "torch_eager_check": self.torch_eager_check,
                "seconds": round(self.seconds, 2), "notes": self.notes}


def _clean(v: Any) -> Any:
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def _groups(names: list[str], types: dict, budget: int, fallback: int) -> list[list[str]]:
    groups: list[list[str]] = [[]]
    used = 0
    for n in names:
        b = 2 * tensor_bytes(types, n, fallback)  # both sides hold it
        if groups[-1] and used + b > budget:
            groups.append([])
            used = 0
        groups[-1].append(n)
        used += b
    return [g for g in groups if g]


def localize(ref: Side, var: Side, images: Iterable[tuple[str, np.ndarray]], *, cell_id: str = "",
             tolerance: float | None = None, budget_bytes: int = DEFAULT_BUDGET,
             top: int = TOP_INTRODUCED, bisect: bool = True,
             progress: Callable[[str], None] | None = None) -> LocalizeResult:
    """Compare ``var`` with ``ref`` layer by layer on ``images`` ((image_id, (1, C, H, W)) pairs)."""
    t0 = time.perf_counter()
    model = ref.model if hasattr(ref, "model") else None
    if model is None:
        raise LocalizeError("the reference side has no ONNX graph to name layers by")
    layers = layers_of(model)
    types = value_types(model)
    in_name = graph_inputs(model)[0]
    seen = var.observable()
    ref_seen = ref.observable()
    joined = [l.tensor for l in layers if l.tensor in seen and l.tensor in ref_seen]
    if not joined:
        raise LocalizeError("the two models share no tensor name: localize joins layers by ONNX "
                            "tensor name, so both must come from the same graph")
    images = list(images)
    if not images:
        raise LocalizeError("no image to localize on")
    fallback = int(images[0][1].nbytes)
    groups = _groups(joined, types, budget_bytes, fallback)
    by_tensor = {l.tensor: l for l in layers}
    rows: list[dict[str, Any]] = []
    inst = {"max_abs": 0.0, "rel_l2": 0.0}
    final = {"plain_rel_l2": 0.0, "instrumented_rel_l2": 0.0}
    ref_check = {"max_abs": 0.0, "rel_l2": 0.0}
    eager: dict[str, dict[str, float]] = {}
    plains: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {}
    for image_id, x in images:  # final outputs only: small
        plain = var.plain(x)
        ref_plain = ref.plain(x)
        plains[image_id] = (plain, ref_plain)
        for side_name, side, mine in (("reference", ref, ref_plain), ("variant", var, plain)):
            theirs = side.eager(x) if hasattr(side, "eager") else None
            if theirs is not None:
                e = eager.setdefault(side_name, {"max_abs": 0.0, "rel_l2": 0.0})
                for a, c in zip(mine, theirs):
                    m = compare(a, c)
                    e["max_abs"], e["rel_l2"] = max(e["max_abs"], m["max_abs"]), max(e["rel_l2"], m["rel_l2"])
    # groups outside, images inside: each instrumented session is built once
    for gi, group in enumerate(groups):
        for image_id, x in images:
            plain, ref_plain = plains[image_id]
            r, r_final = ref.tensors(x, group)
            v, v_final = var.tensors(x, group)
            if gi == 0:
                for a, c in zip(r_final, ref_plain):
                    m = compare(a, c)
                    ref_check["max_abs"] = max(ref_check["max_abs"], m["max_abs"])
                    ref_check["rel_l2"] = max(ref_check["rel_l2"], m["rel_l2"])
            for a, b, c in zip(v_final, plain, ref_plain):  # every instrumented session
                if np.shape(a) != np.shape(b) or np.shape(b) != np.shape(c):
                    raise LocalizeError(f"final output shapes differ: {np.shape(a)}, {np.shape(b)}, "
                                        f"{np.shape(c)}")
                m = compare(a, b)
                inst["max_abs"] = max(inst["max_abs"], m["max_abs"])
                inst["rel_l2"] = max(inst["rel_l2"], m["rel_l2"])
                final["plain_rel_l2"] = max(final["plain_rel_l2"], compare(b, c)["rel_l2"])
                final["instrumented_rel_l2"] = max(final["instrumented_rel_l2"], compare(a, c)["rel_l2"])
            for name in group:
                layer = by_tensor[name]
                row = _row(image_id, cell_id, layer)
                if name in r and name in v and np.shape(r[name]) == np.shape(v[name]):
                    row.update(compare(v[name], r[name]), shape=[int(s) for s in np.shape(r[name])],
                               observable=True, note=var.note_for(name))
                else:
                    row["note"] = ("shapes differ: variant " f"{list(np.shape(v.get(name)))}"
                                   if name in v else "the variant returned no tensor of that name")
                rows.append(row)
            del r, v
        if progress:
            progress(f"localize: tensors {gi + 1}/{len(groups)} groups x {len(images)} images "
                     f"({len(joined)} tensors joined)")
    for image_id, _ in images:
        for l in layers:
            if l.tensor not in joined:
                row = _row(image_id, cell_id, l)
                row["note"] = (var.missing_note() if l.tensor not in seen else
                               "the reference backend has no tensor of that name: " + ref.missing_note())
                rows.append(row)
    precision = var.precision()
    tol = tolerance if tolerance is not None else tolerance_for(precision)
    per_tensor = _aggregate(rows, layers)
    first = next((l for l in per_tensor if l["observable"] and (l["rel_l2"] or 0) > tol), None)
    first_div = None if first is None else {k: first[k] for k in ("tensor", "node", "op_type", "topo_index", "rel_l2")}
    _introduced(ref, var, model, images, per_tensor, rows, first, in_name, top)
    bis = _bisect(ref, var, images, rows, joined, tol) if bisect and first is not None else None
    res = LocalizeResult(reference=ref.describe(), variant=var.describe(), precision=precision,
                         tolerance=tol, images=[i for i, _ in images], rows=rows, layers=per_tensor,
                         first_divergent=first_div, instrumentation_changed_output=inst["max_abs"] > 0,
                         instrumentation=inst, final_output=final, bisection=bis,
                         reference_check=ref_check, torch_eager_check=eager or None)
    res.seconds = time.perf_counter() - t0
    return res


def _row(image_id: str, cell_id: str, l: Layer) -> dict[str, Any]:
    return {"image_id": image_id, "cell_id": cell_id, "tensor": l.tensor, "node": l.node,
            "op_type": l.op_type, "topo_index": l.topo_index, "shape": None, "max_abs": None,
            "mean_abs": None, "rel_l2": None, "cosine": None, "sqnr_db": None,
            "introduced_rel_l2": None, "observable": False, "note": None}


def _aggregate(rows: list[dict[str, Any]], layers: list[Layer]) -> list[dict[str, Any]]:
    """Per tensor: the worst image (largest rel L2) and its numbers."""
    worst: dict[str, dict[str, Any]] = {}
    for r in rows:
        w = worst.get(r["tensor"])
        if w is None or (r["rel_l2"] is not None and (w["rel_l2"] is None or r["rel_l2"] > w["rel_l2"])):
            worst[r["tensor"]] = r
    out = []
    for l in layers:
        w = worst[l.tensor]
        out.append({"tensor": l.tensor, "node": l.node, "op_type": l.op_type, "topo_index": l.topo_index,
                    "shape": w["shape"], "observable": w["observable"], "rel_l2": w["rel_l2"],
                    "max_abs": w["max_abs"], "mean_abs": w["mean_abs"], "cosine": w["cosine"],
                    "sqnr_db": w["sqnr_db"], "worst_image": w["image_id"] if w["observable"] else None,
                    "introduced_rel_l2": None, "note": w["note"]})
    return out


def _introduced(ref: Side, var: Side, model: Any, images: list, per_tensor: list[dict[str, Any]],
                rows: list[dict[str, Any]], first: dict[str, Any] | None, in_name: str,
                top: int) -> None:
    """Re-run the variant's node (or its short QDQ chain) making each top layer on the
    reference's own inputs: the error it introduces by itself, next to what it shows in the
    full run (introduced + inherited)."""
    rel = {l["tensor"]: (l["rel_l2"] or 0.0) for l in per_tensor}
    ins = {l.tensor: l.inputs for l in layers_of(model)}
    jump = []
    for l in per_tensor:
        if not l["observable"] or not l["rel_l2"]:
            continue
        inherited = max((rel.get(i, 0.0) for i in ins[l["tensor"]]), default=0.0)
        jump.append((l["rel_l2"] - inherited, l["tensor"]))
    chosen = [t for j, t in sorted(jump, reverse=True)[:top] if j > 0]
    if first is not None and first["tensor"] not in chosen:
        chosen.insert(0, first["tensor"])
    available = ref.observable() | {in_name}
    cuts: dict[str, tuple[Callable, list[str]]] = {}
    for t in chosen:
        try:
            c = var.cut_runner(var.cut_target(t), available - {t})
        except Exception:  # a backend may refuse a cut (an op it only supports fused): no number
            c = None
        if c is not None:
            cuts[t] = c
    if not cuts:
        return
    need = sorted({n for _, names in cuts.values() for n in names} | set(cuts))
    by_key = {(r["image_id"], r["tensor"]): r for r in rows}
    worst: dict[str, float] = {}
    for image_id, x in images:
        r, _ = ref.tensors(x, need)
        r.setdefault(in_name, x)
        for t, (fn, names) in cuts.items():
            if t not in r or any(n not in r for n in names):
                continue
            try:
                out = fn({n: r[n] for n in names})
            except Exception:  # a backend error on a cut is reported as no number, not a crash
                continue
            if np.shape(out) != np.shape(r[t]):
                continue
            v = compare(out, r[t])["rel_l2"]
            by_key[(image_id, t)]["introduced_rel_l2"] = v
            worst[t] = max(worst.get(t, 0.0), v)
        del r
    for l in per_tensor:
        if l["tensor"] in worst:
            l["introduced_rel_l2"] = worst[l["tensor"]]


def _bisect(ref: Side, var: Side, images: list, rows: list[dict[str, Any]], joined: list[str],
            tol: float) -> dict[str, Any]:
    """Find the first tensor beyond tolerance again with ONE extra output per run, by bisection
    over topological order, on the image where the first divergent tensor was worst: marking
    one tensor barely changes the compiled graph, so a disagreement with the all-marked run
    means the marking itself moved the answer."""
    per_image: dict[str, dict[str, float]] = {}
    for r in rows:
        if r["observable"]:
            per_image.setdefault(r["image_id"], {})[r["tensor"]] = r["rel_l2"] or 0.0
    image_id, x = max(images, key=lambda im: max(per_image.get(im[0], {}).values(), default=0.0))
    marked_first = next((t for t in joined if per_image.get(image_id, {}).get(t, 0.0) > tol), None)
    lo, hi, runs = 0, len(joined), 0
    while lo < hi:
        mid = (lo + hi) // 2
        t = joined[mid]
        rr, _ = ref.tensors(x, [t])
        vv, _ = var.tensors(x, [t])
        runs += 1
        bad = t in rr and t in vv and np.shape(rr[t]) == np.shape(vv[t]) and compare(vv[t], rr[t])["rel_l2"] > tol
        if bad:
            hi = mid
        else:
            lo = mid + 1
    found = joined[lo] if lo < len(joined) else None
    return {"image_id": image_id, "tensor": found, "runs": runs, "all_marked": marked_first,
            "agrees": found == marked_first}
