"""The runner's public face for readers of a finished run (``analysis/``'s HTML report).

A report shows what the model saw: the model input of a cell for one image, re-rendered from
the image file with exactly the code that produced the rows. ``analysis`` calls these two
functions and nothing else of ``runner``; they take plain data (a cell's factors, the
manifest's ``model`` section) and never build or run a model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np


class RenderError(RuntimeError):
    """The model input cannot be re-rendered here (file gone, decoder missing, decode failed)."""


def model_input(path: str | Path, factors: Mapping[str, str | None],
                preprocess: Mapping[str, Any]) -> np.ndarray:
    """The model input of a cell for one image, as the worker builds it: decode with the cell's
    decoder and decode options, channel order, resize and fit. ``preprocess`` is the manifest's
    ``model.preprocess``. Float32 (crop, crop, 3), 0-255, before normalisation. Raises
    RenderError."""
    from .decoders import DecodeError, DecoderUnavailable, decode_options, get_decoder
    from .models.base import Preprocess
    from .preprocess import PreprocessError, model_input_pixels
    from .sources import read_location  # local file, object store or shard member
    try:
        extra = {k: preprocess[k] for k in ("pad", "scale", "channels") if k in preprocess}
        pre = Preprocess(mode=preprocess["mode"], resize=int(preprocess["resize"]),
                         crop=int(preprocess["crop"]), mean=tuple(preprocess["mean"]),
                         std=tuple(preprocess["std"]), **extra)
    except (KeyError, TypeError, ValueError) as e:
        raise RenderError(f"the manifest's model.preprocess is incomplete: {e}") from None
    try:
        data = read_location(str(path))
    except OSError as e:
        raise RenderError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        img = get_decoder(factors.get("decoder") or "pil").decode(data, decode_options(factors))
        if factors.get("color") == "bgr":
            img = np.ascontiguousarray(img[..., ::-1])
        return model_input_pixels(img, factors.get("resize") or "pil-bilinear", pre,
                                  factors.get("fit"))
    except (DecodeError, DecoderUnavailable, PreprocessError, KeyError, ValueError) as e:
        raise RenderError(f"cannot re-render {Path(path).name}: {e}") from None


def class_labels(model: Mapping[str, Any]) -> tuple[str, ...] | None:
    """Class names of the run's model: those the run recorded (the manifest's ``model.labels``),
    else - a run written before they were recorded - a built-in model's (importing its module,
    and so torch), None for user models or when the model's package is not installed here."""
    if isinstance(model.get("labels"), list):
        return tuple(str(x) for x in model["labels"])
    from .models import MODELS, ModelUnavailable, UnknownModel, get_model
    name = model.get("name")
    if name not in MODELS:
        return None
    try:
        return get_model(name).labels
    except (ModelUnavailable, UnknownModel):
        return None
