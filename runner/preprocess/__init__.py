"""Preprocessing: resize (shorter side + center crop, or stretch) and normalisation."""
from __future__ import annotations

import numpy as np

from runner.models.base import Preprocess

from .resize import RESIZERS


class PreprocessError(RuntimeError):
    """The image cannot be brought to the model's input (e.g. smaller than 1 px after resize)."""


def resize_geometry(h: int, w: int, p: Preprocess) -> tuple[int, int]:
    """Size (h, w) the image is resized to before any crop, torchvision's rule for resize-crop."""
    if p.mode == "stretch":
        return p.crop, p.crop
    short, long = (h, w) if h <= w else (w, h)
    new_long = int(p.resize * long / short)
    return (p.resize, new_long) if h <= w else (new_long, p.resize)


def model_input_pixels(img: np.ndarray, resize: str, p: Preprocess) -> np.ndarray:
    """The model input on the 0-255 scale, float32 (crop, crop, 3), before normalisation."""
    h, w = img.shape[:2]
    nh, nw = resize_geometry(h, w, p)
    if min(nh, nw) < p.crop:
        raise PreprocessError(f"image {w}x{h} resizes to {nw}x{nh}, smaller than the {p.crop} crop")
    out = RESIZERS[resize](img, nh, nw)
    top, left = int(round((nh - p.crop) / 2.0)), int(round((nw - p.crop) / 2.0))
    return np.ascontiguousarray(out[top: top + p.crop, left: left + p.crop])


def normalise(pixels: np.ndarray, p: Preprocess) -> np.ndarray:
    """(H, W, 3) 0-255 -> (3, H, W) float32, ``(x / 255 - mean) / std``."""
    mean = np.asarray(p.mean, np.float32)
    std = np.asarray(p.std, np.float32)
    x = (pixels.astype(np.float32) / np.float32(255.0) - mean) / std
    return np.ascontiguousarray(x.transpose(2, 0, 1))


__all__ = ["RESIZERS", "PreprocessError", "model_input_pixels", "normalise", "resize_geometry"]
