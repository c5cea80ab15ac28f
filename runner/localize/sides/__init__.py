"""Localize sides: one module per backend behind ``Side``; adding one is a module and a line."""
from __future__ import annotations

from .base import Side
from .onnxruntime_side import OnnxRuntimeSide
from .openvino_side import OpenVinoSide
from .torch_side import TorchSide

SIDES: dict[str, type[Side]] = {
    "torch": TorchSide,
    "onnxruntime": OnnxRuntimeSide,
    "openvino": OpenVinoSide,
}

__all__ = ["SIDES", "Side"]
