"""``--resume`` appends rows to rows already written: it refuses when they would come from another
model (an edited forward, other weights) or another environment (a package version changed),
instead of silently mixing both in one run."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

FACTORY = '''
import torch
from dmx.runner.models.tiny import build


class Scaled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = build()

    def forward(self, x):
        return self.net(x) * {factor}


def model():
    return Scaled().eval()
'''
SPEC = """name: identity
dataset: {{path: {images}}}
model: {{torch: "mymodel:model", input: {{size: 32, resize: 32, mode: stretch,
        mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5]}}}}
axes: {{decoder: [pil, opencv], backend: [torch, onnxruntime]}}
reference: {{decoder: pil, backend: torch}}
"""


@pytest.fixture()
def setup(tmp_path: Path, photo_dir: Path):
    images = tmp_path / "images"
    images.mkdir()
    for p in sorted(photo_dir.glob("*.jpg")):
        shutil.copy(p, images / p.name)
    (tmp_path / "mymodel.py").write_text(FACTORY.format(factor="1.0"))
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.format(images=images))
    return tmp_path, spec


def dmx(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "dmx", *args], capture_output=True, text=True,
                          env=env)


def _run(tmp: Path, spec: Path, *extra: str) -> subprocess.CompletedProcess:
    return dmx(tmp, "run", str(spec), "--out", str(tmp / "run"), "--executor", "local",
               "--quiet", *extra)


def test_a_resume_with_the_same_model_and_environment_goes_ahead(setup):
    tmp, spec = setup
    assert _run(tmp, spec).returncode == 0
    again = _run(tmp, spec, "--resume")
    assert again.returncode == 0, again.stderr


def test_a_resume_after_the_models_forward_was_edited_is_refused_in_one_line(setup):
    tmp, spec = setup
    assert _run(tmp, spec).returncode == 0
    (tmp / "mymodel.py").write_text(FACTORY.format(factor="2.0"))   # same weights, other code
    again = _run(tmp, spec, "--resume")
    lines = [ln for ln in again.stderr.splitlines() if ln.strip()]
    assert again.returncode == 2 and len(lines) == 1, again.stderr
    assert "another model" in lines[0] and "choose another --out" in lines[0]


def test_a_resume_on_another_version_of_a_backend_is_refused_naming_it(setup):
    tmp, spec = setup
    assert _run(tmp, spec).returncode == 0
    manifest = tmp / "run" / "manifest.json"
    m = json.loads(manifest.read_text())
    for env in m["nodes"].values():          # as if the rows were computed with another release
        env["packages"]["onnxruntime"] = "0.0.1"
    manifest.write_text(json.dumps(m))
    again = _run(tmp, spec, "--resume")
    assert again.returncode == 2 and "onnxruntime 0.0.1 ->" in again.stderr, again.stderr
