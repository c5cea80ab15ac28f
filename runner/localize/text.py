"""The text ``dmx localize`` prints."""
from __future__ import annotations

import math
from typing import Any

from .engine import LocalizeResult

_BARS = " ▁▂▃▄▅▆▇█"


def g(v: float | None, digits: int = 2) -> str:
    if v is None:
        return "-"
    if v == 0:
        return "0"
    if math.isinf(v):
        return "inf"
    return f"{v:.{digits}g}" if abs(v) >= 1e-3 and abs(v) < 1e4 else f"{v:.{digits - 1}e}"


def curve_lines(layers: list[dict[str, Any]], width: int = 60) -> list[str]:
    """The rel-L2 curve by topological index as a log-scale sparkline plus a few milestones."""
    obs = [l for l in layers if l["observable"] and l["rel_l2"] is not None]
    if not obs:
        return ["  (no observable tensor)"]
    by_topo: dict[int, float] = {}
    for l in obs:
        by_topo[l["topo_index"]] = max(by_topo.get(l["topo_index"], 0.0), l["rel_l2"])
    topo = sorted(by_topo)
    vals = [by_topo[t] for t in topo]
    pos = [v for v in vals if v > 0 and not math.isinf(v)]
    if not pos:
        return [f"  rel L2 is 0 at all {len(topo)} observed nodes"]
    lo, hi = math.log10(min(pos)), math.log10(max(pos))
    step = max(1, math.ceil(len(vals) / width))
    bars = []
    for i in range(0, len(vals), step):
        v = max(vals[i: i + step])
        if v <= 0:
            bars.append(_BARS[0])
        else:
            frac = 1.0 if hi == lo else (math.log10(min(v, 10 ** hi)) - lo) / (hi - lo)
            bars.append(_BARS[1 + min(7, int(frac * 7.999))])
    picks = sorted({0, len(topo) // 4, len(topo) // 2, 3 * len(topo) // 4, len(topo) - 1})
    marks = ", ".join(f"#{topo[i]} {g(vals[i])}" for i in picks)
    return [f"  topo 0 [{''.join(bars)}] {topo[-1]}  (log scale {g(min(pos))} .. {g(max(pos))})",
            f"  rel L2 at {marks}"]


def format_text(res: LocalizeResult, title: str = "") -> str:
    j = res.to_json()
    layers = j["layers"]
    n_obs = sum(1 for l in layers if l["observable"])
    lines = [f"dmx localize{(' - ' + title) if title else ''}",
             f"  reference: {res.reference}",
             f"  variant:   {res.variant}, ran {res.precision}",
             f"  {len(res.images)} image(s), {len(layers)} tensors, {n_obs} observable in both "
             f"({len(layers) - n_obs} not: fused away or absent from the variant graph)"]
    fd = res.first_divergent
    if fd is None:
        lines.append(f"No tensor beyond {res.precision}'s rel-L2 tolerance {g(res.tolerance)}: "
                     f"worst {g(max((l['rel_l2'] or 0 for l in layers), default=0))}.")
    else:
        lines.append(f"First tensor beyond {res.precision}'s rel-L2 tolerance {g(res.tolerance)}: "
                     f"{fd['tensor']!r} ({fd['op_type']}, node {fd['node']}, topo #{fd['topo_index']}), "
                     f"rel L2 {g(fd['rel_l2'])}")
    intro = sorted((l for l in layers if l.get("introduced_rel_l2") is not None),
                   key=lambda l: -l["introduced_rel_l2"])
    if intro:
        lines.append("Layers introducing most error (the variant's node re-run alone on the "
                     "reference's inputs; seen = in the full run, introduced + inherited):")
        for l in intro[:5]:
            lines.append(f"  {l['tensor']:<28} {l['op_type']:<10} #{l['topo_index']:<5} introduced "
                         f"{g(l['introduced_rel_l2'])}  seen {g(l['rel_l2'])}")
    lines.append("Error curve (rel L2 vs the reference, worst image, by topological index):")
    lines += curve_lines(layers)
    inst = res.instrumentation
    fo = res.final_output
    if res.instrumentation_changed_output:
        lines.append(f"Instrumentation CHANGED the variant's final output: max abs {g(inst['max_abs'])}, "
                     f"rel L2 {g(inst['rel_l2'])} (all tensors marked vs the plain model; final rel L2 "
                     f"vs the reference {g(fo['instrumented_rel_l2'])} marked, {g(fo['plain_rel_l2'])} plain)")
    else:
        lines.append(f"Instrumentation did not change the final output (bit-identical; final rel L2 vs "
                     f"the reference {g(fo['plain_rel_l2'])}).")
    for side, e in (res.torch_eager_check or {}).items():
        lines.append(f"torch {side}: dmx's ONNX interpreter vs the run's eager torch model: "
                     f"final rel L2 {g(e['rel_l2'])}, max abs {g(e['max_abs'])}")
    b = res.bisection
    if b:
        lines.append(f"Bisection with one marked tensor per run ({b['runs']} runs, image {b['image_id']}): "
                     f"{b['tensor']!r}" + (" - agrees" if b["agrees"] else
                                            f" - all-marked run said {b['all_marked']!r}"))
    for n in res.notes:
        lines.append(f"Note: {n}")
    return "\n".join(lines)
