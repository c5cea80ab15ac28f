"""Pictures for the HTML report: a cell's model input re-rendered from the image file.

DESIGN keeps analysis free of the runner so that analysing a run never sweeps, builds a model or
needs a backend. The one exception is drawing what the model saw: that goes through ONE public
module of the runner, ``dmx.runner.render`` (``model_input``, ``class_labels``), which takes plain
data and runs no model - so the pictures come from exactly the code that produced the rows, with
no copy to drift. (The alternative, the sweep keeping every model input for the report, would
store ~150 kB per image and preprocessing variant for the few the report shows.) The rows stay
the evidence: a re-rendered input that does not match a row's ``px_max_abs`` (other library
versions, or the file changed) is reported as such by the caller.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Mapping

import numpy as np


class PictureError(RuntimeError):
    """The model input cannot be re-rendered here (file gone, decoder missing, decode failed)."""


class _Preprocess(dict):
    """``manifest["model"]["preprocess"]``, its keys also readable as attributes (``pre.crop``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def preprocess_from_manifest(spec: Mapping[str, Any]) -> Mapping[str, Any]:
    """The preprocessing as ``dmx.runner.render.model_input`` takes it (``pre.crop`` reads too)."""
    return _Preprocess(spec)


def model_input(path: str | Path, factors: Mapping[str, str | None], preprocess: Any) -> np.ndarray:
    """The model input of a cell for one image (``dmx.runner.render.model_input``): float32
    (crop, crop, 3), 0-255, before normalisation. Raises PictureError."""
    from dmx.runner.render import RenderError, model_input as render
    try:
        return render(path, factors, preprocess)
    except RenderError as e:
        raise PictureError(str(e)) from None


def class_labels(model: Mapping[str, Any]) -> tuple[str, ...] | None:
    """Class names of a built-in model (``manifest["model"]``), None for user models or when the
    model's package is not installed here (the report then shows class indices)."""
    from dmx.runner.render import class_labels as labels
    return labels(model)


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
