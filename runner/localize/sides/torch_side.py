"""torch: the ONNX graph run node by node with torch kernels (runner/models/onnx_torch.py), so
every intermediate has its ONNX name. The exported graph has BatchNorm folded into the Conv
weights, so the interpreter is close to, not bit-equal with, the eager model; ``eager`` runs
the eager model of the run so the result can say how close (``torch_eager_check``)."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from dmx.runner.models.onnx_torch import OnnxModule, OnnxToTorchError

from ..graph import LocalizeError, graph_inputs, layers_of, load_onnx
from .base import Side

_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class TorchSide(Side):
    backend = "torch"

    def __init__(self, *a: Any, **k: Any) -> None:
        super().__init__(*a, **k)
        import torch
        self._torch = torch
        if self.setting.precision not in _DTYPES:
            raise LocalizeError(f"torch has no {self.setting.precision} path")
        self.dtype = getattr(torch, _DTYPES[self.setting.precision])
        self.model = load_onnx(self.path)
        try:
            self.module = OnnxModule(self.model).to(self.dtype).eval()
        except OnnxToTorchError as e:
            raise LocalizeError(f"the torch side runs the ONNX graph through dmx's interpreter: {e}") from None
        self.input_name = graph_inputs(self.model)[0]
        self._names = {layer.tensor for layer in layers_of(self.model)} | {self.input_name}
        self._outputs = [o.name for o in self.model.graph.output]

    def observable(self) -> set[str]:
        return self._names

    def _np(self, t: Any) -> np.ndarray:
        return t.float().numpy() if hasattr(t, "float") else np.asarray(t, np.float32)

    def tensors(self, x: np.ndarray, names: list[str]) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
        torch = self._torch
        torch.set_num_threads(self.threads)
        with torch.inference_mode():
            got = self.module.trace({self.input_name: torch.from_numpy(x).to(self.dtype)},
                                    set(names) | set(self._outputs))
        return ({n: self._np(got[n]) for n in names if n in got}, [self._np(got[o]) for o in self._outputs])

    def plain(self, x: np.ndarray) -> list[np.ndarray]:
        """The interpreter without kept tensors: keeping one changes no kernel, so marking
        tensors cannot change torch's answer."""
        return self.tensors(x, [])[1]

    def eager(self, x: np.ndarray) -> list[np.ndarray] | None:
        """The eager torch model of the run (the one its torch cells ran), when there is one:
        how closely the interpreter stands in for it."""
        if self.artifacts.torch_factory is None:
            return None
        return super().plain(x)

    def compile_cut(self, model: Any) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
        torch = self._torch
        mod = OnnxModule(model).to(self.dtype).eval()
        out = model.graph.output[0].name

        def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
            with torch.inference_mode():
                got = mod.trace({k: torch.from_numpy(np.ascontiguousarray(v)).to(self.dtype)
                                 for k, v in feeds.items()}, {out})
            return self._np(got[out])
        return run

    def precision(self) -> str:
        return self.setting.precision
