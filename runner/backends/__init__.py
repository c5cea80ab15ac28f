"""Backend registry: every module of this folder is imported, and each ``BackendRunner``
subclass with a ``name`` registers itself (``BACKENDS``) and its axes (``dmx.matrix.axes``).

Adding a backend is adding one module here; nothing else changes. Backend modules import their
library lazily (inside methods), so importing this package is cheap and works on a machine that
lacks some of them (their cells are skipped with the reason ``unsupported`` gives).
"""
from __future__ import annotations

import importlib
import pkgutil

from .base import (BACKENDS, BackendRunner, BackendUnavailable, Conversion, ConversionError,
                   InferSetting, ModelArtifacts)

# The built-in backends first, in this order (the order of their axes' docs and levels).
_FIRST = ("torch_backend", "onnxruntime_backend", "openvino_backend")
for _mod in (*_FIRST, *sorted(m.name for m in pkgutil.iter_modules(__path__)
                              if m.name not in _FIRST and m.name != "base")):
    importlib.import_module(f"{__name__}.{_mod}")

from .onnxruntime_backend import OnnxRuntimeRunner  # noqa: E402  (names other code imports)
from .openvino_backend import OpenVinoRunner  # noqa: E402
from .torch_backend import TorchRunner  # noqa: E402

__all__ = ["BACKENDS", "BackendRunner", "BackendUnavailable", "Conversion", "ConversionError",
           "InferSetting", "ModelArtifacts", "OnnxRuntimeRunner", "OpenVinoRunner", "TorchRunner"]
