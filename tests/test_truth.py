"""Conclusions whose answers are known by construction.

Two kinds of planted truth:

- **planted rows**: rows written with the real schema from a function (cell, image) -> cosine
  distance, so shares, nesting and contrasts can be checked against exact numbers, on designs of
  any shape (nested, unbalanced, random) in milliseconds;
- **planted pipelines**: real sweeps (``tiny`` model, local executor, real JPEGs) whose decoders
  are custom ``Decoder`` subclasses registered for a level that add exact perturbations to the
  decoded pixels: an effect on 10% of the images, an effect on every image whose size varies
  per image (noise), a channel swap that cancels ``color: bgr`` (a pure interaction), a decoder
  that fails on one image (error rows), one that cannot run (skipped cells), one that fails on
  every image (a broken reference).
"""
from __future__ import annotations

import itertools
import json
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from analysis.check import check_run, render_check_text
from analysis.explain import explain_run
from analysis.render import render_text
from matrix import make_cell
from results import IMAGE_SCHEMA, RunDir, cell_schema, row_schema, write_parquet_atomic


# ------------------------------------------------------------------ planted rows

def write_planted_run(root: Path, axes: tuple[str, ...], cells: list[dict[str, str | None]],
                      reference: dict[str, str | None], n_images: int,
                      cos_dist: Callable[[dict[str, Any], int], float]) -> Path:
    """A run directory whose rows carry ``cos_dist(factors, image)`` as 1 - out_cosine."""
    made = [make_cell(f, axes) for f in cells]
    ref = make_cell(reference, axes)
    assert ref.cell_id in {c.cell_id for c in made}, "the reference must be one of the cells"
    rows = []
    for c in made:
        f = dict(c.factors)
        for i in range(n_images):
            d = 0.0 if c.cell_id == ref.cell_id else cos_dist(f, i)
            rows.append({"run_id": "planted", "cell_id": c.cell_id, "image_id": f"img{i}.jpg", **f,
                         "status": "ok", "is_reference": c.cell_id == ref.cell_id,
                         "px_equal": d == 0, "out_cosine": 1.0 - d, "out_max_abs": 100 * d,
                         "out_rel_l2": d, "top1": 3, "top1_ref": 3, "top1_agree": True,
                         "precision_effective": "fp32"})
    run = RunDir(root)
    root.mkdir(parents=True)
    write_parquet_atomic(pa.Table.from_pylist(rows, schema=row_schema(axes)), run.part_path(0))
    write_parquet_atomic(pa.Table.from_pylist(
        [{"cell_id": c.cell_id, **dict(c.factors), "is_reference": c.cell_id == ref.cell_id,
          "status": "ok", "label": c.label()} for c in made], schema=cell_schema(axes)),
        root / "cells.parquet")
    write_parquet_atomic(pa.Table.from_pylist(
        [{"image_id": f"img{i}.jpg", "format": "JPEG"} for i in range(n_images)],
        schema=IMAGE_SCHEMA), root / "images.parquet")
    run.write_manifest({"run_id": "planted", "spec": {"name": "planted"}, "images": n_images,
                        "reference": ref.label(), "reference_cell": ref.cell_id, "counters": {}})
    return root


NESTED_AXES = ("decoder", "backend", "openvino_hint")


def nested_cells() -> list[dict[str, str | None]]:
    """decoder x (torch | openvino x 3 hints): openvino_hint is null on torch cells."""
    out = []
    for dec in ("pil", "opencv"):
        out.append({"decoder": dec, "backend": "torch", "openvino_hint": None})
        for hint in ("f32", "bf16", "accuracy"):
            out.append({"decoder": dec, "backend": "openvino", "openvino_hint": hint})
    return out


def backend_only(f: dict[str, Any], i: int) -> float:
    """Only the backend matters: OpenVINO moves every image by 0.02 (+ image noise)."""
    return (0.02 + 0.001 * (i % 3)) if f["backend"] == "openvino" else 0.0


def test_a_nested_axis_gets_no_share_when_only_its_parent_matters(tmp_path: Path):
    """Issue 12 item 2: openvino_hint (null on torch cells) was grouped as a level 'None' of its
    own and took eta² 0.58 like backend, shares summing to 1.17. Fails on 16e8c81."""
    run = write_planted_run(tmp_path / "run", NESTED_AXES, nested_cells(),
                            {"decoder": "pil", "backend": "torch"}, 12, backend_only)
    e = explain_run(run)
    assert e.eta_squared["openvino_hint"] < 1e-9
    assert e.eta_squared["decoder"] < 1e-9
    assert e.eta_squared["backend"] > 0.9
    assert sum(e.eta_squared.values()) + sum(i["eta_squared"] for i in e.interactions) <= 1 + 1e-9
    assert e.nested["openvino_hint"] == {"backend": ["openvino"]}


def test_a_nested_axis_that_matters_is_measured_within_its_parent(tmp_path: Path):
    """bf16 moves OpenVINO cells by 0.05, f32 and accuracy not at all: openvino_hint's share is
    the within-OpenVINO sum of squares, computed here independently."""
    def hint(f: dict[str, Any], i: int) -> float:
        return 0.05 + 0.002 * (i % 2) if f["openvino_hint"] == "bf16" else 0.0
    run = write_planted_run(tmp_path / "run", NESTED_AXES, nested_cells(),
                            {"decoder": "pil", "backend": "torch"}, 10, hint)
    e = explain_run(run)
    d = np.array([0.0 if f["openvino_hint"] != "bf16" else 0.05 + 0.002 * (i % 2)
                  for f in nested_cells() for i in range(10)])
    is_ov = np.array([f["backend"] == "openvino" for f in nested_cells() for _ in range(10)])
    is_bf16 = np.array([f["openvino_hint"] == "bf16" for f in nested_cells() for _ in range(10)])
    ss_total = ((d - d.mean()) ** 2).sum()
    ov = d[is_ov]
    ss_hint_within_ov = sum(((ov[g].mean() - ov.mean()) ** 2) * g.sum()
                            for g in (is_bf16[is_ov], ~is_bf16[is_ov]))
    assert e.eta_squared["openvino_hint"] == pytest.approx(ss_hint_within_ov / ss_total, rel=1e-6)
    assert e.eta_squared["decoder"] < 1e-9
    assert sum(e.eta_squared.values()) <= 1 + 1e-9


def test_no_contrast_against_a_null_level_with_the_reference_on_openvino(tmp_path: Path):
    """Issue 12 item 3: with the reference on OpenVINO, explain listed
    'openvino_hint=None (backend=torch)'. Fails on 16e8c81."""
    run = write_planted_run(tmp_path / "run", NESTED_AXES, nested_cells(),
                            {"decoder": "pil", "backend": "openvino", "openvino_hint": "f32"}, 6,
                            lambda f, i: 0.01 if f["backend"] == "torch" else 0.0)
    e = explain_run(run)
    assert all(c.level not in ("None", None) for c in e.contrasts)
    assert all("None" not in c.detail for c in e.contrasts)
    torch = [c for c in e.contrasts if c.factor == "backend" and c.level == "torch"]
    assert torch and all(not c.detail for c in torch)
    assert "openvino_hint=None" not in render_text(e)
    assert "=None" not in json.dumps(e.to_json()["ranking"])


def _random_design(rng: np.random.Generator) -> tuple[list, list[str]]:
    """A random unbalanced design: 2-4 axes of 2-3 levels, cells dropped at random, a nested axis,
    random per-cell counts, means and within-cell spread."""
    from analysis.effects import CellStat
    k = int(rng.integers(2, 5))
    axes = [f"a{j}" for j in range(k)] + ["nested"]
    levels = [[f"l{v}" for v in range(int(rng.integers(2, 4)))] for _ in range(k)]
    cells = []
    for combo in itertools.product(*levels):
        if rng.random() < 0.3:
            continue                                  # excluded / skipped cell
        for hint in (["h0", "h1"] if combo[0] == "l1" else [None]):
            lv = dict(zip(axes, combo)) | {"nested": hint}
            n = int(rng.integers(1, 20))
            cells.append(CellStat(lv, n, float(rng.normal() ** 2 * rng.choice([0.01, 1, 100])),
                                  float(rng.random() * n * rng.choice([0.0, 1e-4, 1.0]))))
    return cells, axes


@pytest.mark.parametrize("seed", range(40))
def test_shares_never_sum_above_what_the_cells_explain_on_random_designs(seed: int):
    from analysis.effects import CellStat, attribute
    cells, axes = _random_design(np.random.default_rng(seed))
    a = attribute(cells, axes)
    total = sum(a.main.values()) + sum(i["eta_squared"] for i in a.interactions)
    assert 0.0 <= a.explained <= 1.0 + 1e-12
    assert total <= a.explained + 1e-9
    assert all(v >= 0 for v in a.main.values())


def test_type_ii_shares_equal_classic_eta_squared_on_a_balanced_design():
    from analysis.effects import CellStat, attribute
    rng = np.random.default_rng(7)
    cells = [CellStat({"a": x, "b": y}, 5, float(rng.normal()), float(rng.random()))
             for x in ("p", "q", "r") for y in ("s", "t")]
    got = attribute(cells, ["a", "b"])
    grand = np.mean([c.mean for c in cells])
    ss_total = sum(5 * (c.mean - grand) ** 2 + c.ss_within for c in cells)
    for axis, lvls in (("a", "pqr"), ("b", "st")):
        ss = sum(len(g) * 5 * (np.mean([c.mean for c in g]) - grand) ** 2
                 for g in ([c for c in cells if c.levels[axis] == lv] for lv in lvls))
        assert got.main[axis] == pytest.approx(ss / ss_total, rel=1e-9)
    ss_ab = sum(5 * (c.mean - grand) ** 2 for c in cells) - sum(
        got.main[x] * ss_total for x in "ab")
    assert got.interactions[0]["eta_squared"] == pytest.approx(ss_ab / ss_total, rel=1e-6)


def test_an_interaction_on_an_unbalanced_design_is_measured_beyond_the_main_effects():
    """y = a + b exactly (no interaction) on a design with one cell excluded and unequal counts:
    SS_ab - SS_a - SS_b (the balanced formula) is not 0 there; SS(AB | A, B) is."""
    from analysis.effects import CellStat, attribute
    cells = [CellStat({"a": x, "b": y}, n, (1.0 if x == "q" else 0.0) + (2.0 if y == "t" else 0.0), 0.5)
             for (x, y), n in {("p", "s"): 3, ("p", "t"): 9, ("q", "s"): 14, ("r", "t"): 2,
                               ("r", "s"): 5}.items()]
    got = attribute(cells, ["a", "b"])
    assert got.interactions[0]["eta_squared"] < 1e-12
    assert got.main["a"] > 0 and got.main["b"] > 0
