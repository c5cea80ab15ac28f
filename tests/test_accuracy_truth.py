"""Accuracy whose truth is known by construction: a real sweep over real JPEGs with labels.

The model (``colour_classifier``, trusted code named by the spec) reads each image's class from
its red level: class c is red 20 + 24c, so a flat-colour JPEG of red 20 + 24c is classified c
whatever the JPEG rounding. Planted decoders invert the red channel of some images, which turns
class c into 9 - c - exactly known flips:

- ``simplejpeg`` inverts the 56-px-wide images: 12 the reference got right (label c) become
  wrong and 1 it got wrong (label 9 - c) becomes right: -11 images of 40 = -27.5 points;
- ``turbojpeg`` inverts the 64-px-wide images: 3 right->wrong and 3 wrong->right: 0 points,
  noise that a gate must not fail;
- ``resize`` changes nothing on flat images: an interval of exactly [0, 0].

The six flipped classes (0, 1, 2, 7, 8, 9) are far enough from 9 - c that top-5 flips alike.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.stats import binomtest

from dmx.analysis.check import check_run, render_check_text
from dmx.analysis.db import open_run
from dmx.analysis.explain import explain_run
from dmx.analysis.render import render_text

N_LABELLED = 40
N_IMAGES = 42                               # img40, img41 have no label
FLIP = [0, 1, 2, 7, 8, 9, 10, 11, 12, 17, 18, 19]   # 56 px wide, label c: right -> wrong
UNFLIP = [20]                                        # 56 px wide, label 9 - c: wrong -> right
NOISE_RIGHT = [21, 22, 29]                           # 64 px wide, label c
NOISE_WRONG = [27, 28, 30]                           # 64 px wide, label 9 - c
HARD = [33, 34, 35]                                  # label (c + 5) % 10: every cell wrong
K = len(FLIP)
PLANTED_DELTA = 100.0 * (len(UNFLIP) - K) / N_LABELLED   # -27.5 points
INPUT = {"size": 32, "resize": 32, "mode": "stretch", "mean": [0.5, 0.5, 0.5],
         "std": [0.5, 0.5, 0.5]}


def red_of(c: int) -> int:
    return 20 + 24 * c


def colour_classifier():
    """The class is the red level: logits -((red - (20 + 24 k)) / 24)^2 for k = 0..9, red on the
    0-255 scale recovered from the normalised input (mean 0.5, std 0.5)."""
    import torch

    class RedLevel(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            # a parameter, not a buffer: the torch backend reads the precision off a parameter
            self.centres = torch.nn.Parameter(20.0 + 24.0 * torch.arange(10.0),
                                              requires_grad=False)

        def forward(self, x):
            red = (x[:, 0].mean(dim=(1, 2)) + 1.0) * 127.5
            return -((red[:, None] - self.centres[None, :]) / 24.0) ** 2
    return RedLevel().eval()


def _class(i: int) -> int:
    return i % 10


def _label(i: int) -> int | None:
    if i >= N_LABELLED:
        return None
    c = _class(i)
    if i in UNFLIP or i in NOISE_WRONG:
        return 9 - c
    if i in HARD:
        return (c + 5) % 10
    return c


def _width(i: int) -> int:
    return 56 if i in FLIP + UNFLIP else 64 if i in NOISE_RIGHT + NOISE_WRONG else 48


@pytest.fixture(scope="module")
def labelled_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("accuracy_truth")
    imgs = root / "imgs"
    imgs.mkdir()
    for i in range(N_IMAGES):
        rgb = np.zeros((40, _width(i), 3), np.uint8)
        rgb[..., 0], rgb[..., 1], rgb[..., 2] = red_of(_class(i)), 128, 128
        Image.fromarray(rgb, "RGB").save(imgs / f"img{i:02d}.jpg", quality=95)
    (root / "classes.txt").write_text("".join(f"c{k}\n" for k in range(10)))
    # labels as a user writes them: class names, one image per line, in no particular order
    lines = [f"img{i:02d}.jpg,c{_label(i)}" for i in reversed(range(N_LABELLED))]
    (root / "labels.csv").write_text("path,label\n" + "\n".join(lines) + "\n")
    return root


def _invert_red(width: int):
    def perturb(img: np.ndarray) -> np.ndarray:
        if img.shape[1] == width:
            img[..., 0] = 255 - img[..., 0]
        return img
    return perturb


def _planted(perturb):
    from dmx.runner.decoders.pil import PilDecoder

    class Planted(PilDecoder):
        system_name = "planted"

        def _decode(self, data, options):
            return perturb(super()._decode(data, options).copy())

        def version(self):
            return {"library": "planted-invert-red", "version": "1", "libjpeg": None}
    return Planted()


@pytest.fixture(scope="module")
def accuracy_run(labelled_images: Path) -> Path:
    import dmx.runner.decoders as registry
    from dmx.matrix import parse_spec
    from dmx.runner.sweep import RunOptions, run_spec
    raw = {"name": "accuracy-truth",
           "dataset": {"path": "imgs", "labels": "labels.csv"},
           "model": {"torch": "test_accuracy_truth:colour_classifier", "input": INPUT,
                     "labels": "classes.txt"},
           "axes": {"decoder": ["pil", "simplejpeg", "turbojpeg"],
                    "resize": ["pil-bilinear", "cv2-linear"]},
           "reference": {"decoder": "pil", "resize": "pil-bilinear"}}
    out = labelled_images / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(registry, "_CACHE", {})
        mp.setitem(registry._FACTORIES, "simplejpeg", lambda _l: _planted(_invert_red(56)))
        mp.setitem(registry._FACTORIES, "turbojpeg", lambda _l: _planted(_invert_red(64)))
        run_spec(parse_spec(raw, base_dir=str(labelled_images)),
                 RunOptions(out=str(out), executor="local", progress=False))
    return out


def _contrast(e, factor: str, level: str):
    return next(c for c in e.contrasts if c.factor == factor and c.level == level)


def test_the_reference_is_right_exactly_where_the_label_is_its_class(accuracy_run: Path):
    con = open_run(accuracy_run)
    ref = con.sql("SELECT image_id, label, top1, correct_top1 FROM rows WHERE is_reference "
                  "ORDER BY image_id").fetchall()
    assert [r[1] for r in ref] == [_label(i) for i in range(N_IMAGES)]
    assert [r[2] for r in ref] == [_class(i) for i in range(N_IMAGES)]
    right = [i for i in range(N_LABELLED) if _label(i) == _class(i)]
    assert [r[3] for r in ref] == [(i in right) if i < N_LABELLED else None
                                   for i in range(N_IMAGES)]
    manifest = json.loads((accuracy_run / "manifest.json").read_text())
    cov = manifest["dataset"]["labels"]
    assert (cov["images"], cov["labelled"], cov["unlabelled"]) == (N_IMAGES, N_LABELLED, 2)


def test_the_flipping_factor_reports_exactly_its_k_images_and_the_planted_change(accuracy_run):
    e = explain_run(accuracy_run)
    c = _contrast(e, "decoder", "simplejpeg")
    assert (c.acc_n, c.acc_right_to_wrong, c.acc_wrong_to_right) == (N_LABELLED, K, len(UNFLIP))
    assert c.acc_delta == pytest.approx(PLANTED_DELTA) and c.acc_delta < 0
    assert c.acc_ci_low <= PLANTED_DELTA <= c.acc_ci_high < 0
    assert c.acc_p == pytest.approx(binomtest(len(UNFLIP), K + len(UNFLIP)).pvalue, rel=1e-12)
    assert c.acc_top5_delta == pytest.approx(PLANTED_DELTA)
    con = open_run(accuracy_run)
    moved = con.sql("""SELECT r.image_id FROM rows r JOIN rows f USING (image_id)
                       WHERE r.is_reference AND f.decoder = 'simplejpeg' AND f.resize = 'pil-bilinear'
                         AND r.correct_top1 AND NOT f.correct_top1 ORDER BY 1""").fetchall()
    assert [m[0] for m in moved] == [f"img{i:02d}.jpg" for i in FLIP]


def test_explain_says_the_change_in_one_line_with_its_interval_counts_and_p(accuracy_run: Path):
    e = explain_run(accuracy_run)
    c = _contrast(e, "decoder", "simplejpeg")
    text = " ".join(render_text(e).split())     # the lines are aligned with spaces
    p = binomtest(len(UNFLIP), K + len(UNFLIP)).pvalue
    line = (f"decoder simplejpeg: -27.50 pts [{c.acc_ci_low:+.2f}, {c.acc_ci_high:+.2f}], "
            f"{K} right->wrong, 1 wrong->right, p = {p:.2g}")
    assert line in text, text
    assert e.accuracy_ranking()[0].level == "simplejpeg"
    assert "reference top-1 82.50 (33 of 40)" in text
    assert e.accuracy["labelled_images"] == N_LABELLED and e.accuracy["images"] == N_IMAGES


def test_balanced_flips_and_a_factor_that_changes_nothing_are_indistinguishable_from_zero(accuracy_run):
    e = explain_run(accuracy_run)
    noise = _contrast(e, "decoder", "turbojpeg")
    assert (noise.acc_right_to_wrong, noise.acc_wrong_to_right, noise.acc_delta) == (3, 3, 0)
    assert noise.acc_ci_low < 0 < noise.acc_ci_high and noise.acc_p == 1.0
    nothing = _contrast(e, "resize", "cv2-linear")
    assert (nothing.acc_right_to_wrong, nothing.acc_wrong_to_right) == (0, 0)
    assert (nothing.acc_ci_low, nothing.acc_ci_high) == (0.0, 0.0)
    text = " ".join(render_text(e).split())     # the lines are aligned with spaces
    assert "decoder turbojpeg: +0.00 pts" in text
    assert f"indistinguishable from zero at n = {N_LABELLED}" in text


def test_type_ii_shares_of_correctness_blame_the_decoder(accuracy_run: Path):
    shares = explain_run(accuracy_run).accuracy["shares"]
    assert shares["decoder"] > 0.05 and shares["resize"] < 1e-9


def test_the_views_give_explains_numbers(accuracy_run: Path):
    con = open_run(accuracy_run)
    e = explain_run(accuracy_run)
    view = {r[0]: r[1:] for r in con.sql(
        "SELECT cell_id, n, delta, ci_low, ci_high, right_to_wrong, wrong_to_right, p_value "
        "FROM accuracy_contrasts").fetchall()}
    assert len(view) == 5
    for c in e.contrasts:
        assert view[c.cell_id] == (c.acc_n, c.acc_delta, c.acc_ci_low, c.acc_ci_high,
                                   c.acc_right_to_wrong, c.acc_wrong_to_right, c.acc_p)
    per_cell = con.sql("SELECT cell, n_labelled, n, top1 FROM accuracy WHERE is_reference").fetchall()
    assert per_cell == [("decoder=pil resize=pil-bilinear", N_LABELLED, N_LABELLED, 82.5)]


def test_the_gate_fails_the_planted_drop_with_its_bound_and_passes_the_noise(accuracy_run: Path):
    off = {"max_rel_l2": None, "min_cosine": None, "min_top1_agreement": None}
    r = check_run(accuracy_run, off | {"max_accuracy_drop": 5.0})
    import pyarrow.parquet as pq
    cells = {c["cell_id"]: c for c in pq.read_table(accuracy_run / "cells.parquet").to_pylist()}
    failing = {cells[f.cell_id]["decoder"] for f in r.failures}
    assert failing == {"simplejpeg"} and {f.check for f in r.failures} == {"max_accuracy_drop"}
    e = explain_run(accuracy_run)
    bound = -_contrast(e, "decoder", "simplejpeg").acc_ci_high
    text = render_check_text(r)
    assert f"a drop beyond 5.00 pts with 95% confidence (at least {bound:.2f} pts, n = 40)" in text
    # beyond the planted drop's bound, nothing fails; a per-cell limit fails only its cell
    assert check_run(accuracy_run, off | {"max_accuracy_drop": bound + 0.01}).passed
    per_cell = check_run(accuracy_run, off | {"max_accuracy_drop": {
        "*": 50.0, "decoder=simplejpeg resize=cv2-linear": 1.0}})
    assert [cells[f.cell_id]["resize"] for f in per_cell.failures] == ["cv2-linear"]


def test_dmx_explain_prints_the_accuracy_ranking(accuracy_run: Path):
    r = subprocess.run([sys.executable, "-m", "dmx", "explain", str(accuracy_run)],
                       capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr
    assert "Factors ranked by top-1 change in points" in r.stdout
    assert f"{K} right->wrong, 1 wrong->right" in r.stdout
