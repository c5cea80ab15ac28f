"""Pictures for the HTML report: a cell's model input re-rendered from the image file.

This is the one place in ``analysis/`` that imports ``runner/`` (and ``class_labels`` the only
use of ``runner.models``: for class names). DESIGN keeps analysis free of
the runner so that analysing a run never sweeps, builds a model or needs a backend; here we only
call the runner's pure decode and resize functions (``runner.decoders``, ``runner.preprocess``,
``runner.models.base.Preprocess``) to draw what the model saw, so the pictures come from exactly
the code that produced the rows (``model_input`` follows ``runner.worker``'s decode and preprocess
steps; keep the two in step). Nothing here runs a model. The rows stay the evidence: a
re-rendered input that does not match a row's ``px_max_abs`` (the run was made with other library
versions, or the file changed) is reported as such by the caller.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Mapping

import numpy as np


class PictureError(RuntimeError):
    """The model input cannot be re-rendered here (file gone, decoder missing, decode failed)."""


def preprocess_from_manifest(spec: Mapping[str, Any]):
    """``runner.models.base.Preprocess`` from ``manifest["model"]["preprocess"]``."""
    from runner.models.base import Preprocess
    extra = {k: spec[k] for k in ("pad", "scale", "channels") if k in spec}  # absent in older runs
    return Preprocess(mode=spec["mode"], resize=int(spec["resize"]), crop=int(spec["crop"]),
                      mean=tuple(spec["mean"]), std=tuple(spec["std"]), **extra)


def model_input(path: str | Path, factors: Mapping[str, str | None], preprocess: Any) -> np.ndarray:
    """The model input of a cell for one image, as the runner's worker builds it: decode with the
    cell's decoder and decode options, channel order, resize and crop. Float32 (crop, crop, 3), 0-255,
    before normalisation. Raises PictureError."""
    from runner.decoders import DecodeError, DecoderUnavailable, decode_options, get_decoder
    from runner.preprocess import PreprocessError, model_input_pixels
    from runner.sources import read_location  # local file, object store or shard member
    try:
        data = read_location(str(path))
    except OSError as e:
        raise PictureError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        img = get_decoder(factors.get("decoder") or "pil").decode(data, decode_options(factors))
        if factors.get("color") == "bgr":
            img = np.ascontiguousarray(img[..., ::-1])
        return model_input_pixels(img, factors.get("resize") or "pil-bilinear", preprocess,
                                  factors.get("fit"))
    except (DecodeError, DecoderUnavailable, PreprocessError, KeyError, ValueError) as e:
        raise PictureError(f"cannot re-render {Path(path).name}: {e}") from None


def class_labels(model: Mapping[str, Any]) -> tuple[str, ...] | None:
    """Class names of a built-in model (``manifest["model"]``), None for user models or when the
    model's package is not installed here (the report then shows class indices)."""
    from runner.models import MODELS, ModelUnavailable, UnknownModel, get_model
    name = model.get("name")
    if name not in MODELS:
        return None
    try:
        return get_model(name).labels
    except (ModelUnavailable, UnknownModel):
        return None


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """0-255 float pixels -> uint8 for display (rounded, clipped)."""
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def difference_map(a: np.ndarray, b: np.ndarray, gain: float = 10.0) -> np.ndarray:
    """Amplified per-pixel difference as an RGB uint8 heat image: ``max over RGB of |a - b|``
    (0-255 scale) times ``gain``, clipped at 255, through matplotlib's ``magma`` colormap
    (black = equal)."""
    from matplotlib import colormaps
    d = np.abs(a.astype(np.float32) - b.astype(np.float32)).max(axis=2)
    x = np.clip(d * gain / 255.0, 0.0, 1.0)
    return (colormaps["magma"](x)[..., :3] * 255).astype(np.uint8)


def png_bytes(rgb: np.ndarray) -> bytes:
    """PNG-encode an RGB uint8 array."""
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="PNG", optimize=True)
    return buf.getvalue()
