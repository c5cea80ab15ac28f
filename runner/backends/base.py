"""The backend interface (after Polygraphy's runners): configure cheaply, ``activate`` builds the
session where it will run (inside the worker), ``infer`` maps an NCHW float32 batch to outputs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np


class BackendUnavailable(RuntimeError):
    """The backend, or this setting of it, cannot run here: its cells are skipped with this reason."""


@dataclass(frozen=True)
class InferSetting:
    """Everything that decides how one backend runs the model."""

    backend: str = "torch"
    precision: str = "fp32"
    openvino_hint: str | None = None
    ort_opt: str | None = None
    threads: int | None = None
    device: str = "cpu"
    tf32: str | None = None
    conversion: str | None = None
    batch: int | None = None

    @classmethod
    def from_factors(cls, factors: Mapping[str, str | None]) -> "InferSetting":
        threads = factors.get("threads")
        return cls(backend=factors.get("backend") or "torch",
                   precision=factors.get("precision") or "fp32",
                   openvino_hint=factors.get("openvino_hint"),
                   ort_opt=factors.get("ort_opt"),
                   threads=int(threads) if threads else None,
                   device=factors.get("device") or "cpu",
                   tf32=factors.get("tf32"),
                   conversion=factors.get("conversion"),
                   batch=int(factors["batch"]) if factors.get("batch") else None)


@dataclass(frozen=True)
class ModelArtifacts:
    """What the backends build sessions from. Plain data, shipped to workers.

    ``torch_factory`` is ``builtin:<name>`` or a user ``pkg.module:factory``; ``files`` maps a
    variant (``fp32``, ``fp16``, ``int8``, ``int8-openvino``) to a model file made on the driver before the sweep.
    """

    name: str
    task: str
    torch_factory: str | None
    weights: str | None
    files: Mapping[str, str] = field(default_factory=dict)
    conversion_notes: Mapping[str, Any] = field(default_factory=dict)
    input_shape: tuple[int, int, int] = (3, 224, 224)
    max_batch: int | None = None        # an ONNX file exported with a fixed batch (often 1)

    def file_for(self, setting: "InferSetting") -> str | None:
        from runner.convert import file_key
        return self.files.get(file_key(setting.backend, setting.precision, setting.conversion))

    def missing_reason(self, setting: "InferSetting") -> str:
        """Why no model file exists for this setting (the conversion's error, if any)."""
        from runner.convert import file_key
        key = file_key(setting.backend, setting.precision, setting.conversion)
        note = self.conversion_notes.get(key)
        return note if isinstance(note, str) else f"no model file for {key}"

    def build_torch(self) -> Any:
        from runner.models.loading import build_torch_model
        return build_torch_model(self.torch_factory, self.weights)


class BackendRunner:
    """Base class; subclasses implement ``_activate``, ``_infer`` and ``info``."""

    system_name = "backend"

    def __init__(self, artifacts: ModelArtifacts, setting: InferSetting, threads: int) -> None:
        self.artifacts = artifacts
        self.setting = setting
        self.threads = setting.threads or threads
        self.active = False
        self.build_s = 0.0

    @classmethod
    def unsupported(cls, artifacts: ModelArtifacts, setting: InferSetting) -> str | None:
        """Why this setting cannot run (it becomes a skipped cell), or None."""
        return None

    def activate(self) -> None:
        """Build the session, then run one warm-up batch so latencies exclude lazy init."""
        t = time.perf_counter()
        self._activate()
        self._infer(np.zeros((1, *self.artifacts.input_shape), np.float32))
        self.build_s = time.perf_counter() - t
        self.active = True

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) float32 -> (N, ...) float32 outputs."""
        if not self.active:
            self.activate()
        if batch.dtype != np.float32 or batch.ndim != 4:
            raise ValueError(f"expected a float32 NCHW batch, got {batch.dtype} {batch.shape}")
        out = self._infer(np.ascontiguousarray(batch))
        return np.asarray(out, dtype=np.float32)

    def infer_all(self, batch: np.ndarray) -> list[np.ndarray]:
        """(N, 3, H, W) float32 -> every output of the model, each (N, ...) float32, in the
        model's output order (detectors often have several: boxes, scores, ...)."""
        if not self.active:
            self.activate()
        if batch.dtype != np.float32 or batch.ndim != 4:
            raise ValueError(f"expected a float32 NCHW batch, got {batch.dtype} {batch.shape}")
        return [np.asarray(o, dtype=np.float32) for o in self._infer_all(np.ascontiguousarray(batch))]

    def _activate(self) -> None:
        raise NotImplementedError

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _infer_all(self, batch: np.ndarray) -> list[np.ndarray]:
        return [self._infer(batch)]

    def info(self) -> dict[str, Any]:
        """Version, precision actually used (read back), and properties of the built session."""
        raise NotImplementedError
