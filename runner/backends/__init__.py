"""Backend registry: adding a backend is one module plus one line here."""
from __future__ import annotations

from .base import BackendRunner, BackendUnavailable, InferSetting, ModelArtifacts
from .onnxruntime_backend import OnnxRuntimeRunner
from .openvino_backend import OpenVinoRunner
from .torch_backend import TorchRunner

BACKENDS: dict[str, type[BackendRunner]] = {
    "torch": TorchRunner,
    "onnxruntime": OnnxRuntimeRunner,
    "openvino": OpenVinoRunner,
}

__all__ = ["BACKENDS", "BackendRunner", "BackendUnavailable", "InferSetting", "ModelArtifacts"]
