"""Backends: each is one module declaring its name, version, axes, precisions and model products;
the matrix learns their axes from the registry."""
from __future__ import annotations

import pickle

from dmx.matrix import make_cell, parse_spec, expand
from dmx.matrix.axes import AXES, AXIS_ORDER, BACKEND_AXES
from dmx.runner.backends import BACKENDS, BackendRunner, InferSetting


def test_every_registered_backend_declares_its_name_precisions_and_axes():
    assert {"torch", "onnxruntime", "openvino"} <= set(BACKENDS)
    for name, cls in BACKENDS.items():
        assert issubclass(cls, BackendRunner) and cls.name == name
        assert cls.precisions and set(cls.precisions) <= set(AXES["precision"].levels)
        for axis in cls.axes:
            assert name in BACKEND_AXES[axis.name]
            assert set(axis.levels) <= set(AXES[axis.name].levels)
    assert set(AXES["backend"].levels) == set(BACKENDS)


def test_backend_axes_are_null_on_cells_of_backends_that_do_not_declare_them():
    order = tuple(AXIS_ORDER)
    torch_cell = make_cell({"backend": "torch", "conversion": "onnx-legacy", "ort_opt": "all",
                            "openvino_hint": "f32"}, order)
    assert torch_cell["conversion"] is None and torch_cell["ort_opt"] is None
    ov_cell = make_cell({"backend": "openvino", "conversion": "onnx-legacy", "ort_opt": "all",
                         "openvino_hint": "f32"}, order)
    assert ov_cell["conversion"] == "onnx-legacy" and ov_cell["openvino_hint"] == "f32"
    assert ov_cell["ort_opt"] is None


def test_the_canonical_axis_order_keeps_cell_ids_of_earlier_versions():
    # cell ids hash the factors in this order: moving axes into backends must not change it
    assert AXIS_ORDER[:17] == ["decoder", "exif", "color", "reduce", "dct", "upsample", "resize",
                               "fit", "backend", "precision", "openvino_hint", "ort_opt",
                               "conversion", "threads", "batch", "device", "tf32"]


def test_a_spec_sweeps_a_backend_axis_without_multiplying_other_backends_cells():
    spec = parse_spec({"name": "x", "dataset": {"path": "."}, "model": "tiny",
                       "axes": {"backend": ["torch", "onnxruntime"],
                                "ort_opt": ["disable", "basic", "all"]}})
    cells = expand(spec)
    assert sum(c["backend"] == "torch" for c in cells) == 1
    assert sum(c["backend"] == "onnxruntime" for c in cells) == 3


def test_infer_setting_carries_backend_axes_and_survives_pickling():
    s = InferSetting.from_factors({"backend": "openvino", "openvino_hint": "f32", "decoder": "pil",
                                   "threads": "2", "ort_opt": None})
    assert s.openvino_hint == "f32" and s.ort_opt is None and s.threads == 2
    assert s.options == {"openvino_hint": "f32"}
    assert pickle.loads(pickle.dumps(s)) == s and hash(pickle.loads(pickle.dumps(s))) == hash(s)
    assert s == InferSetting(backend="openvino", threads=2, openvino_hint="f32")


def test_a_level_a_backend_lacks_is_its_skip_reason(tmp_path):
    from dmx.runner.backends import ModelArtifacts
    art = ModelArtifacts(name="m", task="classification", torch_factory="builtin:tiny", weights=None)
    reason = BACKENDS["onnxruntime"].unsupported(
        art, InferSetting(backend="onnxruntime", conversion="openvino-from-torch"))
    assert reason and "openvino-from-torch" in reason


def test_the_graph_float_type_is_read_once_per_file_and_again_when_the_file_changes(
        tmp_path, monkeypatch):
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    from dmx.runner.backends import onnxruntime_backend as ort_backend

    def save(dtype) -> None:
        w = numpy_helper.from_array(np.ones((4,), dtype), "w")
        node = helper.make_node("Add", ["x", "w"], ["y"])
        t = onnx.TensorProto.FLOAT16 if dtype == np.float16 else onnx.TensorProto.FLOAT
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", t, [4])],
                                  [helper.make_tensor_value_info("y", t, [4])], [w])
        onnx.save(helper.make_model(graph), str(path))

    monkeypatch.setenv("DMX_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "m.onnx"
    save(np.float16)
    assert ort_backend.graph_float_type(str(path)) == "fp16"
    real = ort_backend._onnx_float_types

    def unread(_p):
        raise AssertionError("read the graph again")

    monkeypatch.setattr(ort_backend, "_onnx_float_types", unread)
    assert ort_backend.graph_float_type(str(path)) == "fp16"
    save(np.float32)                      # another file at the same path: read again
    monkeypatch.setattr(ort_backend, "_onnx_float_types", real)
    assert ort_backend.graph_float_type(str(path)) == "fp32"
