"""One side of a localize comparison: a model file run on one backend at one setting, able to
return any of its tensors by ONNX name, its plain final outputs, and a cut-out graph's output."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from dmx.runner.backends import BACKENDS, InferSetting, ModelArtifacts


class Side:
    """Subclasses: ``observable``, ``tensors``, ``compile_cut``; ``plain`` defaults to the
    backend's own runner (the exact session a sweep uses, without extra outputs)."""

    backend = "backend"

    def __init__(self, path: str, setting: InferSetting, artifacts: ModelArtifacts, threads: int) -> None:
        self.path = path
        self.setting = setting
        self.artifacts = artifacts
        self.threads = setting.threads or threads
        self._runner: Any = None

    # -- what the side can see
    def observable(self) -> set[str]:
        raise NotImplementedError

    def missing_note(self) -> str:
        """Why a reference tensor is not observable on this side."""
        return "not in this model's graph"

    def cut_target(self, name: str) -> str:
        """The tensor of this side's graph that stands for the reference's ``name``."""
        return name

    def note_for(self, name: str) -> str | None:
        """A note on how ``name`` is observed here (None: as is)."""
        return None

    # -- running
    def tensors(self, x: np.ndarray, names: list[str]) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
        """The named tensors for batch ``x`` plus the model's final outputs of the same run."""
        raise NotImplementedError

    def plain(self, x: np.ndarray) -> list[np.ndarray]:
        """Final outputs of the unmodified model on this backend and setting."""
        if self._runner is None:
            self._runner = BACKENDS[self.setting.backend](self.artifacts, self.setting, self.threads)
        return self._runner.infer_all(x)

    def compile_cut(self, model: Any) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
        """A callable running a cut-out ONNX graph (one output) here, at this side's setting."""
        raise NotImplementedError

    def cut_runner(self, tensor: str, available: set[str]
                   ) -> tuple[Callable[[dict[str, np.ndarray]], np.ndarray], list[str]] | None:
        """(run(feeds) -> tensor, feed names): the nodes of this side's model that make
        ``tensor`` from tensors in ``available`` (the reference supplies those), run here at
        this side's setting; None when the model has no such tensor or cannot be cut."""
        from ..graph import cut, value_types
        model = getattr(self, "model", None)
        if model is None:
            return None
        if not hasattr(self, "_cut_types"):
            self._cut_types = value_types(model)
        c = cut(model, tensor, available, self._cut_types)
        if c is None:
            return None
        return self.compile_cut(c[0]), c[1]

    def precision(self) -> str:
        """The precision the backend ran at (read back from the session where it can be)."""
        if self._runner is None or not getattr(self._runner, "active", False):
            return self.setting.precision
        try:
            return str(self._runner.info().get("precision_effective") or self.setting.precision)
        except Exception:  # info() reads library properties; a failure there is no reason to stop
            return self.setting.precision

    def describe(self) -> str:
        s = self.setting
        extra = f", hint {s.openvino_hint}" if s.openvino_hint else ""
        return f"{s.backend} {s.precision}{extra} ({self.path})"

    def close(self) -> None:
        self._runner = None
