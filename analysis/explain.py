"""Which factors drive the divergence: contrasts, main effects, interactions, worst images.

All numbers come from DuckDB over the run's Parquet files. The ranking uses one-factor-at-a-
time contrasts: a cell that differs from the reference in exactly one axis (axes that only
apply to that level, such as ``openvino_hint`` for ``backend=openvino``, are reported as its
detail), so each effect is that factor's alone.
"""
from __future__ import annotations

import json

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import duckdb

from dmx.matrix.axes import AXES
from dmx.results.store import RunDir

from .accuracy import CellAccuracy, accuracy_by_cell, correctness_shares
from .db import open_run
from .detection_accuracy import DEFAULT_RESAMPLES, CellMap, register_detection_accuracy
from .effects import Attribution, CellStat, attribute
from .paired import PairedAccuracy, unchanged_bound, verdict
from .queries import query_dicts
from .summary import WORST_PER_CELL, Summary
from .tolerances import COS_EPS, default_limits, precision_family, split_text

# The ranking metric: median over images of the cosine distance of the outputs, i.e. how far a
# factor moves a typical image. A factor that moves few images a lot (EXIF orientation on the
# rotated files) has a median near 0 and is listed apart as "rare but large", with the images.
# A contrast with NaN or Inf outputs ranks above every finite one (most such images first).
RANK_METRIC = "cosine_distance_median"
RARE_SHARE = 0.5        # "rare": fewer than half of the images diverge
RARE_FACTOR = 10.0      # "large": the worst image moves 10x more than the typical one


@dataclass
class DetectionContrast:
    """A detector contrast's agreement with the reference: candidate order and final boxes."""

    n: int
    tau_mean: float | None
    tau_p50: float | None
    tau_min: float | None
    topk_mean: float | None
    reordered_frac: float        # share of images whose top-k candidate order differs (tau < 1)
    changed_frac: float          # share of images whose final detection set is not "the same"
    changed_ci: tuple[float, float] | None
    boxes_ref: int
    boxes: int
    matched: int
    missed: int
    extra: int
    iou_mean: float | None
    iou_min: float | None
    score_delta_max: float | None
    class_flips: int
    changed_images: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Contrast:
    """One level of one factor, all other factors at the reference."""

    factor: str
    level: str
    detail: str
    cell_id: str
    n: int                              # rows measured (NaN/Inf ones included)
    cos_dist_mean: float | None         # statistics over the finite rows
    cos_dist_p50: float | None
    cos_dist_p50_ci: tuple[float, float] | None   # order-statistic 95% interval, see median_interval
    cos_dist_p95: float | None
    cos_dist_max: float | None
    max_abs_mean: float | None
    max_abs_p95: float | None
    max_abs_max: float | None
    top1_disagree: float | None
    top1_ci: tuple[float, float] | None
    px_mean_abs: float | None
    px_equal_frac: float | None
    shape_mismatches: int
    precision: str | None
    precision_effective: str | None
    rel_l2_max: float | None = None
    n_same_input: int = 0
    cos_dist_same_input: float | None = None
    n_diff_input: int = 0
    cos_dist_diff_input: float | None = None
    n_nonfinite: int = 0                # rows whose output is NaN or Inf
    nonfinite_image: str | None = None
    out_divergent_frac: float | None = None   # share of rows whose output moved (> COS_EPS) or is NaN/Inf
    n_finite: int = 0                   # rows behind the statistics and the median's interval
    split: str | None = None            # "ran bf16 on 10 and fp32 on 10 of 20 images" (a part of a cell)
    worst: list[dict[str, Any]] = field(default_factory=list)
    # A model with several outputs: per output, images where it moved most, its median rel L2
    outputs: list[dict[str, Any]] = field(default_factory=list)
    concentrated: dict[str, Any] | None = None
    detection: DetectionContrast | None = None
    # Accuracy against ground truth (dataset.labels), points, paired with the reference over
    # the images both judged (analysis/accuracy.py); acc_n = 0 where the run has no labels.
    acc_n: int = 0
    acc_ref: float | None = None               # the reference's top-1 on those images
    acc: float | None = None                   # this cell's top-1 on them
    acc_delta: float | None = None             # acc - acc_ref
    acc_ci_low: float | None = None            # paired bootstrap 95% interval of acc_delta
    acc_ci_high: float | None = None
    acc_right_to_wrong: int = 0
    acc_wrong_to_right: int = 0
    acc_p: float | None = None                 # McNemar's exact test on the two counts
    acc_unpaired: int = 0                      # labelled images this cell did not judge (errors)
    acc_top5_delta: float | None = None
    acc_top5_ci_low: float | None = None
    acc_top5_ci_high: float | None = None
    # A detector's COCO mAP against its ground truth, paired with the reference's over the
    # images both judged (analysis/detection_accuracy.py); None without detection labels.
    map: CellMap | None = None

    def accuracy_change(self) -> PairedAccuracy | None:
        """The top-1 change as a ``PairedAccuracy`` (its ``text()`` and ``verdict``), or None."""
        if not self.acc_n:
            return None
        return PairedAccuracy(self.acc_n, self.acc, self.acc_ref, self.acc_delta, self.acc_ci_low,
                              self.acc_ci_high, self.acc_right_to_wrong, self.acc_wrong_to_right,
                              self.acc_p)


@dataclass
class Explanation:
    run_id: str
    spec_name: str
    reference: str
    images: int
    cells: int
    status: list[dict[str, Any]]
    contrasts: list[Contrast]
    eta_squared: dict[str, float]
    interactions: list[dict[str, Any]]
    precision_mismatches: list[dict[str, Any]]
    skipped: dict[str, str]
    determinism: dict[str, Any]
    task: str = "classification"
    detection_rules: dict[str, Any] = field(default_factory=dict)
    nodes_differ: dict[str, list[str]] = field(default_factory=dict)  # section -> differing nodes
    nodes: int = 0                # nodes that computed rows (never ranked: see NODE_NOT_RANKED)
    explained: float = 0.0        # share of variance the cells explain (1 - within-cell SS / total)
    share_scale: float = 1.0      # < 1 when type-II shares were scaled down to sum <= explained
    nested: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    # Ground truth, where the rows carry labels: the reference's accuracy, how many images are
    # labelled, the type-II shares of top-1 correctness per factor (None: no labels).
    accuracy: dict[str, Any] | None = None
    # A detector's ground truth: the reference's mAP, the labelled images, the source, the
    # bootstrap's resamples (None: no detection labels in the run).
    detection_accuracy: dict[str, Any] | None = None

    def map_ranking(self) -> list[Contrast]:
        """Detector contrasts with a paired mAP change, the largest change (either sign) first."""
        judged = [c for c in self.contrasts if c.map is not None and c.map.delta is not None]
        return sorted(judged, key=lambda c: (-abs(c.map.delta), c.factor, c.level, c.detail))

    def accuracy_ranking(self) -> list[Contrast]:
        """Contrasts with a paired accuracy change, the largest change (either sign) first,
        then the smallest McNemar p: how many points each factor costs or gains."""
        judged = [c for c in self.contrasts if c.acc_n]
        return sorted(judged, key=lambda c: (-abs(c.acc_delta or 0.0), c.acc_p if c.acc_p is not
                                             None else 1.0, c.factor, c.level, c.detail))

    def candidate_ranking(self) -> list[Contrast]:
        """Detector contrasts, the one that reorders the pre-NMS candidates most first (lowest
        mean Kendall tau, then lowest top-k overlap); one line per factor, its strongest level."""
        return _best_per_factor(sorted((c for c in self.contrasts if c.detection), key=_tau_key))

    def box_ranking(self) -> list[Contrast]:
        """Detector contrasts, the one that changes the final boxes on most images first (then
        most boxes missed + extra, then lowest mean IoU); one line per factor."""
        return _best_per_factor(sorted((c for c in self.contrasts if c.detection), key=_box_key))

    def order_only(self) -> list[Contrast]:
        """Contrasts that reorder the candidates but leave every final detection set the same:
        the divergence a look at the post-NMS boxes does not show."""
        return sorted((c for c in self.contrasts if c.detection and c.detection.reordered_frac > 0
                       and c.detection.changed_frac == 0), key=_tau_key)

    def ranking(self) -> list[dict[str, Any]]:
        """Most important first: contrasts by median cosine distance, then mean, top-1, max abs."""
        out = []
        for c in sorted(self.contrasts, key=_rank_key):
            out.append({"factor": c.factor, "level": c.level, "detail": c.detail or None,
                        "metric": RANK_METRIC, "effect": c.cos_dist_p50,
                        "effect_ci": c.cos_dist_p50_ci, "n": c.n, "nonfinite": c.n_nonfinite,
                        "cosine_distance_mean": c.cos_dist_mean, "cosine_distance_max": c.cos_dist_max,
                        "rare_but_large": is_rare_but_large(c),
                        "tolerance": tolerance_verdict(c),
                        "top1_disagreement": c.top1_disagree, "max_abs_p95": c.max_abs_p95,
                        "max_abs_max": c.max_abs_max, "px_mean_abs": c.px_mean_abs,
                        "shape_mismatches": c.shape_mismatches, "cell_id": c.cell_id,
                        "precision_effective": c.precision_effective,
                        **_accuracy_fields(c),
                        "map_text": (c.map.text() if c.map is not None and c.map.delta is not None
                                     else None)})
        return out

    def rare_but_large(self) -> list[Contrast]:
        """Contrasts that move few images, but a lot, worst first."""
        return sorted((c for c in self.contrasts if is_rare_but_large(c)),
                      key=lambda c: -(c.cos_dist_max or 0.0))

    def factor_ranking(self) -> list[dict[str, Any]]:
        """One line per factor: its strongest level."""
        best: dict[str, Contrast] = {}
        for c in sorted(self.contrasts, key=_rank_key):
            best.setdefault(c.factor, c)
        return [{"factor": f, "level": c.level, "detail": c.detail or None,
                 "metric": RANK_METRIC, "effect": c.cos_dist_p50, "effect_ci": c.cos_dist_p50_ci,
                 "n": c.n, "nonfinite": c.n_nonfinite, "cosine_distance_mean": c.cos_dist_mean,
                 "top1_disagreement": c.top1_disagree, "max_abs_max": c.max_abs_max,
                 "eta_squared": self.eta_squared.get(f), **_accuracy_fields(c)}
                for f, c in best.items()]

    def to_json(self) -> dict[str, Any]:
        det = None
        if self.task == "detection":
            name = lambda c: {"factor": c.factor, "level": c.level, "detail": c.detail or None,  # noqa: E731
                              **{k: v for k, v in asdict(c.detection).items() if k != "changed_images"}}
            det = {"rules": self.detection_rules,
                   "candidate_ranking": [name(c) for c in self.candidate_ranking()],
                   "box_ranking": [name(c) for c in self.box_ranking()],
                   "order_only": [name(c) for c in self.order_only()]}
        return {"run_id": self.run_id, "spec": self.spec_name, "reference": self.reference,
                "task": self.task, "detection": det,
                "images": self.images, "cells": self.cells, "ranking": self.ranking(),
                "factors": self.factor_ranking(), "contrasts": [asdict(c) for c in self.contrasts],
                "eta_squared": self.eta_squared, "interactions": self.interactions,
                "shares": {"method": "type-II sums of squares", "explained": self.explained,
                           "scale": self.share_scale, "nested": self.nested},
                "nodes": {"count": self.nodes, "ranked": False, "why": NODE_NOT_RANKED,
                          "differ_in": sorted(self.nodes_differ)},
                "accuracy": None if self.accuracy is None else {
                    **self.accuracy, "ranking": [{"factor": c.factor, "level": c.level,
                                                  "detail": c.detail or None, "cell_id": c.cell_id,
                                                  **_accuracy_fields(c)}
                                                 for c in self.accuracy_ranking()]},
                "detection_accuracy": None if self.detection_accuracy is None else {
                    **self.detection_accuracy,
                    "ranking": [{"factor": c.factor, "level": c.level, "detail": c.detail or None,
                                 **asdict(c.map), "indistinguishable": c.map.indistinguishable,
                                 "text": c.map.text()} for c in self.map_ranking()]},
                "precision_mismatches": self.precision_mismatches, "status": self.status,
                "skipped_cells": self.skipped, "determinism": self.determinism}


def _accuracy_fields(c: Contrast) -> dict[str, Any]:
    """A contrast's accuracy change (points) for the JSON ranking and the report."""
    r = c.accuracy_change()
    if r is None:
        return {"accuracy_n": 0}
    return {"accuracy_n": r.n, "accuracy_ref": r.acc_ref, "accuracy": r.acc_cell,
            "accuracy_delta": r.delta, "accuracy_ci": (r.ci_low, r.ci_high),
            "right_to_wrong": r.right_to_wrong, "wrong_to_right": r.wrong_to_right,
            "accuracy_p": r.p_value, "accuracy_text": r.text(), "accuracy_verdict": verdict(r),
            # no image changed: the interval is [0, 0], the change only known below this (points)
            "accuracy_unchanged_bound": (unchanged_bound(r.n) if r.right_to_wrong + r.wrong_to_right
                                         == 0 else None)}


def _arrow_type(annotation: str) -> Any:
    """The Arrow type of a scalar dataclass field (annotations are strings here), or None."""
    import pyarrow as pa
    base = annotation.replace(" | None", "").strip()
    return {"int": pa.int64(), "float": pa.float64(), "str": pa.string(), "bool": pa.bool_()}.get(base)


def _scalar_fields(cls: type, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(column, field name, Arrow type) for the scalar fields of a dataclass."""
    return [(prefix + f.name, f.name, t) for f in cls.__dataclass_fields__.values()
            if (t := _arrow_type(str(f.type))) is not None]


def register_views(con: duckdb.DuckDBPyConnection, e: Explanation) -> None:
    """The attribution results as DuckDB views: ``contrasts``, ``effects``, ``interactions``.
    Every column has its type, also where no contrast has a value (a classifier's det_*)."""
    import pyarrow as pa
    cols = _scalar_fields(Contrast) + _scalar_fields(DetectionContrast, "det_")
    contrast_schema = pa.schema([(c, t) for c, _, t in cols]
                                + [("concentrated_in", pa.string()), ("rank", pa.int64())])
    contrasts = []
    for i, c in enumerate(sorted(e.contrasts, key=_rank_key), 1):
        row = {col: getattr(c, name) for col, name, _ in cols if not col.startswith("det_")}
        if c.detection:
            row |= {col: getattr(c.detection, name) for col, name, _ in cols if col.startswith("det_")}
        k = c.concentrated
        row["concentrated_in"] = f"{k['property']}={'/'.join(k['values'])}" if k else None
        contrasts.append(row | {"rank": i})
    effects = [{"factor": f, "eta_squared": v} for f, v in e.eta_squared.items()]
    inter = [{"factor_a": i["factors"][0], "factor_b": i["factors"][1],
              "eta_squared": i["eta_squared"]} for i in e.interactions]
    for name, rows, schema in (
            ("contrasts", contrasts, contrast_schema),
            ("effects", effects, pa.schema([("factor", pa.string()), ("eta_squared", pa.float64())])),
            ("interactions", inter, pa.schema([("factor_a", pa.string()), ("factor_b", pa.string()),
                                              ("eta_squared", pa.float64())]))):
        con.register(f"_{name}_arrow", pa.Table.from_pylist(rows, schema=schema))
        con.execute(f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM _{name}_arrow")


def _rank_key(c: Contrast) -> tuple:
    """NaN/Inf outputs first (most such rows first), then the median cosine distance, the
    mean, top-1 disagreement and max abs p95, largest first; missing values last."""
    neg = lambda v: -(v if v is not None and not math.isnan(v) else -1.0)  # noqa: E731
    return (-c.n_nonfinite, neg(c.cos_dist_p50), neg(c.cos_dist_mean), neg(c.top1_disagree),
            neg(c.max_abs_p95), c.factor, c.level, c.detail)


def _tau_key(c: Contrast) -> tuple:
    d = c.detection
    return (_nan_last(d.tau_mean), _nan_last(d.topk_mean), c.factor, c.level)


def _box_key(c: Contrast) -> tuple:
    d = c.detection
    return (-d.changed_frac, -(d.missed + d.extra + d.class_flips), _nan_last(d.iou_mean),
            _tau_key(c))


def _nan_last(v: float | None) -> float:
    return 2.0 if v is None or math.isnan(v) else v


def _best_per_factor(ranked: list[Contrast]) -> list[Contrast]:
    seen: dict[str, Contrast] = {}
    for c in ranked:
        seen.setdefault(c.factor, c)
    return list(seen.values())


def _detection_contrast(s: dict[str, Any]) -> DetectionContrast:
    n = int(s["n"] or 0)
    changed = int(s["n_changed"] or 0)
    return DetectionContrast(
        n=n, tau_mean=s["tau_mean"], tau_p50=s["tau_p50"], tau_min=s["tau_min"],
        topk_mean=s["topk_mean"], reordered_frac=(s["n_reordered"] or 0) / n if n else 0.0,
        changed_frac=changed / n if n else 0.0, changed_ci=wilson(changed, n),
        boxes_ref=int(s["boxes_ref"] or 0), boxes=int(s["boxes"] or 0), matched=int(s["matched"] or 0),
        missed=int(s["missed"] or 0), extra=int(s["extra"] or 0), iou_mean=s["iou_mean"],
        iou_min=s["iou_min"], score_delta_max=s["score_delta_max"],
        class_flips=int(s["class_flips"] or 0))


def tolerance_verdict(c: Contrast) -> dict[str, Any] | None:
    """Whether the contrast stays within torch.testing's tolerance for the precision it ran at
    (the CI gate's default rel L2 limit, ``dmx.analysis.check``), with the numbers."""
    family = precision_family(c.precision_effective)
    limit = default_limits(family)["max_rel_l2"]
    if limit is None or c.rel_l2_max is None:
        return None
    return {"precision": family, "max_rel_l2": limit, "rel_l2_max": c.rel_l2_max,
            "within": c.rel_l2_max <= limit and not c.n_nonfinite}   # NaN breaks every limit


def is_rare_but_large(c: Contrast) -> bool:
    """Few images' outputs move (fewer than RARE_SHARE), but those by far more than the typical
    image's. The share is of outputs, not inputs: a backend or precision change keeps every
    input identical and may still move every output."""
    if not c.n or not c.cos_dist_max or c.out_divergent_frac is None:
        return False
    return (c.out_divergent_frac < RARE_SHARE
            and c.cos_dist_max > RARE_FACTOR * max(c.cos_dist_p50 or 0.0, 1e-9))


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """Wilson score 95% interval for a proportion k/n."""
    if n <= 0:
        return None
    p = k / n
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, centre - half), min(1.0, centre + half))


def median_rank(n: int) -> int:
    """The lower rank j (1-based) of the 95% order-statistic interval [x_(j), x_(n+1-j)] for a
    median of n values: the binomial's normal approximation with continuity correction, the
    same rule as ``sql/median_ci.sql`` (coverage >= 95% for n >= 6; [min, max] below)."""
    return max(1, math.floor(n / 2 - 0.98 * math.sqrt(n) + 0.5))


def median_interval(values: list[float]) -> tuple[float, float] | None:
    """Distribution-free 95% interval for the median of ``values`` (any distribution: zero-
    inflated, heavy-tailed), from two of its order statistics; None when empty."""
    if not values:
        return None
    s = sorted(values)
    j = median_rank(len(s))
    return (s[j - 1], s[len(s) - j])


def concentration(split: dict[str, list[tuple[str, int, int]]],
                  min_score: float = 0.6) -> dict[str, Any] | None:
    """The image property whose values best separate divergent from identical images.

    For each property, the values where most images diverge form the "divergent" set; its
    score is (share of divergent images inside it) - (share of the others inside it). The best
    property is returned when its score is at least ``min_score``, e.g. all divergent images
    are 4:2:0 and no 4:4:4 image diverges. None when every image (or none) diverges.
    """
    best = None
    for prop, values in split.items():
        div = sum(v[2] for v in values)
        total = sum(v[1] for v in values)
        others = total - div
        if div == 0 or others == 0:
            return None
        chosen = [v for v in values if v[2] > (v[1] - v[2])]
        d_in = sum(v[2] for v in chosen)
        o_in = sum(v[1] - v[2] for v in chosen)
        score = d_in / div - o_in / others
        if score >= min_score and (best is None or score > best["score"]):
            best = {"property": prop, "values": sorted(v[0] for v in chosen), "score": round(score, 3),
                    "divergent_in": d_in, "divergent_total": div, "others_in": o_in,
                    "others_total": others}
    return best


def _axes(con: duckdb.DuckDBPyConnection) -> list[str]:
    cols = [r[0] for r in con.execute("DESCRIBE cells").fetchall()]
    return [c for c in cols if c in AXES]


def _contrast(factor: str, level: str, c: dict[str, Any], others: list[str],
              s: dict[str, Any], split: str | None) -> Contrast:
    n_top1 = s["n_top1"] or 0
    flips = s["top1_flips"] or 0
    n = int(s["n"] or 0)
    detail = " ".join(f"{a}={c[a]}" for a in others)
    if split:   # one part of a cell that ran at two precisions: its own line
        detail = f"{detail}, ran {s['precision_effective']}" if detail else f"ran {s['precision_effective']}"
    ci = s.get("ci")
    return Contrast(
        factor=factor, level=level, detail=detail,
        cell_id=c["cell_id"], n=n, cos_dist_mean=s["cos_dist_mean"],
        cos_dist_p50=s["cos_dist_p50"], cos_dist_p50_ci=(ci["lo"], ci["hi"]) if ci and ci["n"] else None, cos_dist_p95=s["cos_dist_p95"],
        cos_dist_max=s["cos_dist_max"], max_abs_mean=s["max_abs_mean"],
        max_abs_p95=s["max_abs_p95"], max_abs_max=s["max_abs_max"],
        top1_disagree=flips / n_top1 if n_top1 else None, top1_ci=wilson(flips, n_top1),
        px_mean_abs=s["px_mean_abs"], px_equal_frac=s["px_equal_frac"],
        shape_mismatches=int(s["shape_mismatches"] or 0),
        precision=c.get("precision"), precision_effective=s["precision_effective"],
        rel_l2_max=s.get("rel_l2_max"),
        n_same_input=int(s["n_same_input"] or 0), cos_dist_same_input=s["cos_dist_same_input"],
        n_diff_input=int(s["n_diff_input"] or 0), cos_dist_diff_input=s["cos_dist_diff_input"],
        n_nonfinite=int(s["n_nonfinite"] or 0), nonfinite_image=s["nonfinite_image"],
        out_divergent_frac=int(s["n_divergent"] or 0) / n if n else None,
        n_finite=n - int(s["n_nonfinite"] or 0), split=split)


def explain_run(path: str | Path, worst_per_cell: int = WORST_PER_CELL,
                map_resamples: int = DEFAULT_RESAMPLES) -> Explanation:
    """Rank a run's factors; ``map_resamples``: the paired bootstrap's resamples for a detector's
    mAP change where the run has detection ground truth (its cost: analysis/paired_map.py)."""
    run = RunDir(path)
    manifest = run.read_manifest()
    con = open_run(run)
    stored = Summary(con, run)      # the aggregates kept at compaction, when they fit these rows
    axes = _axes(con)
    cells = query_dicts(con, "SELECT * FROM cells")
    ref = next(c for c in cells if c["is_reference"])
    parts = _parts(stored.rows("cell_stats", {"cells": [c["cell_id"] for c in cells],
                                              "cos_eps": COS_EPS}))

    # A level's contrast is the cell with that level that differs from the reference in the
    # fewest other factors: exactly one where the matrix has it; otherwise (say int8, which
    # torch cannot run) the nearest cells, with the other changed factors named in ``detail``.
    nearest: dict[tuple[str, str], list[tuple[int, dict[str, Any], list[str]]]] = {}
    for c in cells:
        if c["is_reference"] or c["status"] != "ok" or c["cell_id"] not in parts:
            continue
        # An axis null in this cell does not apply to it (openvino_hint on a torch cell): it is
        # no level, so never a contrast of its own nor a detail ("openvino_hint=None").
        main = [a for a in axes if c[a] is not None and ref[a] is not None and c[a] != ref[a]]
        for a in main:
            nearest.setdefault((a, str(c[a])), []).append((len(main), c, main))
    chosen = []
    for (factor, level), found in nearest.items():
        fewest = min(k for k, _, _ in found)
        chosen += [(factor, level, c) for k, c, _ in found if k == fewest]
    cis: dict[tuple, dict[str, Any]] = {
        (d["cell_id"], d["precision_effective"]): d
        for d in stored.rows("median_ci", {"cells": sorted({c["cell_id"] for _, _, c in chosen})})}
    contrasts = []
    for factor, level, c in chosen:
        others = [a for a in axes if a != factor and c[a] is not None and c[a] != ref[a]]
        cell_parts = parts[c["cell_id"]]
        split = split_text([(p["precision_effective"], int(p["n"])) for p in cell_parts]) \
            if len(cell_parts) > 1 else None
        for p in cell_parts:
            p["ci"] = cis.get((c["cell_id"], p["precision_effective"]))
            contrasts.append(_contrast(factor, level, c, others, p, split))
    if contrasts:
        by_cell: dict[str, list] = {}
        for d in stored.rows("worst_images", {"cells": [c.cell_id for c in contrasts],
                                               "per_cell": worst_per_cell}):
            by_cell.setdefault(d.pop("cell_id"), []).append(d)
        for c in contrasts:   # a part of a split cell shows its own rows only
            c.worst = [w for w in by_cell.get(c.cell_id, []) if (w["max_abs"] or 0) > 0
                       and (not c.split or w["precision_effective"] == c.precision_effective)]

        splits: dict[str, dict[str, list[tuple[str, int, int]]]] = {}
        for d in stored.rows("property_split", {"cells": [c.cell_id for c in contrasts],
                                                 "cos_eps": COS_EPS}):
            splits.setdefault(d["cell_id"], {}).setdefault(d["property"], []).append(
                (d["value"], d["n"], d["n_divergent"]))
        for c in contrasts:
            c.concentrated = concentration(splits.get(c.cell_id, {}))

    task = (manifest.get("model") or {}).get("task") or "classification"
    if task == "detection" and contrasts:
        det_stats = {s["cell_id"]: s for s in stored.rows("det_cell_stats", {"cells": [c.cell_id for c in contrasts]})}
        changed: dict[str, list[dict[str, Any]]] = {}
        for d in stored.rows("det_worst_images", {"cells": [c.cell_id for c in contrasts],
                                                   "per_cell": worst_per_cell}):
            changed.setdefault(d.pop("cell_id"), []).append(d)
        for c in contrasts:
            if c.cell_id in det_stats:
                c.detection = _detection_contrast(det_stats[c.cell_id])
                c.detection.changed_images = changed.get(c.cell_id, [])

    if contrasts and "outputs" in {r[0] for r in con.execute("DESCRIBE rows").fetchall()}:
        by_cell: dict[str, list[dict[str, Any]]] = {}
        for d in stored.rows("output_worst", {"cells": [c.cell_id for c in contrasts]}):
            by_cell.setdefault(d.pop("cell_id"), []).append(d)
        for c in contrasts:
            c.outputs = by_cell.get(c.cell_id, [])
    accuracy = _accuracy(con, stored, manifest, cells, axes, ref, contrasts)
    detection_accuracy = (_detection_accuracy(con, run, manifest, ref, contrasts, map_resamples)
                          if task == "detection" else None)
    attribution = main_effects(stored.rows("cell_moments"), cells, axes,
                               {a: ref[a] for a in axes})
    eta, inter = attribution.main, attribution.interactions
    mismatches: dict[str, dict[str, Any]] = {}
    for c, s in ((c, s) for c in cells for s in parts.get(c["cell_id"], [])):
        asked = c.get("precision") or "fp32"
        if s["precision_effective"] and not s["precision_effective"].startswith(asked):
            setting = " ".join(f"{a}={c[a]}" for a in axes
                               if AXES[a].stage == "infer" and c[a] is not None)
            m = mismatches.setdefault(setting, {"label": setting, "asked": asked,
                                                "effective": s["precision_effective"], "cells": 0})
            m["cells"] += 1
    status = stored.rows("row_status")
    counters = manifest.get("counters", {})
    return Explanation(
        run_id=manifest["run_id"], spec_name=manifest["spec"]["name"],
        reference=manifest.get("reference", ""), images=manifest.get("images", 0),
        cells=len(cells), status=status, contrasts=contrasts, eta_squared=eta,
        interactions=inter, precision_mismatches=list(mismatches.values()),
        skipped={c["label"]: c["skip_reason"] for c in cells if c["status"] == "skipped"},
        determinism={k: counters.get(k, 0) for k in
                     ("determinism_checks", "determinism_mismatches", "determinism_max_abs")},
        task=task, detection_rules=dict((manifest.get("model") or {}).get("detection") or {}),
        explained=attribution.explained, share_scale=attribution.scale, nested=attribution.nested,
        nodes_differ=nodes_differ(manifest), nodes=_node_count(con, stored), accuracy=accuracy,
        detection_accuracy=detection_accuracy)


def _detection_accuracy(con: duckdb.DuckDBPyConnection, run: RunDir, manifest: dict[str, Any],
                        ref: dict[str, Any], contrasts: list[Contrast], resamples: int
                        ) -> dict[str, Any] | None:
    """A detector's mAP per cell against the run's ground truth: each contrast gets its
    ``CellMap`` (paired change, points); returned: the reference's mAP and the coverage. None
    when the run has no detection ground truth."""
    maps = register_detection_accuracy(con, run, resamples=resamples)
    if maps is None:
        return None
    for c in contrasts:
        c.map = maps.get(c.cell_id)
    r = maps.get(ref["cell_id"])
    coverage = ((manifest.get("dataset") or {}).get("labels")) or {}
    return {"reference_map": r.map if r else None, "reference_map50": r.map50 if r else None,
            "reference_n": r.n if r else 0, "labelled_images": coverage.get("labelled", 0),
            "images": coverage.get("images", manifest.get("images", 0)),
            "boxes": coverage.get("boxes"), "source": coverage.get("source"),
            "format": coverage.get("format"), "resamples": resamples,
            "cells": {cid: {"n": m.n, "map": m.map, "map50": m.map50, "tp": m.tp, "fp": m.fp,
                            "fn": m.fn} for cid, m in maps.items()}}


def _accuracy(con: duckdb.DuckDBPyConnection, stored: Summary, manifest: dict[str, Any],
              cells: list[dict[str, Any]], axes: list[str], ref: dict[str, Any],
              contrasts: list[Contrast]) -> dict[str, Any] | None:
    """Accuracy against the labels, where the rows carry them: each contrast gets its paired
    change (points); returned: the reference's accuracy, the labelled images and the type-II
    shares of correctness per factor. None when no image is labelled."""
    columns = {r[0] for r in con.execute("DESCRIBE rows").fetchall()}
    if not {"label", "correct_top1", "correct_top5"} <= columns:
        return None
    acc = accuracy_by_cell(stored.rows)
    if not any(a.n_labelled for a in acc.values()):
        return None
    for c in contrasts:
        a = acc.get(c.cell_id)
        if a is None or a.top1 is None or not a.top1.n:
            continue
        t1, t5 = a.top1, a.top5
        c.acc_n, c.acc_ref, c.acc, c.acc_delta = t1.n, t1.acc_ref, t1.acc_cell, t1.delta
        c.acc_ci_low, c.acc_ci_high, c.acc_p = t1.ci_low, t1.ci_high, t1.p_value
        c.acc_right_to_wrong, c.acc_wrong_to_right = t1.right_to_wrong, t1.wrong_to_right
        c.acc_unpaired = a.n_unpaired
        if t5.n:
            c.acc_top5_delta, c.acc_top5_ci_low, c.acc_top5_ci_high = t5.delta, t5.ci_low, t5.ci_high
    r: CellAccuracy | None = acc.get(ref["cell_id"])
    shares = correctness_shares(acc, cells, axes, {a: ref[a] for a in axes})
    coverage = ((manifest.get("dataset") or {}).get("labels")) or {}
    return {"reference_top1": r.top1_points if r else None,
            "reference_top5": r.top5_points if r else None,
            "reference_n": r.n if r else 0,
            "reference_top1_right": r.top1_right if r else 0,
            "reference_top5_right": r.top5_right if r else 0,
            "labelled_images": coverage.get("labelled", r.n_labelled if r else 0),
            "images": coverage.get("images", manifest.get("images", 0)),
            "source": coverage.get("source"), "format": coverage.get("format"),
            "shares": shares.main, "shares_explained": shares.explained,
            "shares_scale": shares.scale, "shares_nested": shares.nested,
            "cells": {cid: {"n": a.n, "top1": a.top1_points, "top5": a.top5_points}
                      for cid, a in acc.items()}}


def nodes_differ(manifest: dict[str, Any]) -> dict[str, list[str]]:
    """The environment sections (cpu, packages, libjpeg, gpu) in which the run's nodes differ."""
    nodes = manifest.get("nodes") or {}
    return {sec: sorted(nodes) for sec in ("cpu", "packages", "libjpeg", "gpu", "python")
            if len({json.dumps(env.get(sec), sort_keys=True) for env in nodes.values()}) > 1}


NODE_NOT_RANKED = ("nodes process disjoint chunks, i.e. different images, so a node 'share' "
                   "would measure how those images differ, not the node")


def _node_count(con: duckdb.DuckDBPyConnection, stored: Summary) -> int:
    """How many nodes computed the rows (0 for runs whose rows do not name their node)."""
    if "node" not in {r[0] for r in con.execute("DESCRIBE rows").fetchall()}:
        return 0
    return int(stored.rows("node_counts")[0]["nodes"] or 0)


def _parts(stats: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """``cell_stats`` rows by cell: one part per precision the cell's measured rows ran at, most
    rows first (parts without a measured row, such as error rows, dropped unless alone)."""
    by_cell: dict[str, list[dict[str, Any]]] = {}
    for s in stats:
        by_cell.setdefault(s["cell_id"], []).append(s)
    return {cid: sorted([p for p in ps if p["n"]] or ps[:1],
                        key=lambda p: (-int(p["n"] or 0), str(p["precision_effective"])))
            for cid, ps in by_cell.items()}


def main_effects(moments: list[dict[str, Any]], cells: list[dict[str, Any]], axes: list[str],
                 reference: dict[str, Any] | None = None) -> Attribution:
    """Type-II shares per factor and the strongest two-factor interactions (``dmx.analysis.effects``)
    from each cell's count, mean and within-cell sum of squares of the cosine distance
    (``sql/cell_moments.sql``); axes that apply to some cells only are nested."""
    levels = {c["cell_id"]: c for c in cells}
    stats = [CellStat({a: levels[m["cell_id"]][a] for a in axes}, int(m["n"]), float(m["mean"]),
                      float(m["ssw"])) for m in moments if m["cell_id"] in levels]
    return attribute(stats, axes, reference)
