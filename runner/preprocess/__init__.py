"""Preprocessing: fit the image to the model input (resize-crop, stretch, letterbox) with a resize
level, then normalise."""
from __future__ import annotations

import numpy as np

from dmx.runner.models.base import Preprocess

from .letterbox import FITTERS, Placement, PreprocessError, resize_geometry as _crop_geometry
from .resize import RESIZERS


def resize_geometry(h: int, w: int, p: Preprocess) -> tuple[int, int]:
    """Size (h, w) the image is resized to before any crop, for the model's default fit."""
    if p.mode == "resize-crop":
        return _crop_geometry(h, w, p)
    if p.mode == "stretch":
        return p.crop, p.crop
    r = min(p.crop / h, p.crop / w)
    return (int(round(h * r)), int(round(w * r))) if p.mode == "letterbox-center" else (int(h * r), int(w * r))


def model_input(img: np.ndarray, resize: str, p: Preprocess,
                fit: str | None = None) -> tuple[np.ndarray, Placement]:
    """The model input on the 0-255 scale, float32 (crop, crop, 3), before normalisation, and
    where the image landed in it. ``fit`` overrides the model's default (``p.mode``)."""
    fit = fit or p.mode
    if fit not in FITTERS:
        raise PreprocessError(f"unknown fit {fit!r}; allowed: {', '.join(FITTERS)}")
    return FITTERS[fit](img, resize, p)


def model_input_pixels(img: np.ndarray, resize: str, p: Preprocess, fit: str | None = None) -> np.ndarray:
    """``model_input`` without the placement."""
    return model_input(img, resize, p, fit)[0]


def normalise(pixels: np.ndarray, p: Preprocess) -> np.ndarray:
    """(H, W, 3) RGB 0-255 -> (3, H, W) float32, ``(x / scale - mean) / std``, channels in the
    model's order (``p.channels``)."""
    mean = np.asarray(p.mean, np.float32)
    std = np.asarray(p.std, np.float32)
    x = pixels.astype(np.float32)
    if p.scale != 1.0:
        x = x / np.float32(p.scale)
    x = (x - mean) / std
    if p.channels == "bgr":
        x = x[..., ::-1]
    return np.ascontiguousarray(x.transpose(2, 0, 1))


__all__ = ["FITTERS", "RESIZERS", "Placement", "PreprocessError", "model_input", "model_input_pixels",
           "normalise", "resize_geometry"]
