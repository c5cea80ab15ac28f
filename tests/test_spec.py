"""The matrix spec: parsing, overrides, validation errors, expansion, the reference cell."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dmx.matrix import SpecError, expand, load_spec, parse_spec, reference_cell

BASE = {"name": "t", "dataset": {"path": "."}, "model": "tiny",
        "axes": {"decoder": ["pil", "opencv"], "resize": ["pil-bilinear", "cv2-linear"],
                 "backend": ["torch", "openvino"], "openvino_hint": ["default", "f32"]}}


def spec(**changes):
    raw = {**BASE, **changes}
    return parse_spec(raw)


def test_axes_that_do_not_apply_are_null_and_do_not_multiply_cells():
    cells = expand(spec())
    # decoder 2 x resize 2 x (torch + openvino x 2 hints) = 12, not 16
    assert len(cells) == 12
    torch_cells = [c for c in cells if c["backend"] == "torch"]
    assert all(c["openvino_hint"] is None for c in torch_cells)


def test_cell_ids_are_stable_hashes_of_the_factors():
    a, b = expand(spec()), expand(spec())
    assert [c.cell_id for c in a] == [c.cell_id for c in b]
    assert len({c.cell_id for c in a}) == len(a)


def test_reference_defaults_to_first_levels_and_omits_axes_that_do_not_apply():
    s = spec(reference={"backend": "torch"})
    ref = reference_cell(s, expand(s))
    assert ref.label() == "decoder=pil resize=pil-bilinear backend=torch"


def test_exclude_removes_and_include_adds_cells():
    s = spec(axes={"decoder": ["pil", "opencv"], "backend": ["torch", "onnxruntime"]},
             exclude=[{"decoder": "opencv", "backend": "onnxruntime"}])
    assert len(expand(s)) == 3
    s = spec(axes={"decoder": ["pil", "opencv"], "backend": ["torch", "onnxruntime"]},
             exclude=[{"decoder": "opencv"}], include=[{"decoder": "opencv"}])
    labels = [c.label() for c in expand(s)]
    assert "decoder=opencv backend=torch" in labels and len(labels) == 3


def test_hydra_style_overrides_replace_axis_levels_and_nested_keys():
    s = parse_spec(BASE, overrides=["backend=torch,openvino", "resize=cv2-area",
                                    "dataset.limit=3", "precision=fp32"])
    assert s.levels("resize") == ("cv2-area",)
    assert s.levels("precision") == ("fp32",)
    assert s.dataset.limit == 3


def test_decoder_mapping_levels_normalise_to_labels():
    s = spec(axes={"decoder": ["pil", {"name": "libjpeg", "build": "9e"},
                               {"name": "pil", "package": "pillow==9.4.0"}]})
    assert s.levels("decoder") == ("pil", "libjpeg:9e", "pil[pillow==9.4.0]")


@pytest.mark.parametrize("raw, key, words", [
    ({**BASE, "colour": 1}, "colour", "allowed: name, dataset"),
    ({**BASE, "axes": {"resize": ["pil-nearest"]}}, "axes.resize", "pil-bilinear"),
    ({**BASE, "axes": {"decodr": ["pil"]}}, "axes.decodr", "allowed: decoder"),
    ({**BASE, "reference": {"resize": "cv2-area"}}, "reference.resize", "not in axes.resize"),
    ({**BASE, "dataset": {"path": ".", "limit": 0}}, "dataset.limit", "positive integer"),
    ({**BASE, "model": {"torch": "not a factory"}}, "model.torch", "package.module:factory"),
    ({**BASE, "model": {"name": "tiny", "task": "segmentation"}}, "model.task", "classification"),
])
def test_spec_errors_name_the_key_and_the_allowed_values(raw, key, words):
    with pytest.raises(SpecError) as e:
        parse_spec(raw)
    assert e.value.key == key and words in str(e.value)


def test_a_reference_that_is_excluded_is_an_error():
    s = spec(axes={"decoder": ["pil", "opencv"]}, exclude=[{"decoder": "pil"}])
    with pytest.raises(SpecError, match="not a cell of the matrix"):
        reference_cell(s, expand(s))


def test_cli_reports_a_spec_error_in_one_line_with_exit_code_2(tmp_path: Path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\ndataset: {path: .}\nmodel: tiny\naxes: {resize: [lanczos]}\n")
    r = subprocess.run([sys.executable, "-m", "dmx", "plan", str(p)], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert "axes.resize" in r.stderr and "pil-bilinear" in r.stderr


def test_cli_rejects_a_missing_dataset_before_running(tmp_path: Path):
    p = tmp_path / "s.yaml"
    p.write_text("name: x\ndataset: {path: nowhere/}\nmodel: tiny\naxes: {decoder: [pil]}\n")
    r = subprocess.run([sys.executable, "-m", "dmx", "run", str(p), "--out", str(tmp_path / "o"),
                        "--executor", "local"], capture_output=True, text=True)
    assert r.returncode == 2 and "dataset.path" in r.stderr and "Traceback" not in r.stderr


def test_load_spec_reads_yaml_relative_to_the_spec_file(tmp_path: Path):
    (tmp_path / "imgs").mkdir()
    p = tmp_path / "s.yaml"
    p.write_text("name: x\ndataset: {path: imgs/}\nmodel: tiny\naxes: {decoder: [pil]}\n")
    s = load_spec(p)
    assert s.dataset.base_dir == str(tmp_path.resolve())
