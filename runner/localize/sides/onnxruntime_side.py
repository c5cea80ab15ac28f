"""ONNX Runtime: the same model with every asked-for node output added as a graph output, run
with the session options a sweep uses (threads, graph optimisation level)."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ..graph import graph_inputs, layers_of, load_onnx, value_types, with_outputs
from .base import Side

_OPT = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
        "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


class OnnxRuntimeSide(Side):
    backend = "onnxruntime"

    def __init__(self, *a: Any, **k: Any) -> None:
        super().__init__(*a, **k)
        self.model = load_onnx(self.path)
        self.types = value_types(self.model)
        self._names = {layer.tensor for layer in layers_of(self.model)} | set(graph_inputs(self.model))
        self._n_out = len(self.model.graph.output)
        self._sessions: dict[tuple[str, ...], Any] = {}
        self.alias = _dequantized(self.model)

    def observable(self) -> set[str]:
        return self._names

    def cut_target(self, name: str) -> str:
        return self.alias.get(name, name)

    def note_for(self, name: str) -> str | None:
        if name in self.alias:
            return "variant value as its consumers see it: after QuantizeLinear/DequantizeLinear"
        return None

    def _session(self, model: Any) -> Any:
        import onnxruntime as ort
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPT[self.setting.ort_opt or "all"])
        so.log_severity_level = 3
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])

    def tensors(self, x: np.ndarray, names: list[str]) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
        key = tuple(names)
        asked = [self.alias.get(n, n) for n in names]
        if key not in self._sessions:
            self._sessions.clear()  # one instrumented session alive at a time
            self._sessions[key] = self._session(with_outputs(self.model, asked, self.types))
        sess = self._sessions[key]
        inp = sess.get_inputs()[0].name
        outs = sess.run(None, {inp: x})
        by_name = dict(zip([o.name for o in sess.get_outputs()], outs))
        got = {n: by_name[a] for n, a in zip(names, asked) if n != inp and a in by_name}
        if inp in names:
            got[inp] = x
        return got, list(outs[: self._n_out])

    def compile_cut(self, model: Any) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
        sess = self._session(model)

        def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
            want = {i.name: i.type for i in sess.get_inputs()}
            cast = {k: (v.astype(np.float16) if want.get(k) == "tensor(float16)" else v)
                    for k, v in feeds.items() if k in want}
            return sess.run(None, cast)[0]
        return run

    def close(self) -> None:
        self._sessions.clear()
        super().close()


def _dequantized(model: Any) -> dict[str, str]:
    """tensor -> the DequantizeLinear output that stands for it in a QDQ model: every consumer
    of the tensor is a QuantizeLinear whose only consumer is a DequantizeLinear. The quantiser
    often drops a Clip/Relu and gives its name to the Conv before it (the [0, 6] range of the
    quantised value does the clipping), so the raw tensor of that name is not what the reference
    tensor means; its dequantized value is."""
    consumers: dict[str, list[Any]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    alias: dict[str, str] = {}
    for name, users in consumers.items():
        if not users or any(u.op_type != "QuantizeLinear" or u.input[0] != name for u in users):
            continue
        q = users[0]
        dq = consumers.get(q.output[0], [])
        if len(dq) == 1 and dq[0].op_type == "DequantizeLinear":
            alias[name] = dq[0].output[0]
    return alias
