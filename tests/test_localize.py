"""dmx localize: the first layer where a backend or precision diverges (issue 13).

Real parts only: ONNX files exported by torch, quantised by ONNX Runtime / NNCF, run on ONNX
Runtime, OpenVINO and dmx's torch ONNX interpreter, on real JPEGs; faults are planted in copies.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pyarrow.parquet as pq
import pytest
from onnx import helper, numpy_helper

from dmx.cli import main
from dmx.matrix import parse_spec
from dmx.runner.sweep import RunOptions, run_spec


@pytest.fixture(scope="module")
def tiny_run(photo_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("loc") / "run"
    spec = parse_spec({
        "name": "localize", "dataset": {"path": str(photo_dir)}, "model": "tiny",
        "axes": {"backend": ["torch", "onnxruntime", "openvino"], "precision": ["fp32", "fp16", "int8"],
                 "openvino_hint": ["default"]},
        "calibration": {"limit": 3}, "reference": {"backend": "torch", "precision": "fp32"}})
    run_spec(spec, RunOptions(out=str(out), executor="local", progress=False))
    return out


def _cell(run: Path, **factors: str) -> str:
    rows = pq.read_table(run / "cells.parquet").to_pylist()
    found = [r for r in rows if all(r.get(k) == v for k, v in factors.items())]
    assert len(found) == 1, found
    return found[0]["cell_id"]


def _fp32_onnx(run: Path) -> str:
    return json.loads((run / "manifest.json").read_text())["model"]["files"]["onnx:onnx-dynamo"]


def _dmx_json(capsys, *argv: str) -> dict:
    capsys.readouterr()
    assert main(list(argv) + ["--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


def _plant(src: str, dst: Path, conv_index: int, factor: float = 1.01) -> str:
    """Copy ``src`` with the weights of its ``conv_index``-th Conv scaled by ``factor``; returns
    that Conv's output tensor name."""
    m = onnx.load(src)
    conv = [n for n in m.graph.node if n.op_type == "Conv"][conv_index]
    for i, init in enumerate(m.graph.initializer):
        if init.name == conv.input[1]:
            w = numpy_helper.to_array(init) * np.float32(factor)
            m.graph.initializer[i].CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(m, str(dst))
    return conv.output[0]


def test_planted_conv_fault_is_first_divergent_and_largest_introduced(tiny_run, photo_dir, tmp_path, capsys):
    a = _fp32_onnx(tiny_run)
    planted = _plant(a, tmp_path / "planted.onnx", conv_index=1)
    j = _dmx_json(capsys, "localize", "--models", a, str(tmp_path / "planted.onnx"), "--images", str(photo_dir))
    assert set(j) >= {"first_divergent", "layers", "instrumentation_changed_output"}
    assert set(j["first_divergent"]) >= {"tensor", "node", "op_type", "topo_index", "rel_l2"}
    assert j["first_divergent"]["tensor"] == planted
    assert j["first_divergent"]["op_type"] == "Conv"
    assert 1e-3 < j["first_divergent"]["rel_l2"] <= 0.0101  # weights x 1.01 (the bias unscaled)
    intro = [l for l in j["layers"] if l["introduced_rel_l2"] is not None]
    assert max(intro, key=lambda l: l["introduced_rel_l2"])["tensor"] == planted
    after = [l for l in j["layers"] if l["topo_index"] > j["first_divergent"]["topo_index"]]
    assert after and all(l["rel_l2"] > 1e-3 for l in after)  # the error propagates ...
    assert all(l["introduced_rel_l2"] < 1e-6 for l in intro if l["tensor"] != planted)  # ... not introduced
    before = [l for l in j["layers"] if l["topo_index"] < j["first_divergent"]["topo_index"]]
    assert all(l["rel_l2"] == 0 for l in before)


def test_node_free_edit_finds_nothing(tiny_run, photo_dir, tmp_path, capsys):
    m = onnx.load(_fp32_onnx(tiny_run))
    m.graph.name = "renamed"
    for k, n in enumerate(m.graph.node):
        n.name = f"renamed_node_{k}"
    m.doc_string = "re-saved"
    onnx.save(m, str(tmp_path / "renamed.onnx"))
    j = _dmx_json(capsys, "localize", "--models", _fp32_onnx(tiny_run), str(tmp_path / "renamed.onnx"),
                  "--images", str(photo_dir))
    assert j["first_divergent"] is None
    assert all(l["observable"] and l["rel_l2"] == 0 for l in j["layers"])
    assert j["instrumentation_changed_output"] is False


def test_planted_fault_is_found_on_openvino_and_against_the_torch_interpreter(tiny_run, photo_dir, tmp_path, capsys):
    a = _fp32_onnx(tiny_run)
    planted = _plant(a, tmp_path / "planted.onnx", conv_index=0, factor=1.02)
    for extra in (["--backend", "openvino", "--openvino-hint", "f32"],
                  ["--backend", "onnxruntime", "--reference-backend", "torch"]):
        j = _dmx_json(capsys, "localize", "--models", a, str(tmp_path / "planted.onnx"),
                      "--images", str(photo_dir), "--limit", "2", *extra)
        assert j["first_divergent"]["tensor"] == planted, extra


def test_run_contrast_writes_layer_rows_that_dmx_sql_reads(tiny_run, capsys):
    cid = _cell(tiny_run, backend="onnxruntime", precision="int8")
    j = _dmx_json(capsys, "localize", str(tiny_run), "--cell", cid, "--images", "2")
    rows = pq.read_table(tiny_run / "layers" / f"cell={cid}.parquet").to_pylist()
    assert {r["image_id"] for r in rows} == set(j["images"]) and len(j["images"]) == 2
    assert len(rows) == 2 * len(j["layers"])
    assert max(l["rel_l2"] or 0 for l in j["layers"]) > 1e-4  # int8 noise is seen
    assert j["precision"] == "int8" and j["tolerance_rel_l2"] == 0.1
    capsys.readouterr()
    assert main(["sql", str(tiny_run), "SELECT count(*) AS n, count(DISTINCT tensor) AS t FROM layers "
                 f"WHERE cell_id = '{cid}'", "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out[0]["n"] == len(rows) and out[0]["t"] == len(j["layers"])


def test_qdq_tensors_are_compared_as_their_consumers_see_them(tiny_run, capsys):
    cid = _cell(tiny_run, backend="onnxruntime", precision="int8")
    j = _dmx_json(capsys, "localize", str(tiny_run), "--cell", cid, "--images", "2")
    seen = [l for l in j["layers"] if l["observable"]]
    assert seen and any("DequantizeLinear" in (l["note"] or "") for l in seen)
    assert any(l["introduced_rel_l2"] is not None for l in seen)  # the QDQ chain re-run alone
    for l in seen:  # int8 noise on a well-scaled tensor, not a wrong pairing of tensors
        assert l["cosine"] > 0.9, l


def test_openvino_and_fp16_contrasts_localize(tiny_run, capsys):
    for factors in ({"backend": "openvino", "precision": "fp32"}, {"backend": "openvino", "precision": "int8"},
                    {"backend": "onnxruntime", "precision": "fp16"}):
        j = _dmx_json(capsys, "localize", str(tiny_run), "--cell", _cell(tiny_run, **factors), "--images", "1")
        seen = [l for l in j["layers"] if l["observable"]]
        assert len(seen) >= len(j["layers"]) // 2, factors
        assert all(l["rel_l2"] is not None and l["cosine"] > 0.99 for l in seen), factors
        if factors["precision"] == "int8":  # NNCF's IR is cut in OpenVINO's own graph
            assert any(l["introduced_rel_l2"] is not None for l in seen)


def test_contrast_picks_the_cell_nearest_the_reference(tiny_run, capsys):
    j = _dmx_json(capsys, "localize", str(tiny_run), "--contrast", "precision=int8", "--images", "1")
    assert j["variant"].startswith("onnxruntime int8")  # torch int8 skipped; openvino int8 differs more
    assert (tiny_run / "layers" / f"cell={_cell(tiny_run, backend='onnxruntime', precision='int8')}.json").is_file()


def test_bad_localize_input_is_one_line_exit_2(tiny_run, capsys):
    capsys.readouterr()
    assert main(["localize", str(tiny_run), "--contrast", "decoder=opencv"]) == 2
    err = capsys.readouterr().err
    assert "no axis 'decoder'" in err and err.count("\n") == 1
    assert main(["localize", str(tiny_run), "--contrast", "backend=tensorrt"]) == 2
    assert main(["localize", str(tiny_run), "--cell", "nope"]) == 2
    assert main(["localize", str(tiny_run), "--cell", _cell(tiny_run, backend="onnxruntime", precision="fp32"),
                 "--images", "many"]) == 2
    assert main(["localize", "--models", "missing.onnx", "also.onnx", "--images", "."]) == 2
    assert main(["localize", str(tiny_run), "--contrast", "precision=int8", "--limit", "3"]) == 2
    assert main(["localize", "--models", "a.onnx", "b.onnx"]) == 2  # no --images
    err = capsys.readouterr().err
    assert "Traceback" not in err


def test_small_memory_budget_splits_the_tensors_and_gives_the_same_numbers(tiny_run, photo_dir, tmp_path):
    from dmx.runner.localize import localize_models
    a = _fp32_onnx(tiny_run)
    planted = _plant(a, tmp_path / "p.onnx", conv_index=1)
    one = localize_models(a, str(tmp_path / "p.onnx"), str(photo_dir), n_images=2)
    many = localize_models(a, str(tmp_path / "p.onnx"), str(photo_dir), n_images=2, budget_bytes=1)
    key = lambda r: (r["image_id"], r["tensor"])  # noqa: E731
    assert sorted(map(key, one.rows)) == sorted(map(key, many.rows))
    by = {key(r): r["rel_l2"] for r in one.rows}
    assert all(by[key(r)] == r["rel_l2"] for r in many.rows)
    assert one.first_divergent["tensor"] == many.first_divergent["tensor"] == planted


def _fusable(path: Path) -> None:
    """Conv -> Mul(per-channel) -> Add(per-channel): ONNX Runtime folds Mul and Add into the Conv
    weights at its default optimisation level, unless the Conv's output is a graph output."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w")
    s = numpy_helper.from_array((rng.random((1, 8, 1, 1)) * 3 + 0.1).astype(np.float32), "s")
    b = numpy_helper.from_array(rng.standard_normal((1, 8, 1, 1)).astype(np.float32), "b")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Mul", ["c", "s"], ["m"], name="mul"),
             helper.make_node("Add", ["m", "b"], ["y"], name="add")]
    g = helper.make_graph(nodes, "fusable", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 16, 16])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], [w, s, b])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_instrumentation_that_changes_the_output_is_reported(photo_dir, tmp_path, capsys):
    _fusable(tmp_path / "f.onnx")
    j = _dmx_json(capsys, "localize", "--models", str(tmp_path / "f.onnx"), str(tmp_path / "f.onnx"),
                  "--images", str(photo_dir), "--limit", "2")
    assert j["instrumentation_changed_output"] is True
    assert 0 < j["instrumentation"]["max_abs"] < 1e-3
    assert j["first_divergent"] is None  # both sides marked alike: the layers agree


def test_text_output_names_the_layer_and_draws_the_curve(tiny_run, photo_dir, tmp_path, capsys):
    a = _fp32_onnx(tiny_run)
    planted = _plant(a, tmp_path / "planted.onnx", conv_index=1)
    capsys.readouterr()
    assert main(["localize", "--models", a, str(tmp_path / "planted.onnx"), "--images", str(photo_dir)]) == 0
    out = capsys.readouterr().out
    assert f"First tensor beyond fp32's rel-L2 tolerance 1.3e-05: {planted!r} (Conv" in out
    assert "Error curve" in out and "Layers introducing most error" in out


def test_report_draws_the_layer_curve_once_localized(tiny_run, capsys):
    from dmx.analysis.report import build_report
    _dmx_json(capsys, "localize", str(tiny_run), "--cell", _cell(tiny_run, backend="onnxruntime", precision="fp16"),
              "--images", "1")
    page = build_report(tiny_run)
    assert 'id="layer-curve"' in page and 'href="#layers"' in page


_DEEP_CHILD = """
import sys
import numpy as np, onnx
from onnx import helper, numpy_helper
from dmx.runner.localize import localize_models
path, depth, budget, images = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
w = numpy_helper.from_array((np.random.default_rng(0).standard_normal((16, 3, 3, 3)) * 0.3).astype(np.float32), "w")
nodes = [helper.make_node("Conv", ["x", "w"], ["t0"], pads=[1, 1, 1, 1], name="stem")]
nodes += [helper.make_node("Relu" if k % 2 else "Sigmoid", [f"t{k - 1}"], [f"t{k}"], name=f"n{k}")
          for k in range(1, depth)]
g = helper.make_graph(nodes, "deep", [helper.make_tensor_value_info("x", 1, [1, 3, 64, 64])],
                      [helper.make_tensor_value_info(f"t{depth - 1}", 1, None)], [w])
onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
r = localize_models(path, path, images, n_images=1, budget_bytes=budget)
assert r.first_divergent is None and len(r.layers) == depth
# VmHWM: this process's own peak (ru_maxrss would start from the forking parent's)
print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) // 1024)
"""


def test_memory_stays_flat_with_depth(photo_dir, tmp_path):
    """Peak RSS of a fresh process localizing a chain of N 256 KB tensors: with the tensor budget
    it does not grow with N; marking every tensor at once (a 1 GB budget) it does."""
    import os
    import subprocess
    import sys

    def peak_mb(depth: int, budget: int) -> int:
        out = subprocess.run([sys.executable, "-c", _DEEP_CHILD, str(tmp_path / f"d{depth}.onnx"), str(depth),
                              str(budget), str(photo_dir)], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        return int(out.stdout.strip().splitlines()[-1])

    shallow, deep, unbounded = peak_mb(20, 4 << 20), peak_mb(400, 4 << 20), peak_mb(400, 1 << 30)
    assert deep - shallow < 30, (shallow, deep)            # 400 x 256 KB = 100 MB per side otherwise
    assert unbounded - deep > 80, (deep, unbounded)        # the measurement sees the tensors


def test_run_contrast_localizes_on_the_images_where_the_cell_diverges_most(tiny_run, tmp_path, capsys):
    """A rare but large contrast: the cell moves one image only, the last by id. Localize must
    look at that image (it took the first N by id and found nothing)."""
    import shutil
    import pyarrow as pa
    import pyarrow.compute as pc
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    cid = _cell(run, backend="openvino", precision="fp32")
    for part in (run / "rows").rglob("*.parquet"):
        t = pq.read_table(part)
        far = pc.and_(pc.equal(t["cell_id"], cid), pc.equal(t["image_id"], "coffee_exif6.jpg"))
        i = t.schema.get_field_index("out_cosine")
        t = t.set_column(i, t.schema.field(i), pc.if_else(far, pa.scalar(0.5), t["out_cosine"]))
        pq.write_table(t, part)
    j = _dmx_json(capsys, "localize", str(run), "--cell", cid, "--images", "1")
    assert j["images"] == ["coffee_exif6.jpg"]
    assert any("diverges most" in n and "coffee_exif6.jpg" in n for n in j["notes"])
