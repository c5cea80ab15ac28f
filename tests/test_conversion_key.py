"""A converted model is reused only when everything that went into it is the same (issue 21
point 6): the weights, the code of the torch model, the input shape, the exporter and opset,
and the versions of the converting libraries.

A real user model (a module written to a temporary folder, weights saved with torch.save) is
exported to ONNX with the TorchScript exporter (the fast one) by dmx's own conversion.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

from dmx.matrix import parse_spec
from dmx.runner.backends import InferSetting
from dmx.runner.convert import prepare_artifacts, resolve_model

MODULE = "dmx_keytest_model"
SOURCE = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x).mean((2, 3)){edit}


def make():
    return Net()
'''
SETTING = InferSetting(backend="onnxruntime", precision="fp32", conversion="onnx-legacy")
KEY = "ort:onnx-legacy:fp32"


def _write_module(folder: Path, edit: str = "") -> None:
    (folder / f"{MODULE}.py").write_text(SOURCE.format(edit=edit))
    sys.modules.pop(MODULE, None)        # as a new process would: the edited file is imported
    importlib.invalidate_caches()


@pytest.fixture()
def user_model(tmp_path: Path):
    _write_module(tmp_path)
    sys.path.insert(0, str(tmp_path))
    torch.manual_seed(0)
    weights = tmp_path / "weights.pt"
    torch.save(importlib.import_module(MODULE).make().state_dict(), weights)
    yield tmp_path, weights
    sys.path.remove(str(tmp_path))
    sys.modules.pop(MODULE, None)


def _export(weights: Path, size: int = 32) -> tuple[str, dict]:
    spec = parse_spec({"name": "k", "dataset": {"path": "."}, "axes": {"backend": ["onnxruntime"]},
                       "model": {"torch": f"{MODULE}:make", "weights": str(weights),
                                 "input": {"size": size}}})
    art = prepare_artifacts(resolve_model(spec.model), {SETTING}, calibration=lambda: None)
    return art.files[KEY], art.conversion_notes["onnx:onnx-legacy"]


def test_the_same_model_is_converted_once(user_model):
    _, weights = user_model
    first, _ = _export(weights)
    again, notes = _export(weights)
    assert again == first and notes["cached"] is True


def test_an_edited_forward_with_the_same_weights_is_converted_again(user_model):
    folder, weights = user_model
    before, _ = _export(weights)
    _write_module(folder, edit=" * 2")
    after, notes = _export(weights)
    assert after != before and notes["cached"] is False
    import onnxruntime as ort
    x = torch.rand(1, 3, 32, 32).numpy()
    run = lambda p: ort.InferenceSession(p).run(None, {"input": x})[0]  # noqa: E731
    assert run(after) == pytest.approx(2 * run(before), rel=1e-5)


def test_a_new_input_size_is_converted_again(user_model):
    _, weights = user_model
    small, _ = _export(weights, size=32)
    large, notes = _export(weights, size=48)
    assert large != small and notes["cached"] is False


def test_a_built_in_models_digest_is_known_without_building_it_until_its_code_changes(tmp_path):
    """The root of a built-in model's digest (its code, its weights, torch's version) is kept,
    so a later run neither imports torch nor builds the network to find its conversions; any
    of the three changing builds it again. A user's factory is built every time."""
    import json

    from dmx.runner import convert
    model = resolve_model(parse_spec({"name": "k", "dataset": {"path": "."}, "model": "tiny",
                                    "axes": {"backend": ["onnxruntime"]}}).model)
    builds = []

    def build():
        builds.append(1)
        return importlib.import_module("dmx.runner.models.tiny").build()

    record = convert._root_record(model)
    record.unlink(missing_ok=True)
    first = convert.conversion_digest(model, build)
    assert len(builds) == 1 and record.is_file() and convert.conversion_root_known(model)
    assert convert.conversion_digest(model, build) == first and len(builds) == 1
    rec = json.loads(record.read_text())
    assert any(f.endswith("tiny_net.py") for f in rec["files"])    # the network's own code
    net_file = next(f for f in rec["files"] if f.endswith("tiny_net.py"))
    copy = tmp_path / "tiny_net.py"      # the record pointed at a copy of the network's code
    copy.write_text(Path(net_file).read_text())
    rec["files"] = [str(copy) if f == net_file else f for f in rec["files"]]
    record.write_text(json.dumps(rec))
    assert convert.conversion_digest(model, build) == first and len(builds) == 1
    copy.write_text(copy.read_text() + "\n# edited\n")                  # the code changed
    assert convert.conversion_digest(model, build) == first and len(builds) == 2
    rec = json.loads(record.read_text())
    rec["torch"] = "0.0.1"                                            # another torch
    record.write_text(json.dumps(rec))
    assert not convert.conversion_root_known(model)
    assert convert.conversion_digest(model, build) == first and len(builds) == 3


def test_a_user_factorys_digest_is_computed_by_building_it_every_time(user_model):
    from dmx.runner import convert
    _, weights = user_model
    spec = parse_spec({"name": "k", "dataset": {"path": "."}, "axes": {"backend": ["onnxruntime"]},
                       "model": {"torch": f"{MODULE}:make", "weights": str(weights),
                                 "input": {"size": 32}}})
    model = resolve_model(spec.model)
    builds = []

    def build():
        builds.append(1)
        return importlib.import_module(MODULE).make()

    convert.conversion_digest(model, build)
    convert.conversion_digest(model, build)
    assert len(builds) == 2 and not convert.conversion_root_known(model)


def test_each_installed_copy_of_a_built_in_model_keeps_its_own_digest_root(monkeypatch, tmp_path):
    """Two checkouts (or venvs) of dmx sharing one cache may hold other model code: the record
    of one must not answer for the other."""
    from dmx.runner import convert
    from dmx.runner.models import tiny
    model = resolve_model(parse_spec({"name": "k", "dataset": {"path": "."}, "model": "tiny",
                                      "axes": {"backend": ["onnxruntime"]}}).model)
    here = convert._root_record(model)
    copy = tmp_path / "tiny.py"           # another copy of the model's module
    copy.write_text(Path(tiny.__file__).read_text())
    monkeypatch.setattr(tiny.build, "__code__", tiny.build.__code__.replace(co_filename=str(copy)))
    assert convert._root_record(model) != here
