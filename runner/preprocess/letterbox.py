"""Fitting an image to the model's square input: letterbox (aspect kept, padded), stretch, or
resize + center crop. Each fit is one small function over a resize level of ``RESIZERS``, and
returns where the image landed (``Placement``) so detector boxes can be mapped back to it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from dmx.runner.models.base import Preprocess

from .resize import RESIZERS


class PreprocessError(RuntimeError):
    """The image cannot be brought to the model's input (e.g. smaller than 1 px after resize)."""


@dataclass(frozen=True)
class Placement:
    """Where the decoded image sits in the model input: ``input = image * scale + offset`` per
    axis, in pixels; ``image_hw`` is the decoded image's size."""

    scale_x: float
    scale_y: float
    offset_x: float
    offset_y: float
    image_hw: tuple[int, int]


def resize_geometry(h: int, w: int, p: Preprocess) -> tuple[int, int]:
    """Size (h, w) of the resize-crop fit before its crop, torchvision's rule (shorter side)."""
    short, long = (h, w) if h <= w else (w, h)
    new_long = int(p.resize * long / short)
    return (p.resize, new_long) if h <= w else (new_long, p.resize)


def _resize(img: np.ndarray, resize: str, nh: int, nw: int) -> np.ndarray:
    h, w = img.shape[:2]
    if nh < 1 or nw < 1:
        raise PreprocessError(f"image {w}x{h} resizes to {nw}x{nh}: less than one pixel")
    return RESIZERS[resize](img, nh, nw)


def resize_crop(img: np.ndarray, resize: str, p: Preprocess) -> tuple[np.ndarray, Placement]:
    """Shorter side to ``p.resize``, then the center ``p.crop`` square (classifier style)."""
    h, w = img.shape[:2]
    nh, nw = resize_geometry(h, w, p)
    if min(nh, nw) < p.crop:
        raise PreprocessError(f"image {w}x{h} resizes to {nw}x{nh}, smaller than the {p.crop} crop")
    out = _resize(img, resize, nh, nw)
    top, left = int(round((nh - p.crop) / 2.0)), int(round((nw - p.crop) / 2.0))
    pixels = np.ascontiguousarray(out[top: top + p.crop, left: left + p.crop])
    return pixels, Placement(nw / w, nh / h, -left, -top, (h, w))


def stretch(img: np.ndarray, resize: str, p: Preprocess) -> tuple[np.ndarray, Placement]:
    """Straight to ``p.crop`` x ``p.crop``, aspect ratio ignored."""
    h, w = img.shape[:2]
    out = _resize(img, resize, p.crop, p.crop)
    return np.ascontiguousarray(out), Placement(p.crop / w, p.crop / h, 0.0, 0.0, (h, w))


def _letterbox(img: np.ndarray, resize: str, p: Preprocess, center: bool) -> tuple[np.ndarray, Placement]:
    h, w = img.shape[:2]
    r = min(p.crop / h, p.crop / w)
    if center:  # Ultralytics LetterBox: rounded size, padding split with its -0.1/+0.1 rounding
        nh, nw = int(round(h * r)), int(round(w * r))
        top, left = int(round((p.crop - nh) / 2 - 0.1)), int(round((p.crop - nw) / 2 - 0.1))
    else:  # YOLOX/DAMO-YOLO preproc: truncated size, image at the top-left corner
        nh, nw = int(h * r), int(w * r)
        top = left = 0
    canvas = np.full((p.crop, p.crop, 3), np.float32(p.pad), np.float32)
    canvas[top: top + nh, left: left + nw] = _resize(img, resize, nh, nw)
    return canvas, Placement(nw / w, nh / h, float(left), float(top), (h, w))


def letterbox(img: np.ndarray, resize: str, p: Preprocess) -> tuple[np.ndarray, Placement]:
    """Longer side to ``p.crop``, aspect kept, padded right and bottom with ``p.pad``."""
    return _letterbox(img, resize, p, center=False)


def letterbox_center(img: np.ndarray, resize: str, p: Preprocess) -> tuple[np.ndarray, Placement]:
    """Longer side to ``p.crop``, aspect kept, centred, padded on both sides with ``p.pad``."""
    return _letterbox(img, resize, p, center=True)


FitFn = Callable[[np.ndarray, str, Preprocess], "tuple[np.ndarray, Placement]"]

FITTERS: dict[str, FitFn] = {
    "resize-crop": resize_crop,
    "stretch": stretch,
    "letterbox": letterbox,
    "letterbox-center": letterbox_center,
}
