"""``dmx report``: one self-contained HTML page about a run.

Sections (each an element id): ``summary`` (run, spec, reference, counts, environment),
``ranking`` (one-factor contrasts as a log-scale bar chart), ``interactions`` (mean cosine
distance for every pair of factor levels), ``distributions`` (per-row cosine distance and max
abs per level of each varying factor), ``images`` (the most divergent images: reference and
variant model input, amplified difference, top-5 of each), ``gate`` (``dmx check`` with the
run's tolerances) and ``notes`` (skipped cells, errors, precision asked vs run).

Charts are drawn with matplotlib's Agg canvas (no pyplot, no global backend) and inlined as
base64 PNG; the page loads nothing from outside itself.
"""
from __future__ import annotations

import base64
import datetime as dt
import io
import itertools
import json
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import duckdb
import numpy as np
from matplotlib.colors import ListedColormap, LogNorm
from matplotlib.figure import Figure
from matplotlib.transforms import blended_transform_factory

from dmx.matrix.axes import AXES
from dmx.results.store import RunDir

from . import pictures
from .check import CHECK_WORDS, CheckError, CheckResult, check_run, describe_failure
from .db import load_sql, open_run
from .detection_accuracy import DEFAULT_RESAMPLES
from .explain import Explanation, explain_run
from .layer_curve import layer_curve_section
from .numbers import g, pct
from .paired import format_p
from .panels import (BOX_ROWS, COS_ROUNDING, SAMPLE_POINTS, Panel, level_pair_means, panels,
                     panels_from_tables, varying_axes)
from .queries import query_dicts
from .summary import Summary

DPI = 110
TOP_IMAGES = 6
GATE_ROWS = 10
DIFF_GAIN = 10.0
FACTOR_COLOURS = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1",
                  "#ff9da7", "#9c755f", "#bab0ac")


_TEMPLATES = None


def _template(name: str):
    """A Jinja2 template from ``analysis/templates`` (HTML autoescaped: values are data)."""
    global _TEMPLATES
    if _TEMPLATES is None:
        import jinja2
        _TEMPLATES = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(Path(__file__).with_name("templates"))),
            autoescape=jinja2.select_autoescape(["html", "j2"]), undefined=jinja2.StrictUndefined,
            trim_blocks=False)
    return _TEMPLATES.get_template(name)


def write_report(run_dir: str | Path, out_html: str | Path,
                 map_resamples: int = DEFAULT_RESAMPLES) -> Path:
    """Write the report of the run in ``run_dir`` to ``out_html``; returns its path.
    ``map_resamples``: the bootstrap's resamples for a detector's mAP change."""
    out = Path(out_html)
    page = build_report(run_dir, map_resamples)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out


def build_report(run_dir: str | Path, map_resamples: int = DEFAULT_RESAMPLES) -> str:
    """The report page as one HTML string."""
    manifest = RunDir(run_dir).read_manifest()
    e = explain_run(run_dir, map_resamples=map_resamples)
    con = open_run(run_dir)
    stored = Summary(con, RunDir(run_dir))
    axes = varying_axes(con)
    order = _level_order(manifest, axes)
    tables = [stored.table(n) for n in ("report_pairs", "report_levels", "report_points")]
    if all(t is not None for t in tables):    # the panels kept when the run was compacted
        pairs, per_axis = tables[0].to_pylist(), panels_from_tables(tables[1], tables[2])
    else:
        pairs, per_axis = level_pair_means(con, axes), panels(con, axes)
    try:
        gate: CheckResult | str = check_run(run_dir, map_resamples=map_resamples)
    except CheckError as err:  # a bad check: section must not cost the user the whole report
        gate = str(err)
    sections = [
        _summary(manifest, e, con),
        _ranking(e),
        _interactions(pairs, axes, order, e),
        _distributions(per_axis, axes, order),
        _images(con, e, manifest),
        _gate(gate, run_dir, e),
        layer_curve_section(run_dir),  # only when dmx localize has run on this run
        _notes(e, stored.rows("report_error_images")),
    ]
    title = f"dmx report - {manifest['spec']['name']} ({manifest['run_id']})"
    nav = (("summary", "Run"), ("ranking", "Ranking"), ("interactions", "Interactions"),
           ("distributions", "Distributions"), ("images", "Images"), ("gate", "Gate"),
           *((("layers", "Layers"),) if sections[-2] else ()), ("notes", "Notes"))
    return _template("report.html.j2").render(
        title=title, nav=nav, sections=sections, version=_dmx_version(),
        written=f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M}")


# ---------------------------------------------------------------- queries (identifiers validated)



def _level_order(manifest: dict[str, Any], axes: Iterable[str]) -> dict[str, list[str]]:
    """Levels per axis in the spec's order."""
    spec_axes = manifest.get("spec", {}).get("axes", {})
    return {a: [str(v) if not isinstance(v, dict) else str(v.get("name")) for v in spec_axes.get(a, [])]
            for a in axes}


def _sorted_levels(levels: Iterable[str], order: list[str]) -> list[str]:
    rank = {v: i for i, v in enumerate(order)}
    return sorted(set(levels), key=lambda v: (rank.get(v, len(rank)), v))


# ---------------------------------------------------------------- sections

def _summary(manifest: dict[str, Any], e: Explanation, con: duckdb.DuckDBPyConnection) -> str:
    spec = manifest.get("spec", {})
    model = manifest.get("model", {})
    env = manifest.get("environment", {})
    cells = {d["status"]: d["n"] for d in query_dicts(con, load_sql("cell_counts"))}
    rows = " | ".join(f"{s['status']}{'/' + s['error_stage'] if s['error_stage'] else ''} {s['n']}"
                      for s in e.status)
    axes = [f"{a} ({len(v)})" for a, v in spec.get("axes", {}).items()]
    pre = model.get("preprocess") or {}
    isa = env.get("cpu", {}).get("isa", {})
    packages = env.get("packages", {})
    items = [
        ("Run", f"{manifest['run_id']} - {manifest.get('status', '?')}, started "
                f"{str(manifest.get('started', '?'))[:19]}, {g(manifest.get('wall_s'))} s"),
        ("Spec", f"{spec.get('name')} (digest {manifest.get('spec_digest', '?')})"),
        ("Axes", None),
        ("Model", f"{model.get('name') or 'user model'} ({model.get('task', '?')}); input "
                  f"{pre.get('mode', '?')} {pre.get('resize', '')}->{pre.get('crop', '')} px"),
        ("Reference", manifest.get("reference", "")),
        ("Counts", f"{manifest.get('images', 0)} images x {e.cells} cells "
                   f"({', '.join(f'{n} {s}' for s, n in cells.items())}); rows: {rows}"),
        ("Machine", f"{env.get('cpu', {}).get('model', '?')}, {env.get('cpu', {}).get('count', '?')} "
                    f"CPUs; ISA: {' '.join(k for k, v in isa.items() if v) or '-'}"),
        ("Packages", ", ".join(f"{k} {v}" for k, v in packages.items())),
        ("libjpeg", ", ".join(f"{k}: {v}" for k, v in env.get("libjpeg", {}).items())),
    ]
    return _template("summary.html.j2").render(items=items, axes=axes)


def ranking_chart_rows(e: Explanation) -> list[dict[str, Any]]:
    """The numbers the ranking chart draws, one row per contrast in explain's ranking order:
    ``median`` (the bar: a typical image), ``max`` (the marker: the worst image), top-1 flips,
    max abs, and the annotation printed beside the bar. A contrast is drawn as "(identical
    outputs)" only when no image moved at all: no top-1 flip, max abs 0, worst cosine distance at
    float rounding. A typical image at 0 with a worst image far off is "rare but large", as in
    ``dmx explain``."""
    out = []
    for r in e.ranking():
        median, worst = r["effect"], r["cosine_distance_max"]
        if median is None or (isinstance(median, float) and math.isnan(median)):
            continue
        flips, max_abs = r["top1_disagreement"], r["max_abs_max"]
        identical = (not flips and not max_abs and (worst is None or worst <= COS_ROUNDING))
        text = (f"median {_cos(median)}   max {_cos(worst)}   top-1 flips "
                f"{'-' if flips is None else pct(flips)}   max abs {g(max_abs)}")
        if r.get("precision_effective") and r["precision_effective"] != "fp32":
            text += f"   ran {r['precision_effective']}"
        if identical:
            text += "   (identical outputs)"
        elif r["rare_but_large"] or (median <= COS_ROUNDING and (flips or max_abs)):
            text += "   (rare but large)"
        out.append({"factor": r["factor"], "level": r["level"], "detail": r["detail"],
                    "cell_id": r["cell_id"], "median": median, "max": worst,
                    "top1_flips": flips, "max_abs_max": max_abs, "n": r["n"],
                    "rare_but_large": bool(r["rare_but_large"]), "identical": identical,
                    "annotation": text})
    return out


def _ranking(e: Explanation) -> str:
    chart_rows = ranking_chart_rows(e)
    if not chart_rows:
        return _template("ranking.html.j2").render(rows=[], chart="", data="")
    labels = [f"{r['factor']} = {r['level']}" + (f"  ({r['detail']})" if r["detail"] else "")
              for r in chart_rows]
    medians = np.array([r["median"] for r in chart_rows], dtype=float)
    worst = np.array([r["max"] if r["max"] is not None else np.nan for r in chart_rows], dtype=float)
    both = np.concatenate([medians, worst])
    floor = _log_floor(both[np.isfinite(both) & (both > COS_ROUNDING)])
    shown = np.where(medians > COS_ROUNDING, medians, floor)
    shown_max = np.where(np.isfinite(worst) & (worst > COS_ROUNDING), worst, floor)
    factors = list(dict.fromkeys(r["factor"] for r in chart_rows))
    colours = [FACTOR_COLOURS[factors.index(r["factor"]) % len(FACTOR_COLOURS)] for r in chart_rows]
    fig = Figure(figsize=(11, 0.42 * len(chart_rows) + 1.2))
    ax = fig.add_subplot()
    y = np.arange(len(chart_rows))
    ax.barh(y, shown - floor, left=floor, color=colours, height=0.65, label="median (typical image)")
    ax.scatter(shown_max, y, marker="D", s=28, color="#222", zorder=3, label="max (worst image)")
    ax.set_xscale("log")
    ax.set_xlim(floor, max(float(max(shown.max(), shown_max.max())) * 3, floor * 10))
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    ax.set_xlabel("cosine distance of logits vs reference (bar: median over images; diamond: max; "
                  "log scale)")
    ax.legend(loc="lower right", fontsize=8, frameon=False)
    ax.grid(axis="x", which="major", alpha=0.3)
    right = blended_transform_factory(ax.transAxes, ax.transData)
    for yi, r in zip(y, chart_rows):
        ax.text(1.01, yi, r["annotation"], transform=right, va="center", fontsize=8.5)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    by_cell = {r["cell_id"]: r for r in e.ranking()}
    rows = [{"factor": r["factor"], "level": r["level"], "detail": r["detail"], "n": r["n"],
             "median_text": _cos(r["median"]), "max_text": _cos(r["max"]),
             "flips_text": pct(r["top1_flips"]), "max_abs_text": g(r["max_abs_max"]),
             "max_abs_p95_text": g(by_cell[r["cell_id"]]["max_abs_p95"]),
             "px_text": g(by_cell[r["cell_id"]]["px_mean_abs"]),
             "ran": by_cell[r["cell_id"]].get("precision_effective") or "-",
             "accuracy_text": (by_cell[r["cell_id"]].get("map_text") or "-"
                               if e.detection_accuracy is not None
                               else _accuracy_cell(by_cell[r["cell_id"]]))} for r in chart_rows]
    data = json.dumps(chart_rows, default=str).replace("</", "<\\/")
    chart = _img(fig, "factor ranking: bar = median cosine distance over images, diamond = "
                      "max (worst image)", "chart-ranking")
    return _template("ranking.html.j2").render(rows=rows, chart=chart, data=data,
                                               accuracy=e.accuracy is not None,
                                               detection_accuracy=e.detection_accuracy)


def _accuracy_cell(r: dict[str, Any]) -> str:
    """A ranking row's top-1 change against the reference: ``-0.41 [-0.66, -0.17] pts, 52 ->
    11, p = 3e-7`` (explain's numbers, the same digits), or '-' without labels."""
    if not r.get("accuracy_n"):
        return "-"
    lo, hi = r["accuracy_ci"]
    return (f"{r['accuracy_delta']:+.2f} [{lo:+.2f}, {hi:+.2f}] pts (n = {r['accuracy_n']}, "
            f"{r['right_to_wrong']} right->wrong, {r['wrong_to_right']} wrong->right, "
            f"p = {format_p(r['accuracy_p'])})")


def _interactions(data: list[dict[str, Any]], axes: list[str], order: dict[str, list[str]],
                  e: Explanation) -> str:
    if len(axes) < 2 or not data:
        return _template("interactions.html.j2").render(chart=None)
    levels = [(a, lv) for a in axes
              for lv in _sorted_levels((d["la"] for d in data if d["a"] == a and d["b"] is None), order[a])]
    index = {k: i for i, k in enumerate(levels)}
    m = np.full((len(levels), len(levels)), np.nan)
    for d in data:
        i = index.get((d["a"], d["la"]))
        j = index.get((d["b"], d["lb"])) if d["b"] else i
        if i is not None and j is not None:
            m[i, j] = m[j, i] = d["mean"]
    positive = m[np.isfinite(m) & (m > COS_ROUNDING)]
    floor = _log_floor(positive) if positive.size else 1e-12
    m[np.triu_indices(len(levels), k=1)] = np.nan  # symmetric: the lower triangle says it all
    shown = np.where(np.isfinite(m), np.where(m > COS_ROUNDING, m, floor), np.nan)
    size = 1.1 + 0.55 * len(levels)
    fig = Figure(figsize=(size + 2.8, size))
    ax = fig.add_subplot()
    lower = np.tril(np.ones(m.shape, dtype=bool))
    never = np.ma.masked_where(~(lower & ~np.isfinite(m)), np.ones(m.shape))
    ax.imshow(never, cmap=ListedColormap(["#e3e3e3"]))  # same factor, or a pair that never occurs
    vmax = float(np.nanmax(shown)) if np.isfinite(shown).any() else 1.0
    im = ax.imshow(np.ma.masked_invalid(shown), cmap="viridis",
                   norm=LogNorm(vmin=floor, vmax=max(vmax, floor * 10)))
    names = [f"{a}={lv}" for a, lv in levels]
    ax.set_xticks(range(len(levels)), names, rotation=40, ha="right", fontsize=8.5)
    ax.set_yticks(range(len(levels)), names, fontsize=8.5)
    bounds = np.cumsum([sum(1 for a2, _ in levels if a2 == a) for a in axes])[:-1] - 0.5
    for b in bounds:
        ax.axhline(b, color="white", lw=2.5)
        ax.axvline(b, color="white", lw=2.5)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    if len(levels) <= 24:
        for i, j in itertools.product(range(len(levels)), repeat=2):
            if np.isfinite(m[i, j]):
                dark = shown[i, j] < math.sqrt(floor * max(vmax, floor * 10))
                ax.text(j, i, _cos(m[i, j], 2), ha="center", va="center", fontsize=7,
                        color="white" if dark else "black")
    fig.colorbar(im, ax=ax, shrink=0.8, label="mean cosine distance (log)")
    nested = [f"{a} within {', '.join(f'{p}={v}' for p, vs in w.items() for v in vs)}"
              for a, w in e.nested.items() if w]
    return _template("interactions.html.j2").render(
        chart=_img(fig, "level by level mean cosine distance", "chart-interactions"),
        main=[(a, g(v, 2)) for a, v in e.eta_squared.items()],
        interactions=[(" x ".join(i["factors"]), g(i["eta_squared"], 2)) for i in e.interactions[:5]],
        explained=g(e.explained, 2), nested=nested,
        scale=g(e.share_scale, 2) if e.share_scale < 1 else None)


def _distributions(per_axis: dict[str, dict[str, Panel]], axes: list[str],
                   order: dict[str, list[str]]) -> str:
    """Per level of each varying axis: boxes over every row, a sample of the points, counts -
    all from DuckDB aggregates (``panels``; a run of 64 M rows draws in the time of a few queries,
    a compacted one from its summary)."""
    section = _template("distributions.html.j2")
    shown = [(axis, per_axis[axis]) for axis in axes
             if axis in per_axis and per_axis[axis]["cos_dist"][1]]
    if not shown:
        return section.render(chart=None, rounding=g(COS_ROUNDING), box_rows=f"{BOX_ROWS:,}",
                              points=SAMPLE_POINTS)
    heights = [len(k["cos_dist"][1]) for _, k in shown]
    fig = Figure(figsize=(12, 0.42 * sum(heights) + 1.0 * len(shown) + 0.4))
    grid = fig.add_gridspec(len(shown), 2, height_ratios=[h + 1.4 for h in heights], hspace=0.6,
                            wspace=0.12)
    rng = np.random.default_rng(0)
    for row, (axis, per_key) in enumerate(shown):
        levels = _sorted_levels(per_key["cos_dist"][1], order[axis])
        for col, (key, xlabel, zero) in enumerate(_PANEL_METRICS):
            floor, stats, points = per_key[key]
            ax = fig.add_subplot(grid[row, col])
            y = np.arange(len(levels))
            boxes = [{"med": st["med"], "q1": st["q1"], "q3": st["q3"], "whislo": st["whislo"],
                      "whishi": st["whishi"], "fliers": []} if (st := stats.get(lv)) else
                     {"med": np.nan, "q1": np.nan, "q3": np.nan, "whislo": np.nan,
                      "whishi": np.nan, "fliers": []} for lv in levels]
            ax.bxp(boxes, positions=y, orientation="horizontal", widths=0.6, showfliers=False,
                   patch_artist=True, boxprops={"facecolor": "#f1f3f5", "edgecolor": "#666"},
                   medianprops={"color": "#222"}, whiskerprops={"color": "#666"},
                   capprops={"color": "#666"})
            for yi, lv in zip(y, levels):
                p = points.get(lv, np.zeros((0, 2)))
                v, sm = p[:, 0], p[:, 1].astype(bool)
                jitter = yi + rng.uniform(-0.24, 0.24, v.size)
                ax.scatter(v[sm], jitter[sm], s=7, color="#4e79a7", alpha=0.45, linewidths=0)
                ax.scatter(v[~sm], jitter[~sm], s=7, color="#e15759", alpha=0.45, linewidths=0)
            top = max((st["hi"] for st in stats.values() if st["hi"] is not None), default=1.0)
            ax.set_xscale("log")
            ax.axvline(floor, color="#999", ls="--", lw=0.8)
            ax.set_xlim(floor / 2, max(float(top) * 2, floor * 10))
            counts = [(stats[lv]["n"], stats[lv]["zeros"]) if lv in stats else (0, 0) for lv in levels]
            if col == 0:
                ax.set_yticks(y, [f"{lv}\n{n} rows, {z} at 0" for lv, (n, z) in zip(levels, counts)],
                              fontsize=8)
                ax.set_ylabel(axis, fontsize=10, fontweight="bold")
            else:
                ax.set_yticks(y, [f"{z} at 0" for _, z in counts], fontsize=8)
                ax.yaxis.tick_right()
            ax.set_ylim(len(levels) - 0.5, -0.5)
            ax.tick_params(axis="x", labelsize=8)
            ax.set_xlabel(xlabel, fontsize=8.5)
            ax.grid(axis="x", alpha=0.25)
    return section.render(chart=_img(fig, "metric distributions per level", "chart-distributions"),
                          rounding=g(COS_ROUNDING), box_rows=f"{BOX_ROWS:,}", points=SAMPLE_POINTS)


_PANEL_METRICS = (("cos_dist", "cosine distance of logits (1 - cos)", COS_ROUNDING),
                  ("max_abs", "max abs difference of logits", 0.0))


def _images(con: duckdb.DuckDBPyConnection, e: Explanation, manifest: dict[str, Any]) -> str:
    section = _template("images.html.j2")

    def empty(why: str) -> str:
        return section.render(gain=g(DIFF_GAIN), empty=why, cards=[])

    if not e.contrasts:
        return empty("No one-factor contrast in this run.")
    rows = query_dicts(con, load_sql("report_divergent_rows"),
                       {"cells": [c.cell_id for c in e.contrasts], "limit": 20 * TOP_IMAGES})
    chosen = pick_divergent(rows, TOP_IMAGES)
    if not chosen:
        return empty("No contrast row diverges from the reference.")
    cells = {c["cell_id"]: c for c in query_dicts(con, "SELECT * FROM cells")}
    ref = next(c for c in cells.values() if c["is_reference"])
    contrast = {c.cell_id: c for c in e.contrasts}
    labels = pictures.class_labels(manifest.get("model", {}))
    try:
        pre = pictures.preprocess_from_manifest(manifest["model"]["preprocess"])
    except (KeyError, TypeError, ValueError) as err:
        return empty(f"No preprocessing recorded in the manifest ({err}).")
    cache: dict[tuple, np.ndarray | str] = {}
    cards = [_image_card(r, cells[r["cell_id"]], ref, contrast[r["cell_id"]], labels, pre, cache)
             for r in chosen]
    return section.render(gain=g(DIFF_GAIN), empty=None, cards=cards)


def pick_divergent(rows: list[dict[str, Any]], n: int, per_cell: int = 2) -> list[dict[str, Any]]:
    """Up to ``n`` of ``rows`` (most divergent first): the worst row of each cell first, then
    more rows of the same cells (at most ``per_cell`` each), preferring images not yet shown.
    Rows with zero divergence are left out. Returned most divergent first."""
    rows = [r for r in rows if (r["cos_dist"] or 0) > 0 or (r["max_abs"] or 0) > 0]
    chosen: list[dict[str, Any]] = []
    for cap, fresh_only in ((1, True), (1, False), (per_cell, True), (per_cell, False)):
        for r in rows:
            if len(chosen) >= n:
                break
            if any(r is c for c in chosen) or sum(c["cell_id"] == r["cell_id"] for c in chosen) >= cap:
                continue
            if fresh_only and any(c["image_id"] == r["image_id"] for c in chosen):
                continue
            chosen.append(r)
    order = {id(r): i for i, r in enumerate(rows)}
    return sorted(chosen, key=lambda r: order[id(r)])


def _render(path: str | None, factors: dict[str, Any], pre: Any, cache: dict) -> np.ndarray | str:
    key = (path, tuple(sorted((k, v) for k, v in factors.items() if k in AXES)))
    if key not in cache:
        if not path:
            cache[key] = "no path recorded for this image"
        else:
            try:
                cache[key] = pictures.model_input(path, factors, pre)
            except pictures.PictureError as err:
                cache[key] = str(err)
    return cache[key]


def _image_card(r: dict[str, Any], cell: dict[str, Any], ref: dict[str, Any], c: Any,
                labels: Sequence[str] | None, pre: Any, cache: dict) -> dict[str, Any]:
    """One image card's data for ``templates/images.html.j2``."""
    props = [p for p in (r.get("subsampling"), "progressive" if r.get("progressive") else None,
                         f"EXIF orientation {r['exif_orientation']}"
                         if r.get("exif_orientation") not in (None, 1) else None,
                         r.get("color_mode") if r.get("color_mode") not in (None, "RGB") else None,
                         f"decoded {r['decoded_w']}x{r['decoded_h']} vs reference "
                         f"{r['ref_decoded_w']}x{r['ref_decoded_h']}" if r.get("shape_match") is False
                         else None) if p]
    a = _render(r["path"], ref, pre, cache)
    b = _render(r["path"], cell, pre, cache)
    figs: list[dict[str, Any]] = []
    note = None
    if isinstance(a, str) or isinstance(b, str):
        note = a if isinstance(a, str) else b
    else:
        figs.append({"kind": "reference", "src": _png(pictures.to_uint8(a))})
        figs.append({"kind": "variant", "src": _png(pictures.to_uint8(b))})
        if a.shape != b.shape:
            note = f"inputs differ in shape: {a.shape} vs {b.shape}"
        else:
            d = np.abs(a - b)
            if not d.any():
                figs.append({"kind": "same"})
            else:
                gain = diff_gain(float(d.max()))
                figs.append({"kind": "diff", "gain": g(gain), "max": g(float(d.max())),
                             "src": _png(pictures.difference_map(a, b, gain))})
            seen = float(d.max())
            if r.get("px_max_abs") is not None and abs(seen - r["px_max_abs"]) > 0.5:
                note = (f"Re-rendered here, the inputs differ by {g(seen)} at most; the run "
                        f"measured {g(r['px_max_abs'])}: this machine decodes or resizes "
                        "differently from the one that made the run.")
    width = 224 if pre.crop <= 224 else min(pre.crop, 320)  # CSS px; small inputs drawn pixelated
    return {
        "image_id": r["image_id"], "level": f"{c.factor} = {c.level}" + (f" ({c.detail})" if c.detail else ""),
        "flip": ((_label(r["ref_top1"], labels), _label(r["top1"], labels))
                 if r["top1"] != r["ref_top1"] else None),
        "cos_dist": g(r["cos_dist"]), "max_abs": g(r["max_abs"]), "rel_l2": g(r["rel_l2"]),
        "px_max": g(r["px_max_abs"]), "px_mean": g(r["px_mean_abs"]), "props": ", ".join(props),
        "note": note, "figs": figs, "width": width, "pixelated": pre.crop < width,
        "top5": [t for t in (_top5("reference", r["ref_top5"], r["ref_top5_prob"], labels, r["top1"]),
                             _top5("variant", r["top5"], r["top5_prob"], labels, r["ref_top1"])) if t],
    }


def diff_gain(max_diff: float) -> float:
    """Amplification of a difference image: ``DIFF_GAIN``, or more for faint differences so that
    the largest one is drawn at full brightness (max_diff in 0-255 units)."""
    return DIFF_GAIN if max_diff * DIFF_GAIN >= 255 else 255.0 / max_diff


def _label(i: int | None, labels: Sequence[str] | None) -> str:
    if i is None:
        return "-"
    name = labels[i] if labels and 0 <= i < len(labels) else None
    return f"{i} {name}" if name else str(i)


def _top5(title: str, classes: Sequence[int] | None, probs: Sequence[float] | None,
          labels: Sequence[str] | None, other_top1: int | None) -> dict[str, Any] | None:
    """A top-5 table's data: (class label, probability text, is the other pipeline's top-1)."""
    if not classes:
        return None
    return {"title": title,
            "rows": [(_label(k, labels), pct(p) if p is not None else "-", k == other_top1)
                     for k, p in zip(classes, probs or [None] * len(classes))]}


def _gate(r: CheckResult | str, run_dir: str | Path, e: Explanation) -> str:
    if isinstance(r, str):
        return _template("gate.html.j2").render(error=r)
    tol = r.tolerances
    limits = "; ".join(f"{p}: rel L2 ≤ {g(v['max_rel_l2'])}, cosine ≥ {g(v['min_cosine'], 6)}"
                       + (f", max abs ≤ {g(v['max_abs'])}" if v["max_abs"] is not None else "")
                       for p, v in sorted(r.limits_by_precision.items()))
    by_cell: dict[str, list] = {}
    for f in r.failures:
        by_cell.setdefault(f.cell_id, []).append(f)
    by_check: dict[str, int] = {}
    for fs in by_cell.values():
        for f in fs:
            by_check[f.check] = by_check.get(f.check, 0) + 1
    contrast = {c.cell_id for c in e.contrasts}
    shown = sorted(by_cell.values(), key=lambda fs: (fs[0].cell_id not in contrast, -len(fs)))[:GATE_ROWS]
    ref_err = r.reference_errors if r.reference_errors.get("images") else None
    return _template("gate.html.j2").render(
        error=None, verdict="PASS" if r.passed else "FAIL", run_dir=str(run_dir),
        scope=tol["scope"], failing=len(by_cell), judged=r.cells_judged,
        summary=", ".join(f"{CHECK_WORDS[k]}: {n} cells" for k, n in by_check.items()),
        limits=limits, min_top1=g(tol["min_top1_agreement"]),
        precision=("a cell may run at a lower precision than it asked for"
                   if tol["allow_lower_precision"] else "a cell must run at the precision it asked for"),
        reference_errors=ref_err, images=r.images, not_judged=list(r.not_judged_rows.items()),
        rows=[(fs[0].cell, [describe_failure(f) for f in fs]) for fs in shown],
        more=len(by_cell) - GATE_ROWS if len(by_cell) > GATE_ROWS else 0)


def _notes(e: Explanation, error_images: list[dict[str, Any]]) -> str:
    d = e.determinism
    guard = ({"checks": int(d["determinism_checks"]), "mismatches": int(d.get("determinism_mismatches", 0)),
              "max_abs": g(d.get("determinism_max_abs") or 0.0)} if d.get("determinism_checks") else None)
    return _template("notes.html.j2").render(
        mismatches=e.precision_mismatches, skipped=list(e.skipped.items()),
        errors=[s for s in e.status if s["status"] == "error"],
        error_images=error_images, guard=guard)


# ---------------------------------------------------------------- helpers

def _cos(v: float | None, digits: int = 3) -> str:
    """A cosine distance for display: float64 rounding (|v| <= COS_ROUNDING) shown as 0."""
    return "0" if v is not None and abs(v) <= COS_ROUNDING else g(v, digits)


def _log_floor(values: np.ndarray) -> float:
    """A power of ten below the smallest positive value: where zeros are drawn on a log axis."""
    v = values[np.isfinite(values) & (values > 0)] if values.size else values
    if not v.size:
        return 1e-12
    return 10.0 ** (math.floor(math.log10(float(v.min()))) - 1)


def _img(fig: Figure, alt: str, element_id: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return _template("chart.html.j2").render(element_id=element_id, alt=alt,
                                             src=_data_uri(buf.getvalue()))


def _png(rgb: np.ndarray) -> str:
    return _data_uri(pictures.png_bytes(rgb))


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _dmx_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("dmx")
    except PackageNotFoundError:
        return "?"


