"""Turning an Explanation into text a person reads in 30 seconds, or Markdown for an issue."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .explain import NODE_NOT_RANKED, Contrast, DetectionContrast, Explanation, tolerance_verdict
from .numbers import g, pct
from .paired import format_p, unchanged_bound, verdict

__all__ = ["g", "pct", "render_text", "render_markdown", "render_detection", "concentrated_text",
           "render_accuracy", "accuracy_line", "render_map", "map_line"]


def _props(w: dict[str, Any]) -> str:
    bits = []
    if w.get("exif_orientation") and w["exif_orientation"] != 1:
        bits.append(f"EXIF orientation {w['exif_orientation']}")
    if w.get("color_mode") and w["color_mode"] != "RGB":
        bits.append(w["color_mode"])
    if w.get("subsampling"):
        bits.append(w["subsampling"])
    if w.get("progressive"):
        bits.append("progressive")
    if w.get("shape_match") is False:
        bits.append(f"shape differs ({w.get('decoded_w')}x{w.get('decoded_h')})")
    return ", ".join(bits)


def _level(c: Contrast) -> str:
    return f"{c.level} ({c.detail})" if c.detail else c.level


def concentrated_text(k: dict[str, Any] | None) -> str:
    if not k:
        return ""
    return (f"divergent on {k['divergent_in']}/{k['divergent_total']} images with {k['property']} "
            f"{'/'.join(k['values'])}, {k['others_in']}/{k['others_total']} of the identical ones")


def _why(c: Contrast) -> str:
    notes = []
    if c.n_nonfinite:
        notes.append(f"NaN/Inf on {c.n_nonfinite} of {c.n} images (e.g. {c.nonfinite_image}); "
                     f"the numbers are over the other {c.n_finite}")
    if c.split:
        notes.append(f"{c.split}: split by what ran, each part judged by its own tolerance")
    if c.shape_mismatches:
        notes.append(f"{c.shape_mismatches} image(s) decode to another shape")
    if c.px_equal_frac is not None and c.px_equal_frac == 1.0 and (c.cos_dist_mean or 0) > 0:
        notes.append("inputs identical: the model/backend alone")
    elif c.px_equal_frac is not None and c.px_equal_frac < 1.0:
        notes.append(f"input differs on {pct(1 - c.px_equal_frac)} of images "
                     f"(mean {g(c.px_mean_abs)} /255)")
        if c.n_same_input:
            notes.append(f"output moves only where the input does: cos dist {g(c.cos_dist_diff_input)} "
                         f"there vs {g(c.cos_dist_same_input)} on identical inputs")
    k = concentrated_text(c.concentrated)
    if k:
        notes.append(k)
    if c.outputs and any(o["n_worst"] for o in c.outputs):
        top = max(c.outputs, key=lambda o: (o["n_worst"], o["rel_l2_p50"] or 0.0))
        each = ", ".join(f"{o['output']} {g(o['rel_l2_p50'])}" for o in c.outputs)
        notes.append(f"output {top['output']} moved most on {top['n_worst']} of {top['n']} images "
                     f"(median rel L2 per output: {each})")
    t = tolerance_verdict(c)
    if t and (c.cos_dist_max or 0) > 0:
        word = "within" if t["within"] else "outside"
        notes.append(f"{word} {t['precision']} tolerance (worst rel L2 {g(t['rel_l2_max'])}, "
                     f"limit {g(t['max_rel_l2'])} = 10 x torch.testing rtol)")
    if c.precision and c.precision_effective and not c.precision_effective.startswith(c.precision):
        notes.append(f"asked {c.precision}, ran {c.precision_effective}")
    return "; ".join(notes)


def _rules(e: Explanation) -> dict[str, Any]:
    """The run's detection tolerances (manifest), with the documented defaults."""
    return {"rank_k": 100, "match_iou": 0.5, "same_iou": 0.9, "same_score": 0.05, **e.detection_rules}


def _boxes(d: DetectionContrast) -> str:
    return (f"{d.boxes_ref} ref boxes -> {d.boxes}: {d.matched} matched, {d.missed} missed, "
            f"{d.extra} extra")


def render_detection(e: Explanation, top_images: int = 3) -> list[str]:
    """A detector's two questions: which factors reorder the raw candidates, which change the
    final boxes; and the contrasts that do the first without the second."""
    r = _rules(e)
    cands, boxes = e.candidate_ranking(), e.box_ranking()
    if not cands:
        return []
    w = max(len(_level(c)) for c in e.contrasts)
    reorder = [c for c in cands if c.detection.reordered_frac > 0]
    change = [c for c in boxes if c.detection.changed_frac > 0]
    out = ["Change the candidate ranking: " + (", ".join(
               f"{c.factor}={_level(c)} (tau {g(c.detection.tau_mean)}, {pct(c.detection.reordered_frac)} of images)"
               for c in reorder) or "none"),
           "Change the final boxes:       " + (", ".join(
               f"{c.factor}={_level(c)} ({pct(c.detection.changed_frac)} of images, "
               f"{c.detection.missed} missed + {c.detection.extra} extra of {c.detection.boxes_ref} boxes)"
               for c in change) or "none"),
           "",
           f"Candidate ranking - pre-NMS score order vs the reference (Kendall tau over the top-{r['rank_k']} "
           "candidates, 1 = same order; each factor changed alone):"]
    for i, c in enumerate(cands, 1):
        d = c.detection
        out.append(f"  {i}. {c.factor:<14} {_level(c):<{w}} tau mean {g(d.tau_mean):>6} (min {g(d.tau_min)})"
                   f" | reordered on {pct(d.reordered_frac):>6} of images | top-{r['rank_k']} overlap "
                   f"{pct(d.topk_mean)} | raw max abs p95 {g(c.max_abs_p95)}")
    out += ["", f"Final boxes - post-NMS vs the reference (greedy match at IoU {r['match_iou']}; same = every "
                f"box matched at IoU >= {r['same_iou']}, |score delta| <= {r['same_score']}, same class):"]
    for i, c in enumerate(boxes, 1):
        d = c.detection
        ci = f" [{pct(d.changed_ci[0])}, {pct(d.changed_ci[1])}]" if d.changed_ci else ""
        out.append(f"  {i}. {c.factor:<14} {_level(c):<{w}} changed on {pct(d.changed_frac):>6}{ci} of "
                   f"{d.n} images | {_boxes(d)} | mean IoU {g(d.iou_mean)} | max score delta "
                   f"{g(d.score_delta_max)} | class flips {d.class_flips}")
    lw = max(len(_level(c)) for c in e.contrasts)
    out += ["", "Detection evidence - every one-factor contrast (boxes summed over images):",
            f"  {'factor':<13} {'level':<{lw}} {'n':>4} {'tau mean':>8} {'tau min':>8} {'top-k':>7} "
            f"{'reordered':>9} {'changed [95% CI]':>24} {'ref':>5} {'boxes':>5} {'match':>5} {'miss':>5} "
            f"{'extra':>5} {'IoU':>6} {'dscore':>7} {'flips':>5}"]
    for c in sorted((c for c in e.contrasts if c.detection), key=lambda c: (c.factor, c.level, c.detail)):
        d = c.detection
        ci = f"[{pct(d.changed_ci[0])}, {pct(d.changed_ci[1])}]" if d.changed_ci else ""
        out.append(f"  {c.factor:<13} {_level(c):<{lw}} {d.n:>4} {g(d.tau_mean):>8} {g(d.tau_min):>8} "
                   f"{pct(d.topk_mean):>7} {pct(d.reordered_frac):>9} {pct(d.changed_frac) + ' ' + ci:>24} "
                   f"{d.boxes_ref:>5} {d.boxes:>5} {d.matched:>5} {d.missed:>5} {d.extra:>5} "
                   f"{g(d.iou_mean):>6} {g(d.score_delta_max):>7} {d.class_flips:>5}")
    quiet = e.order_only()
    if quiet:
        out += ["", "Reorder the candidates but leave the final boxes the same (invisible after NMS):"]
        for c in quiet:
            d = c.detection
            out.append(f"  {c.factor}={_level(c)}: tau mean {g(d.tau_mean)} (min {g(d.tau_min)}), raw max "
                       f"abs p95 {g(c.max_abs_p95)}; boxes same on all {d.n} images (mean IoU "
                       f"{g(d.iou_mean)}, max score delta {g(d.score_delta_max)})")
    shown = [c for c in boxes if c.detection.changed_images][:6]
    if shown:
        out += ["", "Images whose final boxes change most, per contrast:"]
        for c in shown:
            out.append(f"  {c.factor}={_level(c)}:")
            for im in c.detection.changed_images[:top_images]:
                out.append(f"    {im['image_id']:<30} {im['det_n_ref']} -> {im['det_n']} boxes "
                           f"({im['det_missed']} missed, {im['det_extra']} extra), mean IoU "
                           f"{g(im['det_mean_iou'])}, tau {g(im['det_rank_tau'])}")
    return out + [""]


def render_text(e: Explanation, top_images: int = 3) -> str:
    out = [f"dmx explain - run {e.run_id} (spec {e.spec_name!r}): {e.images} images x {e.cells} cells",
           f"reference: {e.reference}", ""]
    if e.task == "detection":
        out += render_detection(e, top_images)
    factors = e.factor_ranking()
    fw = max([len(_level(c)) for c in e.contrasts] + [10])
    if not factors:
        out.append("No one-factor contrast to rank: no cell differs from the reference in exactly "
                   "one factor (or none ran).")
    else:
        what = "raw head" if e.task == "detection" else "output"
        out.append(f"Factors ranked by how far they move a typical image's {what} (median cosine "
                   "distance; each changed alone, everything else at the reference):")
        by_key = {(c.factor, c.level, c.detail or None): c for c in e.contrasts}
        for i, f in enumerate(factors, 1):
            c = by_key[(f["factor"], f["level"], f["detail"])]
            eta = f" | share {g(f['eta_squared'], 2)}" if f.get("eta_squared") is not None else ""
            out.append(f"  {i}. {f['factor']:<14} {_level(c):<{fw}} median {g(c.cos_dist_p50):>8}"
                       f" | mean {g(c.cos_dist_mean):>8}"
                       f" | top-1 flips {pct(c.top1_disagree):>6} | max abs {g(c.max_abs_max):>8}{eta}")
            for note in _why(c).split("; ") if _why(c) else []:
                out.append(f"     {'':<14} {note}")
    out += render_accuracy(e)
    out += render_map(e)
    lw = max([len(_level(c)) for c in e.contrasts] + [10])
    unit = "the raw detector head" if e.task == "detection" else "logits"
    if any(c.outputs for c in e.contrasts):
        unit = "each output, the worst of model.compare_outputs"
    out += ["", f"Evidence - every one-factor contrast (n images; cos dist = 1 - cosine of {unit}; the "
                "median's interval from order statistics, distribution-free; NaN/Inf rows left out "
                "of the numbers and counted):",
            f"  {'factor':<13} {'level':<{lw}} {'n':>6} {'median [95% CI]':>28} {'mean':>9} {'p95':>9} "
            f"{'max abs p95':>11} {'max':>9} {'top-1 flips [95% CI]':>22} {'px mean':>8} {'ran':>6}"]
    for c in sorted(e.contrasts, key=lambda c: (c.factor, c.level, c.detail)):
        ci = f"[{g(c.cos_dist_p50_ci[0], 2)}, {g(c.cos_dist_p50_ci[1], 2)}]" if c.cos_dist_p50_ci else ""
        tci = f"[{pct(c.top1_ci[0])}, {pct(c.top1_ci[1])}]" if c.top1_ci else ""
        n = f"n={c.n}" + (f" ({c.n_nonfinite} NaN)" if c.n_nonfinite else "")
        out.append(f"  {c.factor:<13} {_level(c):<{lw}} {n:>6} {g(c.cos_dist_p50) + ' ' + ci:>28} "
                   f"{g(c.cos_dist_mean):>9} "
                   f"{g(c.cos_dist_p95):>9} {g(c.max_abs_p95):>11} {g(c.max_abs_max):>9} "
                   f"{pct(c.top1_disagree) + ' ' + tci:>22} {g(c.px_mean_abs):>8} "
                   f"{c.precision_effective or '-':>6}")
    rare = e.rare_but_large()
    if rare:
        out += ["", "Rare but large (few images, far moved):"]
        for c in rare:
            worst = ", ".join(f"{w['image_id']} ({g(w['cos_dist'])})" for w in c.worst[:3])
            k = concentrated_text(c.concentrated)
            out.append(f"  {c.factor}={_level(c)}: up to {g(c.cos_dist_max)} on {worst}"
                       + (f"; {k}" if k else ""))
    if e.eta_squared:
        out += ["", "Share of the cosine distance's variance per factor (type-II sums of squares; the "
                    f"cells explain {g(e.explained, 2)}, the rest varies image to image):",
                "  " + "  ".join(f"{a} {g(v, 2)}" for a, v in e.eta_squared.items())]
        for axis, parents in e.nested.items():
            if parents:
                out.append(f"  {axis} is analysed within " + ", ".join(
                    f"{p}={'/'.join(v)}" for p, v in parents.items()) + " (where it applies)")
        if e.share_scale < 1:
            out.append(f"  (shares scaled by {g(e.share_scale, 2)}: on this unbalanced design the "
                       "type-II terms overlap and would sum above what the cells explain)")
        strong = [i for i in e.interactions if i["eta_squared"] > 0.01]
        if strong:
            out.append("  strongest interactions: " + "  ".join(
                f"{' x '.join(i['factors'])} {g(i['eta_squared'], 2)}" for i in strong[:3]))
    if e.nodes > 1:
        differ = (f"; they differ in {', '.join(e.nodes_differ)} (nodes in manifest.json)"
                  if e.nodes_differ else "")
        out.append(f"  node: not ranked - {e.nodes} nodes computed the rows, and {NODE_NOT_RANKED}"
                   f"{differ}")
    ranked = sorted(e.contrasts, key=lambda c: -(c.cos_dist_mean or 0))
    shown = [c for c in ranked if c.worst][:6]
    if shown:
        out += ["", "Images that diverge most, per contrast:"]
        for c in shown:
            out.append(f"  {c.factor}={_level(c)}:")
            for w in c.worst[:top_images]:
                flip = f", top-1 {w['top1_ref']} -> {w['top1']}" if w["top1_agree"] is False else ""
                props = _props(w)
                out.append(f"    {w['image_id']:<30} cos dist {g(w['cos_dist'])}, max abs "
                           f"{g(w['max_abs'])}{flip}{' [' + props + ']' if props else ''}")
    if e.precision_mismatches:
        out += ["", "Precision asked vs actually run (read back from the backend):"]
        for m in e.precision_mismatches:
            out.append(f"  {m['label']}: asked {m['asked']}, ran {m['effective']} ({m['cells']} cells)")
    out += ["", "Rows: " + " | ".join(
        f"{s['status']}{'/' + s['error_stage'] if s['error_stage'] else ''} {s['n']} "
        f"({s['images']} images)" for s in e.status)]
    for label, reason in list(e.skipped.items())[:5]:
        out.append(f"  skipped {label}: {reason}")
    if len(e.skipped) > 5:
        out.append(f"  ... and {len(e.skipped) - 5} more skipped cells")
    d = e.determinism
    if d.get("determinism_checks"):
        out.append(f"Reuse guard: {int(d['determinism_checks'])} batches re-inferred in another "
                   "composition and size, "
                   f"{int(d.get('determinism_mismatches', 0))} differed "
                   f"(max abs {g(d.get('determinism_max_abs') or 0.0)})")
    return "\n".join(out)


def accuracy_line(c: Contrast) -> str:
    """``-0.41 pts [-0.66, -0.17], 52 right->wrong, 11 wrong->right, p = 3e-7`` and, when the
    interval holds 0, that the change is indistinguishable from zero at this n."""
    r = c.accuracy_change()
    if r is None:
        return "not judged (no labelled image judged in both cells)"
    tail = f" - {verdict(r)}" if r.indistinguishable else ""
    if r.n and r.right_to_wrong + r.wrong_to_right == 0:   # the bootstrap's [0, 0] says nothing more
        tail = (f" - no labelled image changed: at n = {r.n} a change up to "
                f"{unchanged_bound(r.n):.2g} pts either way is not ruled out (exact 95% bound)")
    unpaired = f" ({c.acc_unpaired} labelled images not judged: error rows)" if c.acc_unpaired else ""
    return r.text() + tail + unpaired


def render_accuracy(e: Explanation) -> list[str]:
    """Explain's accuracy section: the reference's accuracy, then every one-factor contrast
    ranked by its top-1 change in points, and the type-II shares of correctness."""
    a = e.accuracy
    if a is None:
        return []
    ranked = e.accuracy_ranking()
    n_ref = a["reference_n"]
    src = f", {Path(a['source']).name}" if a.get("source") else ""
    out = ["", f"Accuracy against ground truth ({a['labelled_images']} of {a['images']} images "
               f"labelled{src}): reference top-1 {_pts(a['reference_top1'])} "
               f"({a['reference_top1_right']} of {n_ref}), top-5 {_pts(a['reference_top5'])} "
               f"({a['reference_top5_right']} of {n_ref})."]
    if not ranked:
        return out + ["  No one-factor contrast was judged on a labelled image."]
    out.append("Factors ranked by top-1 change in points (each changed alone; paired over the "
               "images both cells judged: 95% paired bootstrap interval, images right->wrong and "
               "wrong->right, McNemar's exact p):")
    w = max(len(f"{c.factor} {_level(c)}") for c in ranked)
    for i, c in enumerate(ranked, 1):
        out.append(f"  {i}. {f'{c.factor} {_level(c)}:':<{w + 1}} {accuracy_line(c)}")
    if n_ref:
        out.append(f"  (at n = {n_ref} one image is {100.0 / n_ref:.3g} points; a change inside "
                   "the interval cannot be told from noise)")
    shares = a.get("shares") or {}
    if shares:
        out.append("Share of top-1 correctness's variance per factor (type-II sums of squares; the "
                   f"cells explain {g(a['shares_explained'], 2)}, the rest is which images are "
                   "hard): " + "  ".join(f"{k} {g(v, 2)}" for k, v in shares.items()))
    return out


def map_line(c: Contrast) -> str:
    """``mAP -3.1 pts [-4.0, -2.2] (n=500; ...)`` and, when the interval holds 0, that the
    change is indistinguishable from zero at this n."""
    m = c.map
    if m is None or m.delta is None:
        return "not judged (no labelled image judged in both cells)"
    lvl = f"{m.level:.0%}"
    tail = (f" - indistinguishable from zero at this n (the {lvl} interval holds 0)"
            if m.indistinguishable else "")
    return m.text() + tail


def render_map(e: Explanation) -> list[str]:
    """Explain's detection-accuracy section: the reference's COCO mAP against the run's ground
    truth, then every one-factor contrast ranked by its mAP change in points."""
    a = e.detection_accuracy
    if a is None:
        return []
    src = f", {Path(a['source']).name}" if a.get("source") else ""
    out = ["", f"Accuracy against ground truth ({a['labelled_images']} of {a['images']} images "
               f"with boxes{src}): reference COCO mAP@[.5:.95] {_pts(a['reference_map'])}, "
               f"mAP@.5 {_pts(a['reference_map50'])} (n={a['reference_n']})."]
    ranked = e.map_ranking()
    if not ranked:
        return out + ["  No one-factor contrast was judged on a labelled image."]
    out.append("Factors ranked by mAP change in points (each changed alone; pycocotools' COCOeval, "
               f"paired over the images both cells judged: 95% paired bootstrap interval over "
               f"images, {a['resamples']} resamples):")
    w = max(len(f"{c.factor}={_level(c)}") for c in ranked)
    for i, c in enumerate(ranked, 1):
        out.append(f"  {i}. {f'{c.factor}={_level(c)}:':<{w + 1}} {map_line(c)}")
    return out


def _pts(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def render_markdown(e: Explanation) -> str:
    lines = [f"## dmx explain: `{e.spec_name}` (run `{e.run_id}`)", "",
             f"{e.images} images x {e.cells} cells; reference: `{e.reference}`", "",
             "| # | factor | level | cos dist mean | top-1 flips | max abs (max) | share (type II) | note |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    by_key = {(c.factor, c.level, c.detail or None): c for c in e.contrasts}
    for i, f in enumerate(e.factor_ranking(), 1):
        c = by_key[(f["factor"], f["level"], f["detail"])]
        lines.append(f"| {i} | {f['factor']} | {_level(c)} | {g(c.cos_dist_mean)} | "
                     f"{pct(c.top1_disagree)} | {g(c.max_abs_max)} | {g(f.get('eta_squared'), 2)} | {_why(c)} |")
    if e.accuracy is not None and e.accuracy_ranking():
        a = e.accuracy
        lines += ["", f"**Accuracy** ({a['labelled_images']} labelled images; reference top-1 "
                      f"{_pts(a['reference_top1'])}): change in top-1 points, paired 95% interval",
                  "", "| # | factor | level | n | top-1 change [95% CI] | right->wrong | wrong->right | "
                      "McNemar p | verdict |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for i, c in enumerate(e.accuracy_ranking(), 1):
            r = c.accuracy_change()
            lines.append(f"| {i} | {c.factor} | {_level(c)} | {r.n} | {r.delta:+.2f} "
                         f"[{r.ci_low:+.2f}, {r.ci_high:+.2f}] | {r.right_to_wrong} | "
                         f"{r.wrong_to_right} | {format_p(r.p_value)} | {verdict(r)} |")
    if e.task == "detection" and e.candidate_ranking():
        lines += ["", "| factor | level | candidate tau mean (min) | top-k overlap | boxes changed on | "
                      "missed / extra of ref boxes | mean IoU | max score delta |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for c in e.box_ranking():
            d = c.detection
            lines.append(f"| {c.factor} | {_level(c)} | {g(d.tau_mean)} ({g(d.tau_min)}) | {pct(d.topk_mean)} | "
                         f"{pct(d.changed_frac)} of {d.n} | {d.missed} / {d.extra} of {d.boxes_ref} | "
                         f"{g(d.iou_mean)} | {g(d.score_delta_max)} |")
    if e.precision_mismatches:
        lines += ["", "**Precision asked vs run:** " + "; ".join(
            f"`{m['label']}` asked {m['asked']}, ran {m['effective']}" for m in e.precision_mismatches)]
    return "\n".join(lines)
