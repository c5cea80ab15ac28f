"""Reduce a pair of tensors to a few numbers where they are computed; the tensors are dropped."""
from __future__ import annotations

import math

import numpy as np

METRICS = ("max_abs", "mean_abs", "rel_l2", "cosine", "sqnr_db")


def compare(out: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """max |out - ref|, mean |out - ref|, ||out - ref|| / ||ref||, cosine(out, ref) and
    SQNR = 10 log10(||ref||^2 / ||out - ref||^2) dB (inf when equal), in float64."""
    a = np.asarray(out, dtype=np.float64).ravel()
    b = np.asarray(ref, dtype=np.float64).ravel()
    d = a - b
    nd = float(np.dot(d, d))
    nb = float(np.dot(b, b))
    na = float(np.dot(a, a))
    rel = 0.0 if nd == 0 else (math.sqrt(nd / nb) if nb > 0 else math.inf)
    cos = 1.0 if nd == 0 else (float(np.dot(a, b)) / math.sqrt(na * nb) if na > 0 and nb > 0 else 0.0)
    sqnr = math.inf if nd == 0 else (10 * math.log10(nb / nd) if nb > 0 else -math.inf)
    absd = np.abs(d)
    return {"max_abs": float(absd.max()) if d.size else 0.0,
            "mean_abs": float(absd.mean()) if d.size else 0.0,
            "rel_l2": rel, "cosine": cos, "sqnr_db": sqnr}
