"""Attribution on a planted run: rows written with the real schema so that the truth is known."""
from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from dmx.analysis.explain import concentration, explain_run, wilson
from dmx.matrix import make_cell
from dmx.results import IMAGE_SCHEMA, RunDir, cell_schema, row_schema, write_parquet_atomic

AXES = ("decoder", "resize", "backend")
LEVELS = {"decoder": ["pil", "opencv"], "resize": ["pil-bilinear", "cv2-linear"],
          "backend": ["torch", "openvino"]}
N_IMAGES = 10
ROTATED = 0                       # image 0 carries EXIF orientation 6
FLIPPED = {1, 2, 3}               # images whose top-1 class flips under cv2-linear


def planted_cos_dist(factors: dict[str, str], image: int) -> float:
    """The truth: resize moves every image by 0.01, opencv only the EXIF-rotated image
    (by 0.05), openvino every image by 1e-6; effects add up."""
    d = 0.0
    if factors["resize"] == "cv2-linear":
        d += 0.01
    if factors["decoder"] == "opencv" and image == ROTATED:
        d += 0.05
    if factors["backend"] == "openvino":
        d += 1e-6
    return d


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, np.ndarray, list[dict]]:
    root = tmp_path_factory.mktemp("planted") / "run"
    run = RunDir(root)
    cells = [make_cell(dict(zip(AXES, combo)), AXES) for combo in itertools.product(*LEVELS.values())]
    ref = cells[0]
    rows, table = [], []
    for c in cells:
        f = dict(c.factors)
        for i in range(N_IMAGES):
            d = planted_cos_dist(f, i)
            flip = f["resize"] == "cv2-linear" and i in FLIPPED
            input_differs = f["resize"] == "cv2-linear" or (f["decoder"] == "opencv" and i == ROTATED)
            rows.append({"run_id": "planted", "cell_id": c.cell_id, "image_id": f"img{i}.jpg", **f,
                         "status": "ok", "is_reference": c.cell_id == ref.cell_id,
                         "shape_match": not (f["decoder"] == "opencv" and i == ROTATED),
                         "px_equal": not input_differs, "px_mean_abs": 2.0 if input_differs else 0.0,
                         "out_cosine": 1.0 - d, "out_max_abs": 100 * d, "top1": 7 if flip else 3,
                         "top1_ref": 3, "top1_agree": not flip, "precision_effective": "fp32"})
            table.append((f, i, d))
    root.mkdir(parents=True)
    write_parquet_atomic(pa.Table.from_pylist(rows, schema=row_schema(AXES)), run.part_path(0))
    write_parquet_atomic(pa.Table.from_pylist(
        [{"cell_id": c.cell_id, **dict(c.factors), "is_reference": c.cell_id == ref.cell_id,
          "status": "ok", "label": c.label()} for c in cells], schema=cell_schema(AXES)),
        root / "cells.parquet")
    write_parquet_atomic(pa.Table.from_pylist(
        [{"image_id": f"img{i}.jpg", "format": "JPEG", "subsampling": "4:2:0", "width": 640,
          "height": 480, "exif_orientation": 6 if i == ROTATED else None, "color_mode": "RGB"}
         for i in range(N_IMAGES)], schema=IMAGE_SCHEMA), root / "images.parquet")
    run.write_manifest({"run_id": "planted", "spec": {"name": "planted"}, "images": N_IMAGES,
                        "reference": ref.label(), "counters": {}})
    return root, np.array([d for _, _, d in table]), [f for f, _, _ in table]


def test_the_dominant_factor_is_ranked_first_with_its_planted_effect(planted):
    e = explain_run(planted[0])
    ranking = e.factor_ranking()
    # ranked by the typical (median) image: the decoder moves one image of ten
    assert [f["factor"] for f in ranking] == ["resize", "backend", "decoder"]
    by = {f["factor"]: f for f in ranking}
    assert by["resize"]["effect"] == pytest.approx(0.01, rel=1e-6)
    assert by["backend"]["effect"] == pytest.approx(1e-6, rel=1e-3)
    assert by["decoder"]["effect"] == 0
    assert by["decoder"]["cosine_distance_mean"] == pytest.approx(0.05 / N_IMAGES, rel=1e-6)


def test_a_factor_that_moves_one_image_far_is_reported_as_rare_but_large(planted):
    rare = explain_run(planted[0]).rare_but_large()
    assert [(c.factor, c.level) for c in rare] == [("decoder", "opencv")]
    assert rare[0].cos_dist_max == pytest.approx(0.05)


def test_top1_flips_carry_a_wilson_interval(planted):
    c = next(c for c in explain_run(planted[0]).contrasts if c.factor == "resize")
    assert c.top1_disagree == pytest.approx(0.3)
    assert c.top1_ci == pytest.approx(wilson(3, 10))
    lo, hi = c.top1_ci
    assert lo == pytest.approx(0.1078, abs=1e-3) and hi == pytest.approx(0.6032, abs=1e-3)


def test_eta_squared_matches_an_independent_computation(planted):
    _, d, factors = planted
    grand = d.mean()
    ss_total = ((d - grand) ** 2).sum()
    expected = {}
    for axis in AXES:
        ss = sum(((d[[f[axis] == lv for f in factors]].mean() - grand) ** 2)
                 * sum(f[axis] == lv for f in factors) for lv in LEVELS[axis])
        expected[axis] = ss / ss_total
    got = explain_run(planted[0]).eta_squared
    for axis in AXES:
        assert got[axis] == pytest.approx(expected[axis], rel=1e-6, abs=1e-12)
    assert max(got, key=got.get) == "resize"


def test_the_decoder_divergence_is_traced_to_the_exif_rotated_image(planted):
    c = next(c for c in explain_run(planted[0]).contrasts if c.factor == "decoder")
    assert c.shape_mismatches == 1
    assert c.concentrated["property"] == "exif_orientation" and c.concentrated["values"] == ["6"]
    assert (c.concentrated["divergent_in"], c.concentrated["others_in"]) == (1, 0)
    assert c.worst[0]["image_id"] == "img0.jpg"
    assert c.cos_dist_same_input == 0 and c.cos_dist_diff_input == pytest.approx(0.05)


def test_concentration_is_none_when_every_image_diverges():
    assert concentration({"subsampling": [("4:2:0", 5, 5), ("4:4:4", 5, 5)]}) is None
    k = concentration({"subsampling": [("4:2:0", 8, 8), ("4:4:4", 4, 0)]})
    assert k["values"] == ["4:2:0"] and k["score"] == 1.0


def test_explain_json_ranking_lists_factor_level_metric_effect(planted, capsys):
    from dmx.cli import main
    assert main(["explain", str(planted[0]), "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    first = out["ranking"][0]
    assert (first["factor"], first["level"], first["metric"]) == ("resize", "cv2-linear",
                                                                  "cosine_distance_median")
    assert math.isclose(first["effect"], 0.01, rel_tol=1e-6)
