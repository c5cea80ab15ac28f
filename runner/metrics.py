"""Divergence metrics: pure functions, arrays in, numbers out.

Input metrics compare model inputs on the 0-255 scale; output metrics compare raw outputs
(logits for classifiers) of a cell with the reference cell's for the same image.
"""
from __future__ import annotations

import math

import numpy as np

PIXEL_PEAK = 255.0


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
        "px_frac_diff": float(np.mean(d.reshape(-1, d.shape[-1]).max(axis=1) > 0)) if d.size else 0.0,
        "px_psnr": math.inf if mse == 0 else 10.0 * math.log10(PIXEL_PEAK ** 2 / mse),
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
