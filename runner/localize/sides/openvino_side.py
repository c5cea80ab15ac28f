"""OpenVINO: ``read_model`` then ``add_outputs`` for the asked-for ONNX tensor names, compiled
with the config a sweep uses (precision hint included). A name the reader no longer has (folded
or fused while converting) is not observable."""
from __future__ import annotations

import os
import tempfile
from typing import Any, Callable

import numpy as np

from runner.backends import BACKENDS

from ..graph import is_onnx_file, load_onnx
from .base import Side


class OpenVinoSide(Side):
    backend = "openvino"

    def __init__(self, *a: Any, **k: Any) -> None:
        super().__init__(*a, **k)
        import openvino as ov
        self._ov = ov
        self.core = ov.Core()
        model = self.core.read_model(self.path)
        # the ONNX graph it was read from names the layers (None for an IR model: NNCF int8)
        self.model = load_onnx(self.path) if is_onnx_file(self.path) else None
        self._names: set[str] = set()
        for op in model.get_ops():
            if op.get_type_name() in ("Constant", "Result"):
                continue
            for out in op.outputs():
                self._names.update(out.get_names())
        self._compiled: dict[tuple[str, ...], Any] = {}

    def observable(self) -> set[str]:
        return self._names

    def missing_note(self) -> str:
        return "OpenVINO's reader fused or folded it away (no tensor of that name)"

    def config(self) -> dict[str, Any]:
        runner = BACKENDS["openvino"](self.artifacts, self.setting, self.threads)
        return runner.config() if hasattr(runner, "config") else {}

    def tensors(self, x: np.ndarray, names: list[str]) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
        key = tuple(names)
        if key not in self._compiled:
            self._compiled.clear()
            model = self.core.read_model(self.path)
            n_out = len(model.outputs)
            inp_names = set(model.inputs[0].get_names())
            extra = [n for n in names if n in self._names and n not in inp_names]
            if extra:
                model.add_outputs(extra)
            compiled = self.core.compile_model(model, "CPU", self.config())
            self._compiled[key] = (compiled, compiled.create_infer_request(), n_out, inp_names)
        compiled, req, n_out, inp_names = self._compiled[key]
        res = req.infer({0: x})
        outs = [np.array(res[o]) for o in compiled.outputs]
        got: dict[str, np.ndarray] = {}
        for o, arr in zip(compiled.outputs, outs):
            for n in o.get_names():
                if n in names:
                    got[n] = arr
        for n in names:
            if n in inp_names:
                got[n] = x
        return got, outs[:n_out]

    def compile_cut(self, model: Any) -> Callable[[dict[str, np.ndarray]], np.ndarray] | None:
        if not is_onnx_file(self.path):
            return None  # an IR model (NNCF int8) has no ONNX graph to cut from
        fd, tmp = tempfile.mkstemp(suffix=".onnx")
        os.close(fd)
        try:
            with open(tmp, "wb") as f:
                f.write(model.SerializeToString())
            compiled = self.core.compile_model(self.core.read_model(tmp), "CPU", self.config())
        finally:
            os.unlink(tmp)
        req = compiled.create_infer_request()
        names = [next(iter(i.get_names())) for i in compiled.inputs]

        def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
            res = req.infer({k: feeds[n] for k, n in enumerate(names)})
            return np.array(res[compiled.outputs[0]])
        return run

    def close(self) -> None:
        self._compiled.clear()
        super().close()
