"""The spec's one model: the parser, its defaults and the JSON Schema editors and the docs read
are the same thing, so they cannot disagree about what a spec may say."""
from __future__ import annotations

import copy

import pytest

from dmx.matrix import SpecError, parse_spec
from dmx.matrix.schema import spec_json_schema

jsonschema = pytest.importorskip("jsonschema")

BASE = {"dataset": {"path": "imgs/"}, "model": {"torch": "pkg.mod:build", "input": {"size": 32}},
        "axes": {"decoder": ["pil", "opencv"], "backend": ["torch", "onnxruntime"]},
        "reference": {"decoder": "pil"}}

# (where in the spec, the message's start): a null here is refused, not taken as unset
NULL_REFUSED = [
    (("name",), "name: must be a non-empty string"),
    (("model", "task"), "model.task: unknown task None; allowed: classification, detection, tensor"),
    (("model", "opset"), "model.opset: must be an integer ONNX opset 7-23, got None"),
    (("model", "input", "mode"), "model.input.mode: unknown mode None; allowed: resize-crop"),
    (("model", "input", "scale"), "model.input.scale: pixels are divided by scale"),
    (("calibration", "limit"), "calibration.limit: must be a positive integer, got None"),
    (("axes", "decoder"), "axes.decoder: a level must be a string, got None"),
    (("reference", "decoder"), "reference.decoder: a level must be a string, got None"),
]


def _with(path: tuple[str, ...], value: object) -> dict:
    raw = copy.deepcopy(BASE)
    node = raw
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    return raw


@pytest.mark.parametrize(("path", "message"), NULL_REFUSED, ids=[".".join(p) for p, _ in NULL_REFUSED])
def test_a_null_the_parser_refuses_is_refused_by_the_json_schema_too(path, message):
    raw = _with(path, None)
    with pytest.raises(SpecError) as e:
        parse_spec(raw)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(raw, spec_json_schema())


@pytest.mark.parametrize("path", [("dataset", "limit"), ("calibration",), ("check",), ("include",),
                                  ("model", "detection"), ("model", "weights")])
def test_a_null_the_json_schema_allows_leaves_the_key_unset(path):
    jsonschema.validate(_with(path, None), spec_json_schema())
    unset = copy.deepcopy(BASE)
    assert parse_spec(_with(path, None)).digest == parse_spec(unset).digest


def test_the_defaults_the_parser_applies_are_the_ones_the_json_schema_declares():
    schema = spec_json_schema()
    model, calibration = schema["$defs"]["Model"]["properties"], schema["$defs"]["Calibration"]["properties"]
    s = parse_spec(BASE)
    assert s.name == schema["properties"]["name"]["default"] == "dmx-run"
    assert s.model.task == model["task"]["default"] == "classification"
    assert s.model.opset == model["opset"]["default"] == 18
    assert s.calibration_limit == calibration["limit"]["default"] == 16


def test_levels_are_canonical_in_the_model_itself():
    s = parse_spec(_with(("axes", "decoder"), [{"name": "libjpeg", "build": "9e"}, "pil"]))
    assert s.levels("decoder") == ("libjpeg:9e", "pil")
    assert s.axis_names == ("decoder", "backend")  # the registry's order, not the YAML's


def test_a_reference_level_outside_its_axis_names_the_key_and_the_levels_allowed():
    with pytest.raises(SpecError, match=r"^reference\.decoder: level 'simplejpeg' is not in "
                                        r"axes\.decoder; allowed: pil, opencv$"):
        parse_spec(_with(("reference", "decoder"), "simplejpeg"))
