"""Hostile but fair specs and options: each is one line on stderr, exit 2, fast, never a traceback.

The CLI's entry function runs in-process (``dmx.cli.main``), as a subprocess would run it.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from dmx.cli import main
from dmx.matrix import AXES, load_spec
DEFAULT_MAX_CELLS = 100_000  # the default limit

VALID = "name: x\ndataset: {path: .}\nmodel: tiny\naxes: {decoder: [pil]}\n"


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own exit
        code = e.code if isinstance(e.code, int) else 2
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *words: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    for w in words:
        assert w in err, err


def write(tmp_path: Path, data: bytes | str, name: str = "spec.yaml") -> str:
    p = tmp_path / name
    p.write_bytes(data.encode() if isinstance(data, str) else data)
    return str(p)


def _laughs() -> bytes:
    lines = [b"a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 10):
        prev, cur = chr(96 + i), chr(97 + i)
        lines.append(f"{cur}: &{cur} [{', '.join([f'*{prev}'] * 10)}]".encode())
    return b"\n".join(lines) + b"\n"


HOSTILE = {
    "date_as_key": (b"2020-01-01: x\n" + VALID.encode(), ["2020-01-01", "unknown key", "allowed"]),
    "self_referencing_anchor": (VALID.encode() + b"check: &c {a: *c}\n", ["alias", "cycle"]),
    "billion_laughs": (VALID.encode() + _laughs(), ["aliases"]),
    "nested_5000_deep_lists": (VALID.encode() + b"check: " + b"[" * 5000 + b"]" * 5000 + b"\n",
                               ["nest"]),
    "nested_3000_deep_maps": (VALID.encode() + b"check: " + b"{a: " * 3000 + b"1" + b"}" * 3000
                              + b"\n", ["nested more than"]),
    "5000_digit_integer": (VALID.encode() + b"calibration: {limit: " + b"9" * 5000 + b"}\n",
                           ["5000 digits"]),
    "non_utf8_bytes": (VALID.encode() + b"name: caf\xe9\n", ["not UTF-8"]),
    "utf16_file": (VALID.encode("utf-16"), ["UTF-16"]),
    "duplicate_key": (VALID.encode() + b"model: mobilenet_v2\n", ["model", "duplicate key"]),
    "python_object_tag": (VALID.encode() + b"check: !!python/object/apply:os.system [id]\n",
                          ["YAML tag", "python/object"]),
    "two_documents": (VALID.encode() + b"---\nname: y\n", ["not valid YAML"]),
    "a_list_not_a_mapping": (b"- a\n- b\n", ["mapping"]),
    "size_as_text": (VALID.replace("model: tiny", "model: {name: tiny, input: {size: big}}").encode(),
                     ["model.input.size", "integer", "'big'"]),
    "negative_size": (VALID.replace("model: tiny", "model: {name: tiny, input: {size: -224}}").encode(),
                      ["model.input.size", "positive integer"]),
    "threads_100000": (VALID.replace("decoder: [pil]", "threads: [100000]").encode(),
                       ["axes.threads", "1024"]),
    "unknown_level": (VALID.replace("[pil]", "[pillow]").encode(), ["axes.decoder", "opencv"]),
    "level_of_wrong_type": (VALID.replace("[pil]", "[[pil]]").encode(), ["axes.decoder"]),
    "empty_file": (b"", ["mapping"]),
    "too_big_file": (VALID.encode() + b"# " + b"x" * (2 << 20) + b"\n", ["bytes"]),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_hostile_spec_is_one_line_and_exit_2_within_2_seconds(name, tmp_path, capsys):
    data, words = HOSTILE[name]
    t = time.perf_counter()
    code, _, err = run_cli(["plan", write(tmp_path, data)], capsys)
    assert time.perf_counter() - t < 2.0
    assert_one_line_error(code, err, *words)


def test_duplicate_keys_are_refused_not_last_one_wins(tmp_path):
    from dmx.matrix import SpecError
    with pytest.raises(SpecError, match="duplicate key"):
        load_spec(write(tmp_path, "name: a\nname: b\n" + VALID.split("\n", 1)[1]))


def test_anchors_and_aliases_that_are_not_cycles_still_work(tmp_path):
    spec = load_spec(write(tmp_path, "name: x\ndataset: {path: .}\nmodel: tiny\n"
                                     "axes: {decoder: [pil, &o opencv]}\nreference: {decoder: *o}\n"))
    assert spec.reference == {"decoder": "opencv"}


def test_a_matrix_beyond_the_cell_limit_is_refused_with_its_size(tmp_path, capsys):
    # ten axes, 372,960 combinations: the case
    big = ("name: big\ndataset: {path: .}\nmodel: tiny\naxes:\n"
           "  decoder: [pil, opencv, simplejpeg, turbojpeg]\n  exif: [apply, ignore, native]\n"
           "  color: [rgb, bgr]\n  reduce: ['1', '2', '4', '8']\n"
           "  resize: [pil-bilinear, pil-bicubic, cv2-linear, cv2-area, cv2-cubic, torch-bilinear, "
           "torch-bilinear-aa]\n  fit: [letterbox, stretch, resize-crop]\n"
           "  backend: [torch, onnxruntime, openvino]\n  precision: [fp32, fp16, bf16, int8]\n"
           "  threads: [1, 2, 4, 8, 16, 32]\n  batch: [1, 2, 4, 8, 16]\n")
    for extra in ("", "exclude: [{backend: torch}]\n"):
        t = time.perf_counter()
        code, out, err = run_cli(["plan", write(tmp_path, big + extra)], capsys)
        assert time.perf_counter() - t < 2.0
        assert_one_line_error(code, err, "axes", f"{DEFAULT_MAX_CELLS:,}", "--max-cells", "cells")
        assert out == ""


def test_max_cells_is_the_limit_on_both_sides(tmp_path, capsys):
    p = write(tmp_path, "name: x\ndataset: {path: .}\nmodel: tiny\n"
                        "axes: {decoder: [pil, opencv], resize: [pil-bilinear, cv2-linear, cv2-area]}\n")
    code, _, err = run_cli(["plan", p, "--max-cells", "5"], capsys)
    assert_one_line_error(code, err, "6 cells", "limit is 5")
    code, out, _ = run_cli(["plan", p, "--max-cells", "6"], capsys)
    assert code == 0 and out.startswith("spec 'x': 6 cells")


@pytest.mark.parametrize("option, value, words", [
    ("--batch", "0", ["--batch", "positive integer"]),
    ("--batch", "-1", ["--batch", "positive integer"]),
    ("--batch", "100000", ["--batch", "at most 4,096"]),
    ("--chunk-size", "-1", ["--chunk-size", "positive integer"]),
    ("--chunk-size", "0", ["--chunk-size", "positive integer"]),
    ("--workers", "0", ["--workers", "positive integer"]),
    ("--max-cells", "x", ["--max-cells", "integer"]),
])
def test_a_bad_run_option_is_one_line_and_exit_2(option, value, words, tmp_path, capsys):
    p = write(tmp_path, VALID)
    code, _, err = run_cli(["run", p, "--out", str(tmp_path / "o"), "--executor", "local",
                            option, value], capsys)
    assert_one_line_error(code, err, *words)
    assert not (tmp_path / "o").exists()


def test_out_pointing_at_an_existing_file_is_one_line_and_the_file_is_untouched(tmp_path, capsys):
    p = write(tmp_path, VALID)
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    code, _, err = run_cli(["run", p, "--out", str(target), "--executor", "local"], capsys)
    assert_one_line_error(code, err, "notes.txt", "is a file")
    assert target.read_text() == "mine"


def test_schema_spec_prints_a_json_schema_with_every_registered_axis_and_level(capsys):
    code, out, _ = run_cli(["schema", "--spec"], capsys)
    assert code == 0
    schema = json.loads(out)
    axes = schema["$defs"]["Axes"]["properties"]
    assert set(axes) == set(AXES)
    text = json.dumps(axes)
    for axis in AXES.values():
        for level in axis.levels:
            assert json.dumps(level) in text
    assert schema["$defs"]["Axes"]["additionalProperties"] is False


def test_the_json_schema_accepts_the_example_specs_and_refuses_a_bad_one():
    jsonschema = pytest.importorskip("jsonschema")
    from dmx.matrix.schema import spec_json_schema
    from dmx.matrix.yamlsafe import load_yaml_bounded
    schema = spec_json_schema()
    examples = sorted(Path(__file__).parent.parent.joinpath("examples").glob("*.yaml"))
    for ex in examples:
        jsonschema.validate(load_yaml_bounded(ex.read_bytes(), str(ex)), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"dataset": ".", "model": "tiny", "axes": {"resize": ["nope"]}}, schema)
