"""ONNX graph -> torch module: runs an ONNX file's nodes with torch's own kernels.

dmx's torch cells for a model that ships only as ONNX. ``onnx2torch`` would do this, but it
imports torchvision, which cannot be installed beside torch 2.13 CPU here; this interpreter needs
only ``onnx`` and covers the operators of the built-in detector (and a few trivial ones).
Float initializers and constants become (frozen) parameters, so ``.to(dtype)`` casts the model like any other
torch module; integer initializers (shapes, slice bounds) stay constants.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class OnnxToTorchError(RuntimeError):
    """The ONNX graph uses an operator or attribute this interpreter does not implement."""


def _pool_padding(pads: list[int]) -> tuple[int, int]:
    half = len(pads) // 2
    if pads[:half] != pads[half:]:
        raise OnnxToTorchError(f"asymmetric pads {pads} are not supported")
    return tuple(pads[:half])  # type: ignore[return-value]


def _conv(m: "OnnxModule", ins: list, a: dict) -> Any:
    x, w = ins[0], ins[1]
    b = ins[2] if len(ins) > 2 else None
    pads = list(a.get("pads", [0, 0, 0, 0]))
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise OnnxToTorchError("Conv auto_pad is not supported")
    half = len(pads) // 2
    if pads[:half] != pads[half:]:
        x = F.pad(x, [p for i in reversed(range(half)) for p in (pads[i], pads[i + half])])
        pads = [0] * len(pads)
    return F.conv2d(x, w, b, stride=tuple(a.get("strides", [1, 1])), padding=tuple(pads[:half]),
                    dilation=tuple(a.get("dilations", [1, 1])), groups=int(a.get("group", 1)))


def _maxpool(m: "OnnxModule", ins: list, a: dict) -> Any:
    k = tuple(a["kernel_shape"])
    return F.max_pool2d(ins[0], k, stride=tuple(a.get("strides", k)),
                        padding=_pool_padding(list(a.get("pads", [0] * 2 * len(k)))),
                        ceil_mode=bool(a.get("ceil_mode", 0)))


def _slice(m: "OnnxModule", ins: list, a: dict) -> Any:
    x = ins[0]
    starts, ends = m.ints(ins[1]), m.ints(ins[2])
    axes = m.ints(ins[3]) if len(ins) > 3 and ins[3] is not None else list(range(len(starts)))
    steps = m.ints(ins[4]) if len(ins) > 4 and ins[4] is not None else [1] * len(starts)
    index: list[slice] = [slice(None)] * x.dim()
    for s, e, ax, st in zip(starts, ends, axes, steps):
        if st < 1:
            raise OnnxToTorchError("Slice with a negative step is not supported")
        n = x.shape[ax]
        index[ax] = slice(max(-n, min(s, n)), max(-n, min(e, n)), st)
    return x[tuple(index)]


def _reshape(m: "OnnxModule", ins: list, a: dict) -> Any:
    shape = [ins[0].shape[i] if d == 0 else d for i, d in enumerate(m.ints(ins[1]))]
    return torch.reshape(ins[0], shape)


def _resize(m: "OnnxModule", ins: list, a: dict) -> Any:
    mode = a.get("mode", b"nearest")
    ctm = a.get("coordinate_transformation_mode", b"half_pixel")
    if mode != b"nearest" or ctm != b"asymmetric" or a.get("nearest_mode", b"round_prefer_floor") != b"floor":
        raise OnnxToTorchError(f"Resize {mode!r}/{ctm!r} is not supported (only nearest, asymmetric, floor)")
    x = ins[0]
    scales = m.floats(ins[2]) if len(ins) > 2 and ins[2] is not None and m.numel(ins[2]) else None
    if scales:
        size = [int(np.floor(n * s)) for n, s in zip(x.shape[2:], scales[2:])]
    else:
        size = m.ints(ins[3])[2:]
    return F.interpolate(x, size=size, mode="nearest")  # torch "nearest" is floor(dst * in/out)


def _concat(m: "OnnxModule", ins: list, a: dict) -> Any:
    return torch.cat(ins, dim=int(a["axis"]))


def _clip(m: "OnnxModule", ins: list, a: dict) -> Any:
    lo = ins[1] if len(ins) > 1 and ins[1] is not None else a.get("min")
    hi = ins[2] if len(ins) > 2 and ins[2] is not None else a.get("max")
    lo = None if lo is None else float(lo.item() if hasattr(lo, "item") else lo)
    hi = None if hi is None else float(hi.item() if hasattr(hi, "item") else hi)
    return torch.clamp(ins[0], lo, hi)


def _reduce_mean(m: "OnnxModule", ins: list, a: dict) -> Any:
    axes = m.ints(ins[1]) if len(ins) > 1 and ins[1] is not None else a.get("axes")
    keep = bool(a.get("keepdims", 1))
    if not axes:
        return torch.mean(ins[0], dim=None, keepdim=keep) if keep else torch.mean(ins[0])
    return torch.mean(ins[0], dim=tuple(int(x) for x in axes), keepdim=keep)


def _gemm(m: "OnnxModule", ins: list, a: dict) -> Any:
    x, w = ins[0], ins[1]
    if a.get("transA", 0):
        x = x.t()
    if a.get("transB", 0):
        w = w.t()
    y = float(a.get("alpha", 1.0)) * (x @ w)
    if len(ins) > 2 and ins[2] is not None:
        y = y + float(a.get("beta", 1.0)) * ins[2]
    return y


def _flatten(m: "OnnxModule", ins: list, a: dict) -> Any:
    axis = int(a.get("axis", 1))
    x = ins[0]
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


OPS: dict[str, Callable[["OnnxModule", list, dict], Any]] = {
    "Conv": _conv,
    "MaxPool": _maxpool,
    "Slice": _slice,
    "Reshape": _reshape,
    "Resize": _resize,
    "Concat": _concat,
    "Clip": _clip,
    "ReduceMean": _reduce_mean,
    "Gemm": _gemm,
    "Flatten": _flatten,
    "MatMul": lambda m, ins, a: ins[0] @ ins[1],
    "GlobalAveragePool": lambda m, ins, a: torch.mean(ins[0], dim=(2, 3), keepdim=True),
    "Sigmoid": lambda m, ins, a: torch.sigmoid(ins[0]),
    "Relu": lambda m, ins, a: torch.relu(ins[0]),
    "Exp": lambda m, ins, a: torch.exp(ins[0]),
    "Identity": lambda m, ins, a: ins[0],
    "Mul": lambda m, ins, a: ins[0] * ins[1],
    "Add": lambda m, ins, a: ins[0] + ins[1],
    "Sub": lambda m, ins, a: ins[0] - ins[1],
    "Div": lambda m, ins, a: ins[0] / ins[1],
    "Transpose": lambda m, ins, a: ins[0].permute(*a["perm"]),
}


class OnnxModule(nn.Module):
    """An ``nn.Module`` that executes an ONNX graph node by node with torch operators."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        import onnx
        from onnx import numpy_helper
        graph = model.graph
        missing = sorted({n.op_type for n in graph.node if n.op_type not in OPS and n.op_type != "Constant"})
        if missing:
            raise OnnxToTorchError(f"ONNX operators not supported by dmx's torch interpreter: {', '.join(missing)}")
        self._names: dict[str, str] = {}
        self._consts: dict[str, np.ndarray] = {}
        inits = [(i.name, numpy_helper.to_array(i)) for i in graph.initializer]
        inits += [(n.output[0], numpy_helper.to_array(n.attribute[0].t)) for n in graph.node
                  if n.op_type == "Constant"]
        for k, (name, arr) in enumerate(inits):
            if np.issubdtype(arr.dtype, np.floating):
                key = f"p{k}"
                self.register_parameter(key, nn.Parameter(torch.from_numpy(arr.copy()), requires_grad=False))
                self._names[name] = key
            else:
                self._consts[name] = arr
        self._nodes = [(n.op_type, list(n.input), list(n.output),
                        {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute})
                       for n in graph.node if n.op_type != "Constant"]
        known = set(self._names) | set(self._consts)
        self._inputs = [i.name for i in graph.input if i.name not in known]
        self._outputs = [o.name for o in graph.output]

    @classmethod
    def from_file(cls, path: str) -> "OnnxModule":
        import onnx
        return cls(onnx.load(path))

    def ints(self, v: Any) -> list[int]:
        return [int(x) for x in (v.tolist() if isinstance(v, (np.ndarray, torch.Tensor)) else v)]

    def floats(self, v: Any) -> list[float]:
        return [float(x) for x in (v.tolist() if isinstance(v, (np.ndarray, torch.Tensor)) else v)]

    def numel(self, v: Any) -> int:
        return int(np.size(v)) if isinstance(v, np.ndarray) else int(v.numel())

    def forward(self, *xs: torch.Tensor) -> Any:
        env: dict[str, Any] = dict(zip(self._inputs, xs))
        for op, ins, outs, attrs in self._nodes:
            args = [None if not name else env[name] if name in env
                    else getattr(self, self._names[name]) if name in self._names
                    else self._consts[name] for name in ins]
            env[outs[0]] = OPS[op](self, args, attrs)
        result = tuple(env[o] for o in self._outputs)
        return result[0] if len(result) == 1 else result

    def trace(self, feeds: dict[str, torch.Tensor], keep: set[str]) -> dict[str, torch.Tensor]:
        """Run the graph from ``feeds`` (graph inputs, or any intermediate tensors by name: the
        nodes that make them are then skipped) and return the tensors named in ``keep``. Every
        other intermediate is dropped after its last consumer, so memory holds the live
        frontier of the graph, not all of it (``dmx localize``)."""
        last_use: dict[str, int] = {}
        for k, (_, ins, _, _) in enumerate(self._nodes):
            for name in ins:
                last_use[name] = k
        env: dict[str, Any] = dict(feeds)
        kept = {n: env[n] for n in keep if n in env}
        for k, (op, ins, outs, attrs) in enumerate(self._nodes):
            if outs[0] in feeds:
                continue
            args = [None if not name else env[name] if name in env
                    else getattr(self, self._names[name]) if name in self._names
                    else self._consts[name] for name in ins]
            env[outs[0]] = OPS[op](self, args, attrs)
            if outs[0] in keep:
                kept[outs[0]] = env[outs[0]]
            for name in ins:
                if name in env and last_use.get(name) == k:
                    del env[name]
        return kept
