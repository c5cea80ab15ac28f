"""Precisions, conversions and backend settings: each realised as asked, and what ran recorded."""
from __future__ import annotations

import json
from pathlib import Path

import duckdb
import onnx
import pytest

from dmx.matrix import parse_spec
from dmx.runner.sweep import RunOptions, run_spec


def _cpu_has_bf16() -> bool:
    import openvino as ov
    return "bfloat16" in str(ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT"))


@pytest.fixture(scope="module")
def precision_run(photo_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prec") / "run"
    spec = parse_spec({
        "name": "precision", "dataset": {"path": str(photo_dir)}, "model": "tiny",
        "axes": {"backend": ["torch", "onnxruntime", "openvino"],
                 "precision": ["fp32", "fp16", "bf16", "int8"],
                 "openvino_hint": ["default", "f32"]},
        "calibration": {"limit": 3}, "reference": {"backend": "torch", "precision": "fp32"}})
    run_spec(spec, RunOptions(out=str(out), executor="local", progress=False))
    return out


def cells(run: Path) -> dict[tuple, dict]:
    con = duckdb.connect()
    res = con.execute(
        f"SELECT c.backend, c.precision, c.openvino_hint, c.status, c.skip_reason, "
        f"any_value(r.precision_effective) AS eff, max(r.out_max_abs) AS max_abs, "
        f"bool_and(r.top1_agree) AS agree FROM read_parquet('{run}/cells.parquet') c "
        f"JOIN read_parquet('{run}/rows/*/*.parquet') r USING (cell_id) GROUP BY ALL")
    names = [d[0] for d in res.description]
    return {(r[0], r[1], r[2]): dict(zip(names, r)) for r in res.fetchall()}


def test_torch_casts_model_and_input_for_bf16_and_fp16(precision_run: Path):
    c = cells(precision_run)
    assert c[("torch", "bf16", None)]["eff"] == "bf16"
    assert c[("torch", "fp16", None)]["eff"] == "fp16"
    assert 0 < c[("torch", "bf16", None)]["max_abs"] < 1.0


def test_combinations_a_backend_cannot_do_are_skipped_with_the_reason(precision_run: Path):
    c = cells(precision_run)
    assert c[("torch", "int8", None)]["status"] == "skipped"
    assert "int8" in c[("torch", "int8", None)]["skip_reason"]
    assert c[("onnxruntime", "bf16", None)]["status"] == "skipped"
    assert "bf16" in c[("onnxruntime", "bf16", None)]["skip_reason"]


def test_onnxruntime_fp16_runs_a_converted_fp16_graph(precision_run: Path):
    c = cells(precision_run)[("onnxruntime", "fp16", None)]
    assert c["status"] == "ok" and c["eff"] == "fp16"
    m = json.loads((precision_run / "manifest.json").read_text())
    path = m["model"]["files"]["ort:onnx-dynamo:fp16"]
    types = {i.data_type for i in onnx.load(path).graph.initializer}
    assert onnx.TensorProto.FLOAT16 in types


def test_onnxruntime_int8_is_static_qdq_calibrated_on_the_named_slice(precision_run: Path):
    c = cells(precision_run)[("onnxruntime", "int8", None)]
    assert c["status"] == "ok" and c["eff"] == "int8"
    m = json.loads((precision_run / "manifest.json").read_text())
    graph = onnx.load(m["model"]["files"]["ort:onnx-dynamo:int8"]).graph
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert len(m["model"]["conversion"]["calibration_images"]) == 3


def test_openvino_int8_is_quantised_with_nncf(precision_run: Path):
    c = cells(precision_run)[("openvino", "int8", "f32")]
    assert c["status"] == "ok" and c["eff"] == "int8+fp32"


def test_openvino_records_the_precision_it_ran_not_the_one_asked(precision_run: Path):
    c = cells(precision_run)
    assert c[("openvino", "fp32", "f32")]["eff"] == "fp32"
    assert c[("openvino", "fp32", "f32")]["max_abs"] < 1e-4
    default = c[("openvino", "fp32", "default")]["eff"]
    assert default == ("bf16" if _cpu_has_bf16() else "fp32")


@pytest.mark.skipif(not _cpu_has_bf16(), reason="this CPU has no bf16 kernels for OpenVINO")
def test_openvino_default_hint_runs_bf16_and_diverges_far_more_than_f32(precision_run: Path):
    c = cells(precision_run)
    assert c[("openvino", "fp32", "default")]["max_abs"] > 100 * c[("openvino", "fp32", "f32")]["max_abs"]


def test_conversion_levels_make_distinct_models_and_skip_what_does_not_apply(photo_dir: Path, tmp_path: Path):
    spec = parse_spec({
        "name": "conv", "dataset": {"path": str(photo_dir)}, "model": "tiny",
        "axes": {"backend": ["torch", "onnxruntime", "openvino"],
                 "conversion": ["onnx-legacy", "openvino-from-torch"], "ort_opt": ["disable"],
                 "threads": [1], "batch": [1]},
        "reference": {"backend": "torch"}})
    out = tmp_path / "run"
    run_spec(spec, RunOptions(out=str(out), executor="local", progress=False))
    m = json.loads((out / "manifest.json").read_text())
    assert {"ov:torch", "ort:onnx-legacy:fp32", "ov:onnx-legacy"} <= set(m["model"]["files"])
    assert "dynamo=False" in m["model"]["conversion"]["onnx:onnx-legacy"]["command"]
    skipped = {tuple(r) for r in duckdb.connect().execute(
        f"SELECT backend, conversion FROM read_parquet('{out}/cells.parquet') WHERE status = 'skipped'").fetchall()}
    assert skipped == {("onnxruntime", "openvino-from-torch")}
    ort = next(v for v in m["backends"].values() if v["backend"] == "onnxruntime")
    assert ort["properties"]["graph_optimization_level"] == "disable" and ort["threads"] == 1


def test_onnxruntime_int8_calibrates_a_model_whose_input_is_not_named_input(tmp_path: Path):
    """A user's ONNX file names its image input as it likes; calibration fed "input" before."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from dmx.runner.backends.onnxruntime_backend import quantize_ort_int8
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["pixel_values", "w"], ["logits"], pads=[1, 1, 1, 1])], "g",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4, 8, 8])], [w])
    path = tmp_path / "user.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    calib = rng.standard_normal((4, 3, 8, 8)).astype(np.float32)
    out, notes = quantize_ort_int8(str(path), "user", calib, ["a", "b", "c", "d"])
    q = onnx.load(out)
    assert any(n.op_type == "QuantizeLinear" for n in q.graph.node)
    sess = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    y = sess.run(None, {"pixel_values": calib[:1]})[0]
    assert y.shape == (1, 4, 8, 8)
