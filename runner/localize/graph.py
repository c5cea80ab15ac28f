"""The reference ONNX graph as a list of layers in topological order, and the small graphs
``dmx localize`` builds from a variant model: the model with extra outputs, and the one node
(or short chain) that makes one tensor, cut out with ``onnx.helper``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np


class LocalizeError(RuntimeError):
    """localize cannot run as asked (no ONNX graph, unknown cell, models of different graphs)."""


@dataclass(frozen=True)
class Layer:
    """One tensor a node makes: the unit localize compares."""

    tensor: str
    node: str
    op_type: str
    topo_index: int            # index of the node among the graph's (non-Constant) nodes
    inputs: tuple[str, ...]    # the node's tensor inputs (initializers excluded)


def load_onnx(path: str) -> Any:
    import onnx
    try:
        return onnx.load(path)
    except Exception as e:  # protobuf raises its own DecodeError types
        raise LocalizeError(f"{path}: not an ONNX model ({type(e).__name__}: {e})") from None


def is_onnx_file(path: str) -> bool:
    return str(path).lower().endswith(".onnx")


def layers_of(model: Any) -> list[Layer]:
    """Every output of every node (Constant nodes excluded), in the graph's topological order."""
    g = model.graph
    consts = {i.name for i in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    out: list[Layer] = []
    k = 0
    for n in g.node:
        if n.op_type == "Constant":
            continue
        ins = tuple(i for i in n.input if i and i not in consts)
        for o in n.output:
            if o:
                out.append(Layer(o, n.name or f"{n.op_type}_{k}", n.op_type, k, ins))
        k += 1
    return out


def graph_inputs(model: Any) -> list[str]:
    inits = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def value_types(model: Any) -> dict[str, tuple[int, list[int | None]]]:
    """name -> (ONNX elem type, shape with None for unknown dims), from shape inference."""
    import onnx
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # shape inference gives up on some graphs; types then default to float
        inferred = model
    out: dict[str, tuple[int, list[int | None]]] = {}
    g = inferred.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        t = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim] \
            if t.HasField("shape") else []
        out[vi.name] = (t.elem_type, dims)
    return out


def tensor_bytes(types: dict[str, tuple[int, list[int | None]]], name: str, fallback: int) -> int:
    """Bytes of one tensor at batch 1 (float32), ``fallback`` when its shape is unknown."""
    if name not in types or not types[name][1]:
        return fallback
    dims = [1 if d is None else d for d in types[name][1]]
    return 4 * int(np.prod(dims))


def with_outputs(model: Any, names: Iterable[str], types: dict[str, tuple[int, list]]) -> Any:
    """A copy of ``model`` whose graph also outputs ``names`` (after its own outputs)."""
    import onnx
    from onnx import helper
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            elem = types.get(n, (onnx.TensorProto.FLOAT, []))[0] or onnx.TensorProto.FLOAT
            m.graph.output.append(helper.make_tensor_value_info(n, elem, None))
            have.add(n)
    return m


def cut(model: Any, tensor: str, available: set[str],
        types: dict[str, tuple[int, list]]) -> tuple[Any, list[str]] | None:
    """The nodes of ``model`` that make ``tensor`` from tensors in ``available`` (which the
    reference side can supply) and initializers, as a standalone ONNX model; returns it with
    its input names, or None when ``model`` does not make ``tensor``. In a QDQ model the cut of a
    Conv output is Quantize/Dequantize of its input, Dequantize of its weights and the Conv."""
    import onnx
    from onnx import helper
    g = model.graph
    producer = {o: n for n in g.node for o in n.output if o}
    inits = {i.name: i for i in g.initializer}
    if tensor not in producer:
        return None
    nodes: dict[int, Any] = {}
    order = {id(n): k for k, n in enumerate(g.node)}
    inputs: list[str] = []
    used_inits: set[str] = set()
    stack = [producer[tensor]]
    while stack:
        n = stack.pop()
        if order[id(n)] in nodes:
            continue
        nodes[order[id(n)]] = n
        for i in n.input:
            if not i or i in inputs:
                continue
            if i in inits:
                used_inits.add(i)
            elif i in available or i not in producer:
                inputs.append(i)
            else:
                stack.append(producer[i])
        if len(nodes) > 64:  # a cut this long is no longer "this layer by itself"
            return None
    vis = [helper.make_tensor_value_info(i, types.get(i, (onnx.TensorProto.FLOAT, []))[0]
                                         or onnx.TensorProto.FLOAT, None) for i in inputs]
    out = helper.make_tensor_value_info(tensor, types.get(tensor, (onnx.TensorProto.FLOAT, []))[0]
                                        or onnx.TensorProto.FLOAT, None)
    graph = helper.make_graph([nodes[k] for k in sorted(nodes)], f"cut_{tensor}", vis, [out],
                              initializer=[inits[i] for i in sorted(used_inits)])
    m = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    return m, inputs
