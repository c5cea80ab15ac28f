"""Every output of a model is compared (issue 21 point 7): a classifier with an auxiliary head and
a ``task: tensor`` model (segmentation + depth) whose divergence sits in the output that is not
the first. Before, only output 0 was compared: out_* read 0 and the gate passed.

The models are real torch modules (below), run through dmx's torch and ONNX Runtime backends on
JPEGs written by Pillow; the factor that moves the second output is the resize (pil-bilinear vs
cv2-linear interpolate differently), while the first output ignores its input.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dmx.analysis.check import check_run
from dmx.analysis.db import open_run
from dmx.matrix import SpecError, parse_spec
from dmx.runner.sweep import RunOptions, run_spec

N_IMAGES = 4
INPUT = {"size": 32, "mode": "stretch", "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


class _AuxClassifier(nn.Module):
    """Logits that do not depend on the image (a bias), and an auxiliary head that is the image
    itself, subsampled: any change of the input shows in the second output only."""

    def __init__(self) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.linspace(-1, 1, 10))

    def forward(self, x):
        return self.logits.expand(x.shape[0], 10) + 0.0, x[:, :, ::4, ::4].flatten(1) * 10.0


class _SegDepth(nn.Module):
    """A dense model: two-class segmentation logits that are constant, and a depth map that is
    the input's mean over channels."""

    def forward(self, x):
        seg = torch.zeros_like(x[:, :2]) + torch.tensor([1.0, -1.0]).view(1, 2, 1, 1)
        return seg, x.mean(1, keepdim=True)


def aux_classifier():
    return _AuxClassifier()


def seg_depth():
    return _SegDepth()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("multi-output")
    rng = np.random.default_rng(7)
    (root / "imgs").mkdir()
    for i in range(N_IMAGES):   # smooth gradients plus noise: the two resizes differ on each
        y, x = np.mgrid[0:61, 0:53]
        img = np.stack([(x * 4 + 30 * i) % 256, (y * 3) % 256, (x + y + 17 * i) % 256], -1)
        img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / "imgs" / f"img{i}.jpg", quality=92)
    return root


def _run(root: Path, name: str, model: dict, axes: dict | None = None, reference: dict | None = None
         ) -> Path:
    raw = {"name": name, "dataset": "imgs", "model": {**model, "input": INPUT},
           "axes": axes or {"resize": ["pil-bilinear", "cv2-linear"]},
           "reference": reference or {"resize": "pil-bilinear"}}
    out = root / name
    run_spec(parse_spec(raw, base_dir=str(root)), RunOptions(out=str(out), executor="local",
                                                             progress=False))
    return out


@pytest.fixture(scope="module")
def aux_run(images: Path) -> Path:
    return _run(images, "aux", {"torch": "test_multi_output:aux_classifier",
                                "outputs": ["logits", "aux"]})


def _cell(con, where: str) -> list[dict]:
    cur = con.execute(f"SELECT image_id, out_rel_l2, out_max_abs, out_cosine, out_worst, outputs, "
                      f"top1_agree, status FROM rows WHERE {where} ORDER BY image_id")
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r)) for r in cur.fetchall()]


def test_the_auxiliary_head_carries_the_divergence_and_out_star_shows_it(aux_run: Path):
    con = open_run(aux_run)
    rows = _cell(con, "resize = 'cv2-linear'")
    assert len(rows) == N_IMAGES and all(r["status"] == "ok" for r in rows)
    for r in rows:
        per = {o["name"]: o for o in r["outputs"]}
        assert list(per) == ["logits", "aux"]
        assert per["logits"]["rel_l2"] == 0 and per["logits"]["max_abs"] == 0
        assert per["aux"]["rel_l2"] > 0
        # out_* are the worst over the compared outputs: here the aux head's
        assert r["out_worst"] == "aux"
        assert r["out_rel_l2"] == pytest.approx(per["aux"]["rel_l2"])
        assert r["out_max_abs"] == pytest.approx(per["aux"]["max_abs"])
        assert r["out_cosine"] == pytest.approx(per["aux"]["cosine"])
        assert r["top1_agree"]            # the logits did not move
    for r in _cell(con, "is_reference"):   # the reference against itself: nothing moved
        assert r["out_rel_l2"] == 0 and all(o["rel_l2"] == 0 for o in r["outputs"])


def test_the_gate_fails_a_cell_whose_second_output_moved(aux_run: Path):
    result = check_run(aux_run, {"max_rel_l2": 1e-6})
    failed = set(result.failing_cells)
    moved = {r[0] for r in open_run(aux_run).execute(
        "SELECT DISTINCT cell_id FROM rows WHERE resize = 'cv2-linear'").fetchall()}
    assert moved and failed == moved


def test_compare_outputs_chooses_what_out_star_and_the_gate_judge(images: Path):
    run = _run(images, "aux-logits-only", {"torch": "test_multi_output:aux_classifier",
                                           "outputs": ["logits", "aux"], "compare_outputs": ["logits"]})
    rows = _cell(open_run(run), "resize = 'cv2-linear'")
    assert all(r["out_rel_l2"] == 0 and r["out_worst"] == "logits" for r in rows)
    # every output is still measured and kept in the rows
    assert all({o["name"]: o["rel_l2"] for o in r["outputs"]}["aux"] > 0 for r in rows)
    assert check_run(run, {"max_rel_l2": 1e-6}).passed


def test_a_tensor_model_names_its_outputs_and_the_depth_map_is_caught(images: Path):
    run = _run(images, "seg-depth", {"torch": "test_multi_output:seg_depth", "task": "tensor",
                                     "outputs": ["seg", "depth"]},
               axes={"resize": ["pil-bilinear", "cv2-linear"], "backend": ["torch", "onnxruntime"]},
               reference={"resize": "pil-bilinear", "backend": "torch"})
    con = open_run(run)
    moved = _cell(con, "resize = 'cv2-linear' AND backend = 'torch'")
    assert all(r["out_worst"] == "depth" and r["out_rel_l2"] > 0 for r in moved)
    assert all({o["name"]: o["rel_l2"] for o in r["outputs"]}["seg"] == 0 for r in moved)
    # ONNX Runtime on the same input returns both outputs, batch axis included, close to torch's
    same = _cell(con, "resize = 'pil-bilinear' AND backend = 'onnxruntime'")
    assert all(r["status"] == "ok" and r["out_rel_l2"] < 1e-5 and len(r["outputs"]) == 2
               for r in same)
    result = check_run(run, {"max_rel_l2": 1e-6})
    assert not result.passed and len(result.failing_cells) >= 1


def test_a_single_output_model_keeps_no_per_output_list(images: Path):
    run = _run(images, "one", {"name": "tiny"})
    rows = _cell(open_run(run), "NOT is_reference")
    assert rows and all(r["outputs"] is None and r["out_worst"] == "output0" for r in rows)


def test_names_that_do_not_fit_the_model_are_one_line_per_row(images: Path):
    run = _run(images, "misnamed", {"torch": "test_multi_output:aux_classifier",
                                    "outputs": ["logits", "aux", "extra"]})
    errors = {r[0] for r in open_run(run).execute("SELECT DISTINCT error FROM rows").fetchall()}
    assert errors == {"model.outputs names 3 output(s) (logits, aux, extra), but the model "
                      "returned 2"}
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["spec"]["model"]["outputs"] == ["logits", "aux", "extra"]


@pytest.mark.parametrize("model, message", [
    ({"outputs": ["a", "a"]}, "names output 'a' twice"),
    ({"outputs": ["a", "b"], "compare_outputs": ["c"]}, "names 'c', which model.outputs does not (a, b)"),
])
def test_bad_output_names_are_refused_in_the_spec(model: dict, message: str):
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_spec({"name": "x", "dataset": ".", "model": {"torch": "m:f", **model},
                    "axes": {"resize": ["pil-bilinear"]}})


def test_explain_names_the_output_that_moved(aux_run: Path):
    from dmx.analysis.explain import explain_run
    from dmx.analysis.render import render_text
    e = explain_run(aux_run)
    c = next(c for c in e.contrasts if c.factor == "resize")
    per = {o["output"]: o for o in c.outputs}
    assert per["aux"]["n_worst"] == N_IMAGES and per["logits"]["n_worst"] == 0
    assert per["logits"]["rel_l2_p50"] == 0 and per["aux"]["rel_l2_p50"] > 0
    assert f"output aux moved most on {N_IMAGES} of {N_IMAGES} images" in render_text(e)
