"""Resize implementations: RGB uint8 (H, W, 3) in, float32 (h, w, 3) on the 0-255 scale out.

Each level is one small function; Pillow and OpenCV return uint8 (rounded by the library),
torch returns unrounded floats, as a float tensor pipeline would.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

ResizeFn = Callable[[np.ndarray, int, int], np.ndarray]


def _pil(method_name: str) -> ResizeFn:
    def resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
        from PIL import Image
        method = getattr(Image.Resampling, method_name)
        return np.asarray(Image.fromarray(img).resize((w, h), method), dtype=np.float32)
    return resize


def _cv2(flag_name: str) -> ResizeFn:
    def resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
        import cv2
        return cv2.resize(img, (w, h), interpolation=getattr(cv2, flag_name)).astype(np.float32)
    return resize


def _torch(antialias: bool) -> ResizeFn:
    def resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
        import torch
        import torch.nn.functional as F
        t = torch.from_numpy(np.array(img, dtype=np.float32)).permute(2, 0, 1)[None]
        out = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False,
                            antialias=antialias)
        return out[0].permute(1, 2, 0).contiguous().numpy()
    return resize


RESIZERS: dict[str, ResizeFn] = {
    "pil-bilinear": _pil("BILINEAR"),
    "pil-bicubic": _pil("BICUBIC"),
    "cv2-linear": _cv2("INTER_LINEAR"),
    "cv2-area": _cv2("INTER_AREA"),
    "cv2-cubic": _cv2("INTER_CUBIC"),
    "torch-bilinear": _torch(antialias=False),
    "torch-bilinear-aa": _torch(antialias=True),
}
