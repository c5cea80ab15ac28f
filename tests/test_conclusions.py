"""Conclusions that hold on messy runs (issue 21): NaN outputs, heavy tails, several nodes,
cells that ran at more than one precision, and cell ids that collide.

Runs are planted (``tests/planted.py``): rows written with the real schema, so every number
explain and check report can be checked against the truth.
"""
from __future__ import annotations

import math
from pathlib import Path

import duckdb
import pytest

from dmx.analysis.check import check_run, render_check_text
from dmx.analysis import explain as explain_module
from dmx.analysis.explain import explain_run, register_views, tolerance_verdict
from dmx.analysis.render import render_text
from dmx.matrix import parse_spec
from dmx.matrix.cells import expand
from dmx.matrix.errors import SpecError

from planted import write_run

N = 20


def _moved(cos_dist: float, rel_l2: float | None = None, **more) -> dict:
    return {"out_cosine": 1.0 - cos_dist, "out_max_abs": 10 * cos_dist,
            "out_rel_l2": math.sqrt(2 * cos_dist) if rel_l2 is None else rel_l2, **more}


NAN = {"out_cosine": math.nan, "out_max_abs": math.nan, "out_rel_l2": math.nan}
INF = {"out_cosine": math.nan, "out_max_abs": math.inf, "out_rel_l2": math.inf}


# ------------------------------------------------------------------ cells

def test_two_cells_whose_ids_collide_are_a_spec_error():
    # sha1("threads=71;batch=3541") and sha1("threads=317;batch=3493") share their first 40 bits
    spec = parse_spec({"name": "c", "dataset": {"path": "."}, "model": "tiny",
                       "axes": {"threads": [71, 317], "batch": [3541, 3493]}})
    with pytest.raises(SpecError, match="same cell id b57c662724"):
        expand(spec)


# ------------------------------------------------------------------ explain: NaN / Inf

@pytest.fixture(scope="module")
def nan_run(tmp_path_factory) -> Path:
    """fp16 overflows on two images (one NaN, one Inf) and is otherwise near the reference;
    onnxruntime moves every image by 1e-3."""
    def row(f: dict, i: int) -> dict:
        if f["precision"] == "fp16":
            return NAN if i == 3 else INF if i == 7 else _moved(1e-7)
        return _moved(1e-3)
    return write_run(tmp_path_factory.mktemp("nan") / "run", ("backend", "precision"),
                     [{"backend": "torch", "precision": "fp32"}, {"backend": "torch", "precision": "fp16"},
                      {"backend": "onnxruntime", "precision": "fp32"}], row, N)


def test_a_cell_with_nan_or_inf_outputs_ranks_first(nan_run: Path):
    e = explain_run(nan_run)
    first = e.ranking()[0]
    assert (first["factor"], first["level"], first["nonfinite"]) == ("precision", "fp16", 2)
    assert e.factor_ranking()[0]["factor"] == "precision"


def test_explain_says_nan_inf_on_k_of_n_images(nan_run: Path):
    text = render_text(explain_run(nan_run))
    ranked = text.split("Factors ranked")[1].split("Evidence")[0]
    assert ranked.index("fp16") < ranked.index("onnxruntime")
    assert "NaN/Inf on 2 of 20 images" in ranked


def test_a_contrast_with_nan_outputs_is_never_within_tolerance(tmp_path: Path):
    # finite rows 1e-7 from the reference (rel L2 1e-6, within fp16's 1e-2), one NaN row
    run = write_run(tmp_path / "run", ("precision",), [{"precision": "fp32"}, {"precision": "fp16"}],
                    lambda f, i: (NAN if i == 0 else _moved(1e-7, rel_l2=1e-6)) | {"precision_effective": "fp16"}, N)
    c = explain_run(run).contrasts[0]
    assert c.n_nonfinite == 1 and tolerance_verdict(c)["within"] is False


def test_finite_statistics_leave_the_nan_rows_out(nan_run: Path):
    c = next(c for c in explain_run(nan_run).contrasts if c.level == "fp16")
    assert c.cos_dist_max == pytest.approx(1e-7, rel=1e-3) and c.n == N


# ------------------------------------------------------------------ explain: rare but large

@pytest.fixture(scope="module")
def tail_run(tmp_path_factory) -> Path:
    """int8 moves every image (0.01, the last 0.15) on identical inputs; opencv moves one
    image (0.05) whose input differs."""
    def row(f: dict, i: int) -> dict:
        if f["precision"] == "int8":
            return _moved(0.15 if i == N - 1 else 0.01)
        return _moved(0.05, px_equal=False, px_mean_abs=2.0) if i == 0 else {}
    return write_run(tmp_path_factory.mktemp("tail") / "run", ("decoder", "precision"),
                     [{"decoder": "pil", "precision": "fp32"}, {"decoder": "pil", "precision": "int8"},
                      {"decoder": "opencv", "precision": "fp32"}], row, N)


def test_a_contrast_that_moves_every_image_is_not_rare(tail_run: Path):
    rare = explain_run(tail_run).rare_but_large()
    assert [(c.factor, c.level) for c in rare] == [("decoder", "opencv")]


def test_the_divergent_share_comes_from_the_outputs(tail_run: Path):
    by = {c.level: c for c in explain_run(tail_run).contrasts}
    assert by["int8"].out_divergent_frac == 1.0
    assert by["opencv"].out_divergent_frac == pytest.approx(1 / N)


# ------------------------------------------------------------------ explain: nodes

@pytest.fixture(scope="module")
def node_run(tmp_path_factory) -> Path:
    """Two identical nodes; the three EXIF-rotated images all fell in node B's chunk, and
    opencv (which applies EXIF orientation) moves exactly those."""
    rotated = {0, 1, 2}
    env = {"cpu": {"model": "x"}, "packages": {"torch": "2.13.0"}}
    return write_run(
        tmp_path_factory.mktemp("node") / "run", ("decoder",),
        [{"decoder": "pil"}, {"decoder": "opencv"}],
        lambda f, i: _moved(0.05, shape_match=False, px_equal=False) if i in rotated else _moved(1e-4),
        12, chunks=lambda i: 1 if i in rotated else 0,
        every=lambda i: {"node": "hostB/bbbb" if i in rotated else "hostA/aaaa"},
        image_props=lambda i: {"exif_orientation": 6 if i in rotated else 1},
        manifest={"nodes": {"hostA/aaaa": env, "hostB/bbbb": env}})


def test_node_is_not_ranked_like_a_factor(node_run: Path):
    e = explain_run(node_run)
    assert "node" not in e.eta_squared
    assert [f["factor"] for f in e.factor_ranking()] == ["decoder"]


def test_explain_says_why_node_is_not_ranked(node_run: Path):
    text = render_text(explain_run(node_run))
    line = next(l for l in text.splitlines() if "node" in l)
    assert "2 nodes" in line and "not ranked" in line and "different images" in line


# ------------------------------------------------------------------ mixed effective precision

@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory) -> Path:
    """An OpenVINO cell asked fp32: the node with AMX ran images 0-9 at bf16 (rel L2 0.05,
    within bf16's limit), the other ran 10-19 at fp32 (rel L2 1e-3, ~80x fp32's limit)."""
    def row(f: dict, i: int) -> dict:
        if i < 10:
            return _moved(1e-3, rel_l2=0.05, precision_effective="bf16")
        return _moved(1e-7, rel_l2=1e-3, precision_effective="fp32")
    return write_run(tmp_path_factory.mktemp("mixed") / "run", ("backend",),
                     [{"backend": "torch"}, {"backend": "openvino"}], row, N)


def test_check_judges_each_precision_part_by_its_own_tolerance(mixed_run: Path):
    r = check_run(mixed_run, {"allow_lower_precision": True})
    rel = [f for f in r.failures if f.check == "max_rel_l2"]
    assert [(f.precision_effective, f.rows_bad, f.rows) for f in rel] == [("fp32", 10, 10)]
    assert "ran bf16 on 10 and fp32 on 10 of 20 images" in render_check_text(r)


def test_check_names_the_part_that_ran_below_the_asked_precision(mixed_run: Path):
    r = check_run(mixed_run)
    prec = [f for f in r.failures if f.check == "precision"]
    assert [(f.seen, f.rows_bad, f.rows) for f in prec] == [("bf16", 10, 20)]


def test_explain_splits_a_cell_by_the_precision_it_ran(mixed_run: Path):
    e = explain_run(mixed_run)
    parts = sorted((c.precision_effective, c.n, tolerance_verdict(c)["within"]) for c in e.contrasts)
    assert parts == [("bf16", 10, True), ("fp32", 10, False)]
    assert "ran bf16 on 10 and fp32 on 10 of 20 images" in render_text(e)


# ------------------------------------------------------------------ intervals

def test_the_median_interval_is_an_order_statistic_interval():
    median_interval = explain_module.median_interval
    values = [(i + 1) * 1e-3 for i in range(N)]
    assert median_interval(values) == pytest.approx((6e-3, 15e-3))   # ranks 6 and 15 of 20
    assert median_interval([0.0] * 17 + [0.5] * 3) == (0.0, 0.0)
    assert median_interval([0.2]) == (0.2, 0.2)
    assert median_interval([]) is None


@pytest.fixture(scope="module")
def zero_inflated_run(tmp_path_factory) -> Path:
    """opencv moves 3 of 20 images by 0.5 and leaves the others identical."""
    return write_run(tmp_path_factory.mktemp("zeros") / "run", ("decoder",),
                     [{"decoder": "pil"}, {"decoder": "opencv"}],
                     lambda f, i: _moved(0.5) if i < 3 else {}, N)


def test_explain_reports_the_median_interval_with_n(zero_inflated_run: Path):
    e = explain_run(zero_inflated_run)
    c = e.contrasts[0]
    assert c.cos_dist_p50_ci == (0.0, 0.0) and c.n == N
    assert "median [95% CI]" in render_text(e) and "n=20" in render_text(e)


# ------------------------------------------------------------------ views

def test_the_contrasts_view_has_no_column_of_type_null(zero_inflated_run: Path):
    con = duckdb.connect()
    register_views(con, explain_run(zero_inflated_run))
    types = dict(con.execute("SELECT column_name, column_type FROM (DESCRIBE contrasts)").fetchall())
    assert "NULL" not in types.values(), {k: v for k, v in types.items() if v == "NULL"}
    assert types["concentrated_in"] == "VARCHAR" and types["det_tau_mean"] == "DOUBLE"
