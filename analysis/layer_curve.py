"""The report's per-layer error curve, drawn when ``dmx localize`` has localised a contrast of
the run: relative L2 of each tensor against the reference by topological index (worst image),
log scale, the first tensor beyond tolerance marked. Self-contained: ``layer_curve_section``
returns one HTML section (empty string when nothing was localised)."""
from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
from matplotlib.figure import Figure

from dmx.results.layers import layers_dir, read_summaries

SECTION_ID = "layers"


def curve_points(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """cell_id -> [(topo_index, worst rel L2 over images and over the node's outputs)]."""
    d = layers_dir(run_dir)
    if not any(d.glob("cell=*.parquet")):
        return {}
    glob = str((d / "cell=*.parquet").resolve()).replace("'", "''")
    rows = duckdb.connect().execute(
        f"SELECT cell_id, topo_index, max(rel_l2) FROM read_parquet('{glob}', hive_partitioning = false, "
        "union_by_name = true) WHERE observable GROUP BY ALL ORDER BY cell_id, topo_index").fetchall()
    out: dict[str, list[tuple[int, float]]] = {}
    for cid, topo, rel in rows:
        out.setdefault(cid, []).append((int(topo), float(rel)))
    return out


def layer_curve_section(run_dir: str | Path) -> str:
    summaries = {s.get("cell_id"): s for s in read_summaries(run_dir)}
    points = curve_points(run_dir)
    if not points:
        return ""
    fig = Figure(figsize=(8.0, 3.2))
    ax = fig.add_subplot()
    items = []
    for cid, pts in sorted(points.items()):
        s = summaries.get(cid, {})
        x = np.array([p[0] for p in pts])
        y = np.array([p[1] for p in pts])
        pos = y[np.isfinite(y) & (y > 0)]
        floor = 10.0 ** (math.floor(math.log10(pos.min())) - 1) if pos.size else 1e-12
        label = s.get("cell") or cid
        line, = ax.plot(x, np.where(y > 0, y, floor), marker=".", lw=1, ms=3, label=label)
        fd = s.get("first_divergent")
        if fd:
            ax.axvline(fd["topo_index"], color=line.get_color(), ls="--", lw=0.8)
            ax.annotate(f"{fd['tensor']} ({fd['op_type']})", (fd["topo_index"], max(fd["rel_l2"] or floor, floor)),
                        fontsize=7, color=line.get_color(), xytext=(4, 4), textcoords="offset points")
        if s.get("tolerance_rel_l2"):
            ax.axhline(s["tolerance_rel_l2"], color=line.get_color(), ls=":", lw=0.8)
        items.append(_item(cid, s))
    ax.set_yscale("log")
    ax.set_xlabel("topological index of the node (reference ONNX graph)")
    ax.set_ylabel("rel L2 vs reference")
    ax.legend(fontsize=7, loc="best")
    ax.grid(True, which="major", alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    src = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return (f'<section id="{SECTION_ID}"><h2>Where in the model (dmx localize)</h2>'
            "<p>Relative L2 of every intermediate tensor against the reference's same tensor (joined "
            "by ONNX name), worst image, by topological index; dashed: the first tensor beyond the "
            "tolerance of the precision that ran (dotted).</p>"
            f'<img id="layer-curve" class="chart" alt="per-layer relative L2" src="{src}">'
            f"<ul>{''.join(items)}</ul></section>")


def _item(cid: str, s: dict[str, Any]) -> str:
    e = lambda v: html.escape(str(v), quote=True)  # noqa: E731
    fd = s.get("first_divergent")
    where = (f"first beyond tolerance: <code>{e(fd['tensor'])}</code> ({e(fd['op_type'])}, node "
             f"{e(fd['node'])}), rel L2 {fd['rel_l2']:.3g}" if fd else "no tensor beyond tolerance")
    inst = " Marking the tensors changed the final output." if s.get("instrumentation_changed_output") else ""
    return (f"<li><b>{e(s.get('cell') or cid)}</b> (ran {e(s.get('precision'))}, "
            f"{len(s.get('images') or [])} images): {where}.{inst}</li>")
