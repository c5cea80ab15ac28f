"""Divergence metrics: pure functions, arrays in, numbers out.

Input metrics compare model inputs on the 0-255 scale; output metrics compare raw outputs
(logits for classifiers, the raw head for detectors) of a cell with the reference cell's for
the same image; detection metrics compare pre-NMS candidate order and post-NMS boxes.
"""
from __future__ import annotations

import math

import numpy as np

from .detection import box_iou, score_order

PIXEL_PEAK = 255.0


def _frac_pixels_differing(d: np.ndarray) -> float:
    """Share of pixels (H*W) where any channel of the difference ``d`` is non-zero."""
    px = d.reshape(-1, d.shape[-1])
    differs = px[:, 0] != 0
    for c in range(1, px.shape[1]):
        differs |= px[:, c] != 0
    return float(np.count_nonzero(differs)) / px.shape[0]


def input_divergence(x: np.ndarray, ref: np.ndarray) -> dict[str, float | bool]:
    """Pixel divergence of two (H, W, C) inputs on the 0-255 scale.

    ``px_frac_diff`` counts a pixel as different when any of its channels differs;
    ``px_psnr`` is in dB, ``inf`` for identical inputs.
    """
    if x.shape != ref.shape:
        raise ValueError(f"input shapes differ: {x.shape} vs {ref.shape}")
    d = np.abs(x.astype(np.float64) - ref.astype(np.float64))
    mse = float(np.mean(d * d))
    return {
        "px_equal": bool(np.array_equal(x, ref)),
        "px_max_abs": float(d.max()) if d.size else 0.0,
        "px_mean_abs": float(d.mean()) if d.size else 0.0,
        "px_frac_diff": _frac_pixels_differing(d) if d.size else 0.0,
        "px_psnr": math.inf if mse == 0 else 10.0 * math.log10(PIXEL_PEAK ** 2 / mse),
    }


def input_divergence_rows(x: np.ndarray, ref: np.ndarray) -> dict[str, np.ndarray]:
    """``input_divergence`` of each pair ``x[i]``, ``ref[i]`` of two (N, H, W, C) stacks, as
    arrays of N, equal to it value for value (each row is reduced as the pair alone is)."""
    if x.shape != ref.shape or x.ndim != 4 or x[0].size == 0:
        raise ValueError(f"input stacks differ or are empty: {x.shape} vs {ref.shape}")
    n, h, w, c = x.shape
    d = x.reshape(n, -1).astype(np.float64)     # float64 holds any float32 difference exactly
    d -= ref.reshape(n, -1)
    np.abs(d, out=d)
    mse = np.mean(d * d, axis=1)
    px = d.reshape(n, h * w, c)
    differs = px[:, :, 0] != 0      # channel by channel: numpy's any() over a 3-wide axis is 6x slower
    for k in range(1, c):
        differs |= px[:, :, k] != 0
    top = d.max(axis=1)
    return {
        "px_equal": top == 0,       # |x - ref| is exact, so it is 0 exactly where x == ref
        "px_max_abs": top,
        "px_mean_abs": d.mean(axis=1),
        "px_frac_diff": np.count_nonzero(differs, axis=1) / (h * w),
        "px_psnr": np.array([math.inf if e == 0 else 10.0 * math.log10(PIXEL_PEAK ** 2 / e)
                             for e in mse.tolist()]),
    }


def output_divergence(y: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Elementwise divergence of two outputs of equal shape (units of the output, e.g. logits)."""
    a = y.astype(np.float64).ravel()
    b = ref.astype(np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"output shapes differ: {y.shape} vs {ref.shape}")
    d = a - b
    noise = float(d @ d)
    signal = float(b @ b)
    na, nb = math.sqrt(float(a @ a)), math.sqrt(signal)
    if noise == 0:  # identical outputs: exact values, not 1 - 1e-16 from rounding
        return {"out_max_abs": 0.0, "out_mean_abs": 0.0, "out_rel_l2": 0.0, "out_cosine": 1.0,
                "out_sqnr_db": math.inf}
    return {
        "out_max_abs": float(np.max(np.abs(d))) if d.size else 0.0,
        "out_mean_abs": float(np.mean(np.abs(d))) if d.size else 0.0,
        "out_rel_l2": math.sqrt(noise) / nb if nb > 0 else (0.0 if noise == 0 else math.inf),
        "out_cosine": float(a @ b) / (na * nb) if na > 0 and nb > 0 else (1.0 if na == nb else 0.0),
        "out_sqnr_db": math.inf if noise == 0 else (10.0 * math.log10(signal / noise)
                                                    if signal > 0 else -math.inf),
    }


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - np.max(logits)
    e = np.exp(z)
    return e / e.sum()


def topk(logits: np.ndarray, k: int = 5) -> np.ndarray:
    """Indices of the k largest logits, best first (ties broken by lower index)."""
    flat = logits.ravel()
    k = min(k, flat.size)
    return np.argsort(-flat, kind="stable")[:k]


def classification_divergence(y: np.ndarray, ref: np.ndarray, k: int = 5) -> dict[str, object]:
    """Label-level agreement of two logit vectors: top-1, top-k overlap, KL(ref || y) in nats."""
    top_y, top_r = topk(y, k), topk(ref, k)
    p_ref, p_y = softmax(ref.ravel()), softmax(y.ravel())
    kl = float(np.sum(p_ref * (np.log(np.maximum(p_ref, 1e-300)) - np.log(np.maximum(p_y, 1e-300)))))
    return {
        "top1": int(top_y[0]),
        "top1_ref": int(top_r[0]),
        "top1_agree": bool(top_y[0] == top_r[0]),
        "top5_overlap": len(set(top_y.tolist()) & set(top_r.tolist())) / float(len(top_r)),
        "out_kl": max(kl, 0.0),
    }


def top5_of(y: np.ndarray) -> tuple[list[int], list[float]]:
    """A cell's own top-5 classes and their softmax probabilities."""
    idx = topk(y, 5)
    p = softmax(y.ravel())
    return [int(i) for i in idx], [float(p[i]) for i in idx]


def kendall_tau_b(x: np.ndarray, y: np.ndarray) -> float | None:
    """Kendall's tau-b of two paired score vectors (ties handled, scipy's O(n log n) count);
    None for fewer than 2 pairs or when one vector is constant."""
    x = np.asarray(x, np.float64).ravel()
    y = np.asarray(y, np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"tau needs paired vectors, got {x.shape} and {y.shape}")
    if x.size < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return None
    from scipy import stats  # here: importing scipy.stats costs every worker ~1 s; detectors only
    tau = float(stats.kendalltau(x, y, variant="b").statistic)
    # scipy divides by two square roots, so identical rankings come out 1 - 1 or 2 ulp (212 of
    # 796 vectors of 2-399 scores), and det_rank_tau < 1 counts an image as reordered. Any other tau-b is at least
    # 1 / (2 * pairs) from +-1, so this snap moves nothing else below a million candidates.
    return math.copysign(1.0, tau) if abs(abs(tau) - 1.0) < 1e-12 else tau


def candidate_rank_agreement(scores: np.ndarray, ref_scores: np.ndarray, k: int = 100) -> dict[str, float | None]:
    """Agreement of two pre-NMS candidate score vectors (same anchors, same order).

    ``det_topk_overlap``: |top-k(ref) ∩ top-k(cell)| / k, candidates ranked by score;
    ``det_rank_tau``: Kendall tau-b of the two score vectors over the union of both top-k sets
    (1 = the leading candidates come out in the same order).
    """
    scores = np.asarray(scores, np.float64).ravel()
    ref_scores = np.asarray(ref_scores, np.float64).ravel()
    if scores.shape != ref_scores.shape:
        raise ValueError(f"candidate counts differ: {scores.size} vs {ref_scores.size}")
    k = min(k, scores.size)
    if k == 0:
        return {"det_rank_tau": None, "det_topk_overlap": None}
    top, top_ref = score_order(scores)[:k], score_order(ref_scores)[:k]
    union = np.union1d(top, top_ref)
    return {"det_rank_tau": kendall_tau_b(scores[union], ref_scores[union]),
            "det_topk_overlap": len(np.intersect1d(top, top_ref)) / float(k)}


def match_detections(boxes: np.ndarray, ref_boxes: np.ndarray, iou_threshold: float = 0.5
                     ) -> list[tuple[int, int, float]]:
    """Greedy one-to-one matching, class-agnostic: reference boxes in their order (best score
    first), each takes the unmatched cell box of highest IoU >= ``iou_threshold``.
    Returns (reference index, cell index, IoU) per match."""
    iou = box_iou(ref_boxes, boxes)
    taken = np.zeros(iou.shape[1], bool)
    out = []
    for r in range(iou.shape[0]):
        cand = np.where(taken, -1.0, iou[r])
        if cand.size == 0:
            break
        j = int(np.argmax(cand))
        if cand[j] >= iou_threshold:
            taken[j] = True
            out.append((r, j, float(iou[r, j])))
    return out


def detection_divergence(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray,
                         ref_boxes: np.ndarray, ref_scores: np.ndarray, ref_classes: np.ndarray,
                         match_iou: float = 0.5, same_iou: float = 0.9,
                         same_score: float = 0.05) -> dict[str, object]:
    """Post-NMS agreement of a cell's detections with the reference's (boxes x1 y1 x2 y2 in the
    same pixel frame, scores 0-1, reference first-best order).

    Matching is greedy at ``match_iou``; class flips count matched pairs whose class differs.
    ``det_same``: same count, every box matched with IoU >= ``same_iou``, |score delta| <=
    ``same_score``, no class flip.
    """
    m = match_detections(boxes, ref_boxes, match_iou)
    ious = np.array([iou for _, _, iou in m])
    deltas = np.array([abs(float(scores[j]) - float(ref_scores[r])) for r, j, _ in m])
    flips = sum(int(classes[j] != ref_classes[r]) for r, j, _ in m)
    n, n_ref = len(boxes), len(ref_boxes)
    same = (n == n_ref == len(m) and flips == 0 and bool(np.all(ious >= same_iou))
            and bool(np.all(deltas <= same_score)))
    return {
        "det_n_ref": n_ref, "det_n": n, "det_matched": len(m),
        "det_missed": n_ref - len(m), "det_extra": n - len(m),
        "det_mean_iou": float(ious.mean()) if len(m) else None,
        "det_score_delta_max": float(deltas.max()) if len(m) else None,
        "det_class_flips": flips, "det_same": same,
    }


# ----------------------------------------------------------------------------- batched forms
# The same metrics over m pairs at once (rows of 2-D arrays), for the worker's columns: each
# equals its one-pair function above on every row, identical outputs included.

def output_divergence_rows(y: np.ndarray, ref: np.ndarray) -> dict[str, np.ndarray]:
    """``output_divergence`` of each row of ``y`` (m, k) against the same row of ``ref``."""
    a = y.reshape(len(y), -1).astype(np.float64)
    b = ref.reshape(len(ref), -1).astype(np.float64)
    if a.shape != b.shape:
        raise ValueError(f"output shapes differ: {y.shape} vs {ref.shape}")
    d = a - b
    noise = np.einsum("ij,ij->i", d, d)
    signal = np.einsum("ij,ij->i", b, b)
    na, nb = np.sqrt(np.einsum("ij,ij->i", a, a)), np.sqrt(signal)
    ad = np.abs(d)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(nb > 0, np.sqrt(noise) / nb, np.where(noise == 0, 0.0, np.inf))
        cos = np.where((na > 0) & (nb > 0), np.einsum("ij,ij->i", a, b) / (na * nb),
                       np.where(na == nb, 1.0, 0.0))
        sqnr = np.where(signal > 0, 10.0 * np.log10(signal / noise), -np.inf)
    same = noise == 0
    k = a.shape[1]
    return {
        "out_max_abs": np.where(same, 0.0, ad.max(axis=1) if k else 0.0),
        "out_mean_abs": np.where(same, 0.0, ad.mean(axis=1) if k else 0.0),
        "out_rel_l2": np.where(same, 0.0, rel),
        "out_cosine": np.where(same, 1.0, cos),
        "out_sqnr_db": np.where(same, np.inf, sqnr),
    }


def _softmax_rows(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def topk_rows(logits: np.ndarray, k: int = 5) -> np.ndarray:
    """``topk`` of each row (m, k_out): best first, ties broken by lower index."""
    return np.argsort(-logits, axis=1, kind="stable")[:, : min(k, logits.shape[1])]


def classification_rows(y: np.ndarray, ref: np.ndarray, k: int = 5) -> dict[str, np.ndarray]:
    """``classification_divergence`` of each row of ``y`` against the same row of ``ref``."""
    y = y.reshape(len(y), -1).astype(np.float64)
    ref = ref.reshape(len(ref), -1).astype(np.float64)
    top_y, top_r = topk_rows(y, k), topk_rows(ref, k)
    p_ref, p_y = _softmax_rows(ref), _softmax_rows(y)
    kl = np.sum(p_ref * (np.log(np.maximum(p_ref, 1e-300)) - np.log(np.maximum(p_y, 1e-300))), axis=1)
    overlap = (top_y[:, :, None] == top_r[:, None, :]).any(axis=2).sum(axis=1) / float(top_r.shape[1])
    return {"top1": top_y[:, 0].astype(np.int32), "top1_ref": top_r[:, 0].astype(np.int32),
            "top1_agree": top_y[:, 0] == top_r[:, 0], "top5_overlap": overlap,
            "out_kl": np.maximum(kl, 0.0)}


def top5_rows(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``top5_of`` of each row: (m, 5) class indices and their softmax probabilities."""
    y = y.reshape(len(y), -1).astype(np.float64)
    idx = topk_rows(y, 5)
    p = _softmax_rows(y)
    return idx.astype(np.int32), np.take_along_axis(p, idx, axis=1).astype(np.float32)
