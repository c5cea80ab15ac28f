"""OpenVINO: ``read_model`` then ``add_outputs`` for the asked-for ONNX tensor names, compiled
with the config a sweep uses (precision hint included). A name the reader no longer has (folded
or fused while converting) is not observable."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from dmx.runner.backends import BACKENDS

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

    def cut_runner(self, tensor: str, available: set[str]
                   ) -> tuple[Callable[[dict[str, np.ndarray]], np.ndarray], list[str]] | None:
        """Cut in OpenVINO's own graph (an ONNX file as read, or an IR such as NNCF's int8 with
        its FakeQuantize nodes): the op making ``tensor`` and its producers back to tensors the
        reference supplies, which become Parameters; compiled with the sweep's config."""
        import openvino as ov
        from openvino import opset13 as ops
        model = self.core.read_model(self.path)
        target = None
        for op in model.get_ordered_ops():
            for out in op.outputs():
                if tensor in out.get_names():
                    target = out
        if target is None:
            return None
        params: list[Any] = []
        names: list[str] = []
        seen: set[str] = set()
        stack = [target.get_node()]
        while stack:
            node = stack.pop()
            if node.get_friendly_name() in seen:
                continue
            seen.add(node.get_friendly_name())
            if len(seen) > 64:  # no longer "this layer by itself"
                return None
            for inp in node.inputs():
                src = inp.get_source_output()
                kind = src.get_node().get_type_name()
                if kind == "Constant":
                    continue
                hit = [n for n in src.get_names() if n in available]
                if not hit and kind != "Parameter":
                    stack.append(src.get_node())
                    continue
                name = hit[0] if hit else next(iter(src.get_names()))
                if name not in names:
                    p = ops.parameter(src.get_partial_shape(), src.get_element_type(), name=name)
                    p.output(0).set_names({name})
                    params.append(p)
                    names.append(name)
                inp.replace_source_output(params[names.index(name)].output(0))
        compiled = self.core.compile_model(ov.Model([ops.result(target)], params, "cut"), "CPU", self.config())
        req = compiled.create_infer_request()

        def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
            res = req.infer({k: feeds[n] for k, n in enumerate(names)})
            return np.array(res[compiled.outputs[0]])
        return run, names

    def close(self) -> None:
        self._compiled.clear()
        super().close()
