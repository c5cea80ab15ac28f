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
import html
import io
import itertools
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import duckdb
import numpy as np
from matplotlib.colors import ListedColormap, LogNorm
from matplotlib.figure import Figure
from matplotlib.transforms import blended_transform_factory

from matrix.axes import AXES
from results.store import RunDir

from . import pictures
from .check import CHECK_WORDS, CheckError, CheckResult, check_run, describe_failure
from .db import load_sql, open_run
from .explain import Explanation, explain_run, query_dicts
from .layer_curve import layer_curve_section
from .render import g, pct

DPI = 110
TOP_IMAGES = 6
GATE_ROWS = 10
DIFF_GAIN = 10.0
COS_ROUNDING = 1e-15  # 1 - cos of two equal float32 vectors, computed in float64, is about 2e-16
FACTOR_COLOURS = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1",
                  "#ff9da7", "#9c755f", "#bab0ac")


def write_report(run_dir: str | Path, out_html: str | Path) -> Path:
    """Write the report of the run in ``run_dir`` to ``out_html``; returns its path."""
    out = Path(out_html)
    page = build_report(run_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out


def build_report(run_dir: str | Path) -> str:
    """The report page as one HTML string."""
    manifest = RunDir(run_dir).read_manifest()
    e = explain_run(run_dir)
    con = open_run(run_dir)
    axes = varying_axes(con)
    order = _level_order(manifest, axes)
    try:
        gate: CheckResult | str = check_run(run_dir)
    except CheckError as err:  # a bad check: section must not cost the user the whole report
        gate = str(err)
    sections = [
        _summary(manifest, e, con),
        _ranking(e),
        _interactions(con, axes, order, e),
        _distributions(con, axes, order),
        _images(con, e, manifest),
        _gate(gate, run_dir, e),
        layer_curve_section(run_dir),  # only when dmx localize has run on this run
        _notes(e, con),
    ]
    title = f"dmx report - {manifest['spec']['name']} ({manifest['run_id']})"
    nav = " ".join(f'<a href="#{sid}">{name}</a>' for sid, name in (
        ("summary", "Run"), ("ranking", "Ranking"), ("interactions", "Interactions"),
        ("distributions", "Distributions"), ("images", "Images"), ("gate", "Gate"),
        *((("layers", "Layers"),) if sections[-2] else ()), ("notes", "Notes")))
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body>"
            f"<header><h1>{_e(title)}</h1><nav>{nav}</nav></header><main>"
            + "".join(sections)
            + f"</main><footer>Written by dmx {_e(_dmx_version())} on "
              f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC. All numbers come from the run's "
              "Parquet files through DuckDB; pictures are re-rendered from the image files.</footer>"
              "</body></html>\n")


# ---------------------------------------------------------------- queries (identifiers validated)

def _ident(axis: str) -> str:
    if axis not in AXES:
        raise ValueError(f"not an axis: {axis}")
    return f'"{axis}"'


def varying_axes(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Axes of the run with more than one non-null level among its cells, in column order."""
    cols = [r[0] for r in con.execute("DESCRIBE cells").fetchall() if r[0] in AXES]
    return [a for a in cols
            if con.execute(f"SELECT count(DISTINCT {_ident(a)}) FROM cells").fetchone()[0] > 1]


def level_values(con: duckdb.DuckDBPyConnection, axis: str) -> list[dict[str, Any]]:
    """Per-row cosine distance (1 - cos), max abs (logits) and ``px_equal`` of every ok,
    non-reference row, with the row's level of ``axis`` (rows where it does not apply left out)."""
    a = _ident(axis)
    return query_dicts(con, f"SELECT {a} AS level, 1 - out_cosine AS cos_dist, "
                            "out_max_abs AS max_abs, coalesce(px_equal, false) AS px_equal "
                            "FROM rows WHERE status = 'ok' AND NOT is_reference "
                            f"AND out_cosine IS NOT NULL AND {a} IS NOT NULL")


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
    axes = " &times; ".join(f"{_e(a)} ({len(v)})" for a, v in spec.get("axes", {}).items())
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
    body = "".join(f"<tr><th>{_e(k)}</th><td>{axes if k == 'Axes' else _e(v)}</td></tr>"
                   for k, v in items)
    return f'<section id="summary"><h2>Run</h2><table class="meta">{body}</table></section>'


def _ranking(e: Explanation) -> str:
    ranking = [r for r in e.ranking() if r["effect"] is not None and not math.isnan(r["effect"])]
    head = ('<section id="ranking"><h2>Which factors move the output</h2><p>Each bar is one level '
            "of one factor, every other factor at the reference: mean cosine distance of the logits "
            "(1 - cos, log scale, 95% interval), labelled with the share of images whose top-1 class "
            "flips.</p>")
    if not ranking:
        return head + ('<p class="empty">No one-factor contrast to rank: no cell that ran differs '
                       "from the reference in exactly one factor.</p></section>")
    by_cell = {c.cell_id: c for c in e.contrasts}
    labels = [f"{r['factor']} = {r['level']}" + (f"  ({r['detail']})" if r["detail"] else "")
              for r in ranking]
    effects = np.array([r["effect"] for r in ranking], dtype=float)
    floor = _log_floor(effects[effects > COS_ROUNDING])
    shown = np.where(effects > COS_ROUNDING, effects, floor)
    factors = list(dict.fromkeys(r["factor"] for r in ranking))
    colours = [FACTOR_COLOURS[factors.index(r["factor"]) % len(FACTOR_COLOURS)] for r in ranking]
    fig = Figure(figsize=(11, 0.42 * len(ranking) + 1.2))
    ax = fig.add_subplot()
    y = np.arange(len(ranking))
    ax.barh(y, shown - floor, left=floor, color=colours, height=0.65)
    lo, hi = [], []
    for r, v in zip(ranking, shown):
        ci = by_cell[r["cell_id"]].cos_dist_ci
        lo.append(v - max(ci[0], floor) if ci else 0.0)
        hi.append(max(ci[1] - v, 0.0) if ci else 0.0)
    ax.errorbar(shown, y, xerr=[np.maximum(lo, 0), hi], fmt="none", ecolor="#333", capsize=2, lw=0.8)
    ax.set_xscale("log")
    ax.set_xlim(floor, max(float(shown.max()) * 3, floor * 10))
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    ax.set_xlabel("cosine distance of logits vs reference (mean over images, log scale)")
    ax.grid(axis="x", which="major", alpha=0.3)
    right = blended_transform_factory(ax.transAxes, ax.transData)
    for yi, r, v in zip(y, ranking, effects):
        flips = "-" if r["top1_disagreement"] is None else pct(r["top1_disagreement"])
        text = f"top-1 flips {flips}   max abs {g(r['max_abs_max'])}"
        if r.get("precision_effective") and r["precision_effective"] != "fp32":
            text += f"   ran {r['precision_effective']}"
        if v <= COS_ROUNDING:
            text += "   (identical outputs)"
        ax.text(1.01, yi, text, transform=right, va="center", fontsize=8.5)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    rows = "".join(
        f"<tr><td>{i}</td><td>{_e(r['factor'])}</td><td>{_e(r['level'])}"
        f"{' <small>(' + _e(r['detail']) + ')</small>' if r['detail'] else ''}</td>"
        f"<td class=num>{_cos(r['effect'])}</td><td class=num>{pct(r['top1_disagreement'])}</td>"
        f"<td class=num>{g(r['max_abs_p95'])}</td><td class=num>{g(r['max_abs_max'])}</td>"
        f"<td class=num>{g(r['px_mean_abs'])}</td><td class=num>{r['n']}</td>"
        f"<td>{_e(r.get('precision_effective') or '-')}</td></tr>"
        for i, r in enumerate(ranking, 1))
    table = ("<table class=data><tr><th>#</th><th>factor</th><th>level</th><th>cos dist</th>"
             "<th>top-1 flips</th><th>max abs p95</th><th>max abs max</th><th>input px mean</th>"
             f"<th>n</th><th>ran</th></tr>{rows}</table>")
    return head + _img(fig, "factor ranking", "chart-ranking") + table + "</section>"


def _interactions(con: duckdb.DuckDBPyConnection, axes: list[str], order: dict[str, list[str]],
                  e: Explanation) -> str:
    head = ('<section id="interactions"><h2>Factor &times; factor</h2><p>Mean cosine distance over '
            "all rows (full factorial, reference cell excluded) that have both levels; the diagonal "
            "is the level alone. A pair far from what its two diagonal entries suggest is an interaction. "
            "Grey: two levels of the same factor, or a pair that never occurs.</p>")
    data = level_pair_means(con, axes)
    if len(axes) < 2 or not data:
        return head + '<p class="empty">Fewer than two factors vary in this run.</p></section>'
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
    eta = ""
    if e.eta_squared:
        cells = "".join(f"<td>{_e(a)} {g(v, 2)}</td>" for a, v in e.eta_squared.items())
        inter = "".join(f"<td>{_e(' x '.join(i['factors']))} {g(i['eta_squared'], 2)}</td>"
                        for i in e.interactions[:5])
        eta = (f"<table class=data><tr><th>main effect (eta&sup2;)</th>{cells}</tr>"
               f"<tr><th>interaction share</th>{inter or '<td>-</td>'}</tr></table>")
    return head + _img(fig, "level by level mean cosine distance", "chart-interactions") + eta + "</section>"


def _distributions(con: duckdb.DuckDBPyConnection, axes: list[str], order: dict[str, list[str]]) -> str:
    head = ('<section id="distributions"><h2>Distributions per level</h2><p>Every ok row of every '
            "cell at that level (the other factors vary; the reference cell left out). Box: quartiles, "
            "whiskers 1.5 IQR. Dots: rows, <b style='color:#e15759'>red</b> where the model input "
            "differs from the reference's, <b style='color:#4e79a7'>blue</b> where it is bit-identical "
            "(only backend and precision act). Log scale; rows at 0 sit on the dashed line (cosine "
            f"distances below {g(COS_ROUNDING)} are float64 rounding and count as 0).</p>")
    panels = [(a, level_values(con, a)) for a in axes]
    panels = [(a, v) for a, v in panels if v]
    if not panels:
        return head + '<p class="empty">No factor varies, or no row has an output divergence.</p></section>'
    heights = [len({d["level"] for d in v}) for _, v in panels]
    fig = Figure(figsize=(12, 0.42 * sum(heights) + 1.0 * len(panels) + 0.4))
    grid = fig.add_gridspec(len(panels), 2, height_ratios=[h + 1.4 for h in heights], hspace=0.6,
                            wspace=0.12)
    rng = np.random.default_rng(0)
    for row, (axis, values) in enumerate(panels):
        levels = _sorted_levels((d["level"] for d in values), order[axis])
        for col, (key, xlabel, zero) in enumerate((
                ("cos_dist", "cosine distance of logits (1 - cos)", COS_ROUNDING),
                ("max_abs", "max abs difference of logits", 0.0))):
            ax = fig.add_subplot(grid[row, col])
            per = [[d for d in values if d["level"] == lv and d[key] is not None and math.isfinite(d[key])]
                   for lv in levels]
            vals = [np.array([d[key] for d in p], dtype=float) for p in per]
            same = [np.array([bool(d["px_equal"]) for d in p], dtype=bool) for p in per]
            allv = np.concatenate(vals)
            floor = _log_floor(allv[allv > zero]) if (allv > zero).any() else 1e-12
            shown = [np.where(v > zero, v, floor) for v in vals]
            y = np.arange(len(levels))
            ax.boxplot([v if v.size else [np.nan] for v in shown], positions=y, orientation="horizontal",
                       widths=0.6, showfliers=False, patch_artist=True,
                       boxprops={"facecolor": "#f1f3f5", "edgecolor": "#666"},
                       medianprops={"color": "#222"}, whiskerprops={"color": "#666"},
                       capprops={"color": "#666"})
            for yi, v, sm in zip(y, shown, same):
                jitter = yi + rng.uniform(-0.24, 0.24, v.size)
                ax.scatter(v[sm], jitter[sm], s=7, color="#4e79a7", alpha=0.45, linewidths=0)
                ax.scatter(v[~sm], jitter[~sm], s=7, color="#e15759", alpha=0.45, linewidths=0)
            ax.set_xscale("log")
            ax.axvline(floor, color="#999", ls="--", lw=0.8)
            ax.set_xlim(floor / 2, max(float(allv.max()) * 2 if allv.size else 1.0, floor * 10))
            zeros = [int((v <= zero).sum()) for v in vals]
            if col == 0:
                ax.set_yticks(y, [f"{lv}\n{v.size} rows, {z} at 0" for lv, v, z in zip(levels, vals, zeros)],
                              fontsize=8)
                ax.set_ylabel(axis, fontsize=10, fontweight="bold")
            else:
                ax.set_yticks(y, [f"{z} at 0" for z in zeros], fontsize=8)
                ax.yaxis.tick_right()
            ax.set_ylim(len(levels) - 0.5, -0.5)
            ax.tick_params(axis="x", labelsize=8)
            ax.set_xlabel(xlabel, fontsize=8.5)
            ax.grid(axis="x", alpha=0.25)
    return head + _img(fig, "metric distributions per level", "chart-distributions") + "</section>"


def _images(con: duckdb.DuckDBPyConnection, e: Explanation, manifest: dict[str, Any]) -> str:
    head = ('<section id="images"><h2>The images that diverge most</h2><p>The rows of the one-factor '
            "contrasts with the largest cosine distance. Model inputs are re-rendered from the image "
            "file with the cell's decoder, EXIF handling and resize (0-255, before normalisation); "
            f"the difference is max over RGB of |reference - variant| &times; {g(DIFF_GAIN)} (more for "
            "faint differences, so that the largest is drawn at full brightness; the caption says "
            "the factor). Highlighted class: the other pipeline's top-1.</p>")
    if not e.contrasts:
        return head + '<p class="empty">No one-factor contrast in this run.</p></section>'
    rows = query_dicts(con, load_sql("report_divergent_rows"),
                       {"cells": [c.cell_id for c in e.contrasts], "limit": 20 * TOP_IMAGES})
    chosen = pick_divergent(rows, TOP_IMAGES)
    if not chosen:
        return head + '<p class="empty">No contrast row diverges from the reference.</p></section>'
    cells = {c["cell_id"]: c for c in query_dicts(con, "SELECT * FROM cells")}
    ref = next(c for c in cells.values() if c["is_reference"])
    contrast = {c.cell_id: c for c in e.contrasts}
    labels = pictures.class_labels(manifest.get("model", {}))
    try:
        pre = pictures.preprocess_from_manifest(manifest["model"]["preprocess"])
    except (KeyError, TypeError, ValueError) as err:
        return head + f'<p class="empty">No preprocessing recorded in the manifest ({_e(err)}).</p></section>'
    cache: dict[tuple, np.ndarray | str] = {}
    cards = [_image_card(r, cells[r["cell_id"]], ref, contrast[r["cell_id"]], labels, pre, cache)
             for r in chosen]
    return head + '<div class="cards">' + "".join(cards) + "</div></section>"


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
                labels: Sequence[str] | None, pre: Any, cache: dict) -> str:
    level = f"{c.factor} = {c.level}" + (f" ({c.detail})" if c.detail else "")
    props = [p for p in (r.get("subsampling"), "progressive" if r.get("progressive") else None,
                         f"EXIF orientation {r['exif_orientation']}"
                         if r.get("exif_orientation") not in (None, 1) else None,
                         r.get("color_mode") if r.get("color_mode") not in (None, "RGB") else None,
                         f"decoded {r['decoded_w']}x{r['decoded_h']} vs reference "
                         f"{r['ref_decoded_w']}x{r['ref_decoded_h']}" if r.get("shape_match") is False
                         else None) if p]
    a = _render(r["path"], ref, pre, cache)
    b = _render(r["path"], cell, pre, cache)
    figs: list[tuple[str, str | None]] = []  # (caption, already HTML: built from numbers only; PNG URI)
    note = ""
    if isinstance(a, str) or isinstance(b, str):
        note = f'<p class="warn">{_e(a if isinstance(a, str) else b)}</p>'
    else:
        figs.append(("reference input", _png(pictures.to_uint8(a))))
        figs.append(("variant input", _png(pictures.to_uint8(b))))
        if a.shape != b.shape:
            note = f'<p class="warn">inputs differ in shape: {a.shape} vs {b.shape}</p>'
        else:
            d = np.abs(a - b)
            if not d.any():
                figs.append(("difference", None))
            else:
                gain = diff_gain(float(d.max()))
                figs.append((f"|difference| &times; {g(gain)} (max {g(float(d.max()))}/255)",
                             _png(pictures.difference_map(a, b, gain))))
            seen = float(d.max())
            if r.get("px_max_abs") is not None and abs(seen - r["px_max_abs"]) > 0.5:
                note = (f'<p class="warn">Re-rendered here, the inputs differ by {g(seen)} at most; the '
                        f"run measured {g(r['px_max_abs'])}: this machine decodes or resizes "
                        "differently from the one that made the run.</p>")
    width = 224 if pre.crop <= 224 else min(pre.crop, 320)  # CSS px; small inputs drawn pixelated
    pixelated = ' class="px"' if pre.crop < width else ""
    pics = "".join(
        f'<figure><img src="{src}" width="{width}" height="{width}" alt="{cap}"{pixelated}>'
        f"<figcaption>{cap}</figcaption></figure>"
        if src else
        f'<figure><div class="same" style="width:{width}px;height:{width}px">inputs identical: '
        f"the divergence comes after preprocessing</div><figcaption>difference</figcaption></figure>"
        for cap, src in figs)
    top = (_top5_table("reference", r["ref_top5"], r["ref_top5_prob"], labels, r["top1"])
           + _top5_table("variant", r["top5"], r["top5_prob"], labels, r["ref_top1"]))
    flip = ""
    if r["top1"] != r["ref_top1"]:
        flip = (f' <span class="flip">top-1 {_label(r["ref_top1"], labels)} &rarr; '
                f'{_label(r["top1"], labels)}</span>')
    return (f'<div class="card"><h3>{_e(r["image_id"])} <small>variant: {_e(level)}</small>{flip}</h3>'
            f"<p>cos dist {g(r['cos_dist'])} &middot; max abs {g(r['max_abs'])} logits &middot; rel L2 "
            f"{g(r['rel_l2'])} &middot; input px max {g(r['px_max_abs'])}, mean {g(r['px_mean_abs'])}"
            f"{' &middot; ' + _e(', '.join(props)) if props else ''}</p>"
            f'{note}<div class="body"><div class="pics">{pics}</div>'
            f'<div class="top5">{top}</div></div></div>')


def diff_gain(max_diff: float) -> float:
    """Amplification of a difference image: ``DIFF_GAIN``, or more for faint differences so that
    the largest one is drawn at full brightness (max_diff in 0-255 units)."""
    return DIFF_GAIN if max_diff * DIFF_GAIN >= 255 else 255.0 / max_diff


def _label(i: int | None, labels: Sequence[str] | None) -> str:
    if i is None:
        return "-"
    name = labels[i] if labels and 0 <= i < len(labels) else None
    return _e(f"{i} {name}" if name else str(i))


def _top5_table(title: str, classes: Sequence[int] | None, probs: Sequence[float] | None,
                labels: Sequence[str] | None, other_top1: int | None) -> str:
    if not classes:
        return ""
    rows = "".join(f"<tr{' class=hit' if k == other_top1 else ''}><td>{_label(k, labels)}</td>"
                   f"<td class=num>{pct(p) if p is not None else '-'}</td></tr>"
                   for k, p in zip(classes, probs or [None] * len(classes)))
    return f"<table class=data><tr><th>top-5: {_e(title)}</th><th>p</th></tr>{rows}</table>"


def _gate(r: CheckResult | str, run_dir: str | Path, e: Explanation) -> str:
    if isinstance(r, str):
        return f'<section id="gate"><h2>Gate</h2><p class="warn">Not evaluated: {_e(r)}</p></section>'
    tol = r.tolerances
    verdict = "PASS" if r.passed else "FAIL"
    limits = "; ".join(f"{_e(p)}: rel L2 &le; {g(v['max_rel_l2'])}, cosine &ge; {g(v['min_cosine'], 6)}"
                       + (f", max abs &le; {g(v['max_abs'])}" if v["max_abs"] is not None else "")
                       for p, v in sorted(r.limits_by_precision.items()))
    by_cell: dict[str, list] = {}
    for f in r.failures:
        by_cell.setdefault(f.cell_id, []).append(f)
    by_check: dict[str, int] = {}
    for fs in by_cell.values():
        for f in fs:
            by_check[f.check] = by_check.get(f.check, 0) + 1
    summary = ", ".join(f"{_e(CHECK_WORDS[k])}: {n} cells" for k, n in by_check.items())
    contrast = {c.cell_id for c in e.contrasts}
    shown = sorted(by_cell.values(), key=lambda fs: (fs[0].cell_id not in contrast, -len(fs)))[:GATE_ROWS]
    rows = "".join(f"<tr><td>{_e(fs[0].cell)}</td><td>"
                   f"{'<br>'.join(_e(describe_failure(f)) for f in fs)}</td></tr>" for fs in shown)
    more = (f"<p>... and {len(by_cell) - GATE_ROWS} more failing cells: <code>dmx check "
            f"{_e(str(run_dir))}</code> lists them all.</p>" if len(by_cell) > GATE_ROWS else "")
    precision = ("a cell may run at a lower precision than it asked for" if tol["allow_lower_precision"]
                 else "a cell must run at the precision it asked for")
    return (f'<section id="gate"><h2>Gate: <span class="{verdict.lower()}">{verdict}</span></h2>'
            f"<p><code>dmx check {_e(str(run_dir))}</code> with the run's tolerances, scope "
            f"{_e(tol['scope'])}: <b>{len(by_cell)} of {r.cells_judged}</b> cells break a tolerance"
            f"{' (' + summary + ')' if summary else ''}. Limits per effective precision - "
            f"{limits or '-'}; top-1 agreement &ge; {g(tol['min_top1_agreement'])}; {precision}.</p>"
            + (f"<table class='data gate'><tr><th>cell (one-factor contrasts first)</th><th>broken</th></tr>"
               f"{rows}</table>{more}" if rows else "")
            + "</section>")


def _notes(e: Explanation, con: duckdb.DuckDBPyConnection) -> str:
    items = []
    for m in e.precision_mismatches:
        items.append(f"<li><b>Precision</b>: <code>{_e(m['label'])}</code> asked {_e(m['asked'])}, "
                     f"ran {_e(m['effective'])} ({m['cells']} cells), read back from the backend.</li>")
    for label, reason in e.skipped.items():
        items.append(f"<li><b>Skipped</b> <code>{_e(label)}</code>: {_e(reason)}</li>")
    for s in e.status:
        if s["status"] == "error":
            items.append(f"<li><b>Errors</b> at {_e(s['error_stage'] or '?')}: {s['n']} rows on "
                         f"{s['images']} images, e.g. {_e(s['example'] or '')}</li>")
    errors_by_image = query_dicts(con, load_sql("report_error_images"))
    if errors_by_image:
        items.append("<li><b>Images with errors</b>: " + "; ".join(
            f"{_e(d['image_id'])} ({d['n']} rows, {_e(d['stage'] or '?')})"
            for d in errors_by_image) + "</li>")
    d = e.determinism
    if d.get("determinism_checks"):
        items.append(f"<li><b>Reuse guard</b>: {int(d['determinism_checks'])} batches recomputed, "
                     f"{int(d.get('determinism_mismatches', 0))} differed (max abs "
                     f"{g(d.get('determinism_max_abs') or 0.0)}).</li>")
    body = ("<ul>" + "".join(items) + "</ul>" if items else
            "<p>No skipped cells, no errors, every backend ran the precision asked.</p>")
    return f'<section id="notes"><h2>Notes</h2>{body}</section>'


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
    return f'<img id="{element_id}" class="chart" alt="{_e(alt)}" src="{_data_uri(buf.getvalue())}">'


def _png(rgb: np.ndarray) -> str:
    return _data_uri(pictures.png_bytes(rgb))


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _dmx_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("dmx")
    except PackageNotFoundError:
        return "?"


CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#24292f;color:#fff;padding:10px 24px;position:sticky;top:0;z-index:1}
header h1{font-size:18px;margin:0 0 4px}
nav a{color:#9ecbff;margin-right:14px;text-decoration:none}
main{max-width:1400px;margin:0 auto;padding:8px 24px}
section{scroll-margin-top:70px;background:#fff;border:1px solid #ddd;border-radius:6px;padding:10px 18px;margin:14px 0}
h2{font-size:17px;margin:6px 0}
h3{font-size:14px;margin:4px 0}
small{color:#666;font-weight:normal}
table{border-collapse:collapse;margin:8px 0}
table.meta th{text-align:left;padding:2px 12px 2px 0;vertical-align:top;white-space:nowrap}
table.data th,table.data td{border:1px solid #ddd;padding:2px 8px;font-size:13px}
table.data th{background:#f1f3f5}
td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.hit td{background:#fff3bf}
img.chart{max-width:100%;display:block;margin:8px 0}
img.px{image-rendering:pixelated;border:1px solid #ccc}
.cards{display:flex;flex-direction:column;gap:14px}
.body{display:flex;gap:24px;flex-wrap:wrap;align-items:flex-start}
.card{border:1px solid #ddd;border-radius:6px;padding:8px 12px}
.pics{display:flex;gap:10px;flex-wrap:wrap}
figure{margin:0}
figcaption{font-size:12px;color:#555;max-width:224px}
.same{display:flex;align-items:center;justify-content:center;text-align:center;background:#f1f3f5;
border:1px dashed #aaa;font-size:12px;color:#555;padding:8px;box-sizing:border-box}
.top5{display:flex;gap:16px;flex-wrap:wrap;align-items:flex-start}
.top5 table{margin:0}
.flip{color:#c92a2a;font-size:13px;margin-left:8px}
.warn{color:#a61e4d}
.empty{color:#666;font-style:italic}
.pass{color:#2b8a3e}.fail{color:#c92a2a}
table.gate td{font-size:12px}
footer{color:#777;font-size:12px;padding:10px 24px 30px;max-width:1400px;margin:0 auto}
"""
