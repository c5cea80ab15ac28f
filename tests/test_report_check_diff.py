"""Specification tests for ``dmx report`` (dmx.analysis.report, dmx.analysis.pictures), ``dmx check``
(dmx.analysis.check) and ``dmx diff`` (dmx.analysis.diff).

Runs are real: the in-process runner sweeps the ``tiny`` model (32x32 random-init CNN) over a
few JPEGs that Pillow encodes in a temporary folder. Tests that plant a divergence copy a run and
rewrite one part file with pyarrow, as a run made elsewhere would look.
"""
from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dmx.analysis.check import CheckError, check_run, default_limits, render_check_text
from dmx.analysis.diff import diff_runs, render_diff_text
from dmx.analysis.pictures import model_input, preprocess_from_manifest
from dmx.analysis.report import pick_divergent, write_report
from dmx.matrix import parse_spec
from dmx.runner.sweep import RunOptions, run_spec

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SECTIONS = ("summary", "ranking", "interactions", "distributions", "images", "gate", "notes")
REFERENCE = {"decoder": "pil", "resize": "pil-bilinear", "backend": "torch", "precision": "fp32"}


# ------------------------------------------------------------------ building runs

def _photo(seed: int, w: int = 64, h: int = 48) -> Image.Image:
    """Gradient plus noise, deterministic per seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 4 + seed * 20, y * 5, (x + y) * 2], axis=-1) + rng.integers(0, 60, (h, w, 3))
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four real JPEGs: 4:4:4 and 4:2:0, two contents each."""
    root = tmp_path_factory.mktemp("images")
    for seed in (1, 2):
        for name, subsampling in (("444", 0), ("420", 2)):
            _photo(seed).save(root / f"photo{seed}_{name}.jpg", quality=90, subsampling=subsampling)
    return root


def _run(images: Path, out: Path, axes: dict[str, list[str]], check: dict | None = None) -> Path:
    raw: dict[str, Any] = {"name": "t", "dataset": {"path": str(images)}, "model": "tiny",
                           "axes": axes, "reference": {k: v for k, v in REFERENCE.items() if k in axes}}
    if check:
        raw["check"] = check
    run_spec(parse_spec(raw), RunOptions(out=str(out), executor="local", progress=False))
    return out


BACKEND_ONLY = {"decoder": ["pil"], "resize": ["pil-bilinear"],
                "backend": ["torch", "onnxruntime", "openvino"], "precision": ["fp32"],
                "openvino_hint": ["f32"]}
PIPELINE = {"decoder": ["pil", "opencv"], "resize": ["pil-bilinear", "cv2-linear"],
            "backend": ["torch", "onnxruntime"], "precision": ["fp32"]}


@pytest.fixture(scope="module")
def backend_run(images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Cells differ from the reference only in backend, all at fp32."""
    return _run(images, tmp_path_factory.mktemp("backend") / "run", BACKEND_ONLY)


@pytest.fixture(scope="module")
def backend_run_again(images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same spec as ``backend_run``, run a second time."""
    return _run(images, tmp_path_factory.mktemp("backend2") / "run", BACKEND_ONLY)


@pytest.fixture(scope="module")
def pipeline_run(images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """decoder x resize x backend: the resize change diverges, the rest hardly."""
    return _run(images, tmp_path_factory.mktemp("pipeline") / "run", PIPELINE)


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def _cell_id(run: Path, **factors: str) -> str:
    cells = pq.read_table(run / "cells.parquet").to_pylist()
    match = [c["cell_id"] for c in cells if all(c.get(k) == v for k, v in factors.items())]
    assert len(match) == 1, f"{factors} matches {len(match)} cells"
    return match[0]


def _rewrite_rows(run: Path, cell_id: str, **columns: Callable[[pa.Array], pa.Array]) -> None:
    """Rewrite columns of one cell's rows in every part file (value -> new value arrays)."""
    for part in (run / "rows").glob("chunk=*/part-0.parquet"):
        t = pq.read_table(part)
        mine = pc.equal(t["cell_id"], cell_id)
        for name, fn in columns.items():
            i = t.schema.get_field_index(name)
            t = t.set_column(i, t.schema.field(i), pc.if_else(mine, fn(t[name]), t[name]))
        pq.write_table(t, part)


def _const(value: Any, typ: pa.DataType) -> Callable[[pa.Array], pa.Array]:
    return lambda col: pa.array([value] * len(col), typ)


def _manifest(run: Path) -> dict[str, Any]:
    return json.loads((run / "manifest.json").read_text())


# ------------------------------------------------------------------ check

def test_cells_differing_only_in_backend_at_fp32_pass_the_default_gate(backend_run: Path):
    result = check_run(backend_run)
    assert result.passed, render_check_text(result)
    assert result.cells_judged == 2


def test_default_rel_l2_limit_is_ten_times_torch_testing_rtol_of_the_effective_precision():
    assert default_limits("fp32")["max_rel_l2"] == pytest.approx(1.3e-5)
    assert default_limits("fp16")["max_rel_l2"] == pytest.approx(1e-2)
    assert default_limits("bf16")["max_rel_l2"] == pytest.approx(1.6e-1)
    assert default_limits("int8") == {"max_abs": None, "max_rel_l2": None, "min_cosine": None}


def test_a_resize_change_fails_the_gate_and_is_named_with_the_numbers_seen(pipeline_run: Path):
    result = check_run(pipeline_run)
    resize_only = _cell_id(pipeline_run, decoder="pil", resize="cv2-linear", backend="torch")
    assert not result.passed
    assert resize_only in result.failing_cells
    broken = [f for f in result.failures if f.cell_id == resize_only and f.check == "max_rel_l2"]
    assert broken and broken[0].seen > broken[0].limit == pytest.approx(1.3e-5)
    assert broken[0].rows_bad >= 1 and broken[0].image_id


def test_scope_same_input_judges_only_rows_whose_input_equals_the_reference(pipeline_run: Path):
    result = check_run(pipeline_run, {"scope": "same-input"})
    assert result.passed, render_check_text(result)
    assert any("cv2-linear" in label for label in result.not_judged)


def test_a_planted_max_abs_over_the_limit_fails_that_cell_only(backend_run: Path, tmp_path: Path):
    run = _copy(backend_run, tmp_path)
    ort = _cell_id(run, backend="onnxruntime")
    _rewrite_rows(run, ort, out_max_abs=_const(0.5, pa.float64()))
    result = check_run(run, {"max_abs": 0.01})
    assert result.failing_cells == [ort]
    (f,) = result.failures
    assert (f.check, f.limit, f.seen, f.rows_bad) == ("max_abs", 0.01, 0.5, 4)


def test_a_cell_that_ran_bf16_when_asked_fp32_fails_by_default(backend_run: Path, tmp_path: Path):
    """Like OpenVINO's CPU plugin on an avx512_bf16 machine: asked fp32, ran bf16, rel L2 ~1e-2."""
    run = _copy(backend_run, tmp_path)
    ov = _cell_id(run, backend="openvino")
    _rewrite_rows(run, ov, precision_effective=_const("bf16", pa.string()),
                  out_rel_l2=_const(1.2e-2, pa.float64()), out_max_abs=_const(0.6, pa.float64()))
    result = check_run(run)
    assert [(f.cell_id, f.check, f.limit, f.seen) for f in result.failures] == [
        (ov, "precision", "fp32", "bf16")]
    lowered = check_run(run, {"allow_lower_precision": True})
    assert lowered.passed, "rel L2 1.2e-2 is within bf16's 1.6e-1"
    assert lowered.limits_by_precision["bf16"]["max_rel_l2"] == pytest.approx(0.16)


def test_a_nan_output_breaks_every_numeric_limit(backend_run: Path, tmp_path: Path):
    run = _copy(backend_run, tmp_path)
    ort = _cell_id(run, backend="onnxruntime")
    nan = _const(float("nan"), pa.float64())
    _rewrite_rows(run, ort, out_rel_l2=nan, out_cosine=nan)
    checks = {f.check: f.seen for f in check_run(run).failures}
    assert checks == {"max_rel_l2": "nan", "min_cosine": "nan"}


def test_a_top1_flip_fails_the_default_agreement_of_one(backend_run: Path, tmp_path: Path):
    run = _copy(backend_run, tmp_path)
    ort = _cell_id(run, backend="onnxruntime")
    part = next((run / "rows").glob("chunk=*/part-0.parquet"))
    t = pq.read_table(part)
    flip = pc.and_(pc.equal(t["cell_id"], ort), pc.equal(t["image_id"], t["image_id"][0]))
    t = t.set_column(t.schema.get_field_index("top1_agree"), "top1_agree",
                     pc.if_else(flip, False, t["top1_agree"]))
    pq.write_table(t, part)
    (f,) = check_run(run).failures
    assert (f.cell_id, f.check, f.rows_bad, f.rows, f.seen) == (ort, "min_top1_agreement", 1, 4, 0.75)
    assert check_run(run, {"min_top1_agreement": 0.75}).passed


def test_a_row_failing_where_the_reference_succeeded_is_a_failure(backend_run: Path, tmp_path: Path):
    run = _copy(backend_run, tmp_path)
    ort = _cell_id(run, backend="onnxruntime")
    _rewrite_rows(run, ort, status=_const("error", pa.string()),
                  error_stage=_const("infer", pa.string()), error=_const("boom", pa.string()))
    result = check_run(run)
    assert [(f.check, f.rows_bad) for f in result.failures] == [("errors", 4)]
    assert check_run(run, {"allow_errors": True}).passed


def test_the_spec_check_section_sets_tolerances_and_arguments_override_it(images: Path, tmp_path: Path):
    run = _run(images, tmp_path / "run", {"resize": ["pil-bilinear", "cv2-linear"]},
               check={"max_rel_l2": 10.0, "min_cosine": None, "min_top1_agreement": 0.0})
    assert check_run(run).passed
    assert check_run(run).tolerances["max_rel_l2"] == 10.0
    assert not check_run(run, {"max_rel_l2": 1e-9}).passed


@pytest.mark.parametrize("tolerances, message", [
    ({"max_rel": 1.0}, "unknown tolerance 'max_rel'"),
    ({"scope": "some"}, "check.scope"),
    ({"min_cosine": 2.0}, "out of range"),
    ({"max_abs": "big"}, "must be a number"),
])
def test_a_bad_tolerance_is_a_check_error_naming_the_key(backend_run: Path, tolerances: dict,
                                                         message: str):
    with pytest.raises(CheckError, match=message):
        check_run(backend_run, tolerances)


def test_check_result_json_is_plain_data(pipeline_run: Path):
    data = json.loads(json.dumps(check_run(pipeline_run).to_json()))
    assert data["passed"] is False and data["failing_cells"] == len({f["cell_id"] for f in data["failures"]})
    assert set(data["failures"][0]) >= {"cell_id", "cell", "check", "limit", "seen", "rows_bad", "rows"}


# ------------------------------------------------------------------ diff

def test_two_runs_of_the_same_spec_do_not_move(backend_run: Path, backend_run_again: Path):
    d = diff_runs(backend_run, backend_run_again)
    assert d.same_spec and not d.moved, render_diff_text(d)
    assert len(d.cells) == 3


def test_a_rewritten_part_file_moves_that_cell_and_no_other(backend_run: Path, tmp_path: Path):
    run = _copy(backend_run, tmp_path)
    ort = _cell_id(run, backend="onnxruntime")
    _rewrite_rows(run, ort, out_max_abs=lambda col: pc.add(col, 0.25))
    d = diff_runs(backend_run, run)
    (moved,) = d.moved
    assert moved.cell_id == ort
    assert moved.max_abs_delta_max == pytest.approx(0.25)
    assert moved.max_abs_delta_mean == pytest.approx(0.25)
    assert "max abs moved" in render_diff_text(d)


def test_a_changed_reference_output_shows_through_the_top1_probability(backend_run: Path,
                                                                        tmp_path: Path):
    run = _copy(backend_run, tmp_path)
    ref = _manifest(run)["reference_cell"]
    _rewrite_rows(run, ref, top5_prob=lambda col: pa.array(
        [[p + 0.01 for p in v] for v in col.to_pylist()], pa.list_(pa.float32())))
    (moved,) = diff_runs(backend_run, run).moved
    assert moved.cell_id == ref and moved.is_reference
    assert moved.top1_prob_delta_max == pytest.approx(0.01, rel=1e-3)


def test_rows_present_in_one_run_only_are_reported(backend_run: Path, tmp_path: Path):
    run = _copy(backend_run, tmp_path)
    ort = _cell_id(run, backend="onnxruntime")
    for part in (run / "rows").glob("chunk=*/part-0.parquet"):
        t = pq.read_table(part)
        pq.write_table(t.filter(pc.invert(pc.equal(t["cell_id"], ort))), part)
    (moved,) = diff_runs(backend_run, run).moved
    assert (moved.cell_id, moved.only_a, moved.only_b) == (ort, 4, 0)


def test_environment_differences_are_listed(backend_run: Path, tmp_path: Path):
    run = _copy(backend_run, tmp_path)
    m = _manifest(run)
    m["environment"]["packages"]["onnxruntime"] = "0.0.1"
    m["environment"]["cpu"]["isa"]["avx512_bf16"] = not m["environment"]["cpu"]["isa"].get("avx512_bf16")
    (run / "manifest.json").write_text(json.dumps(m))
    env = {(e.section, e.key): (e.a, e.b) for e in diff_runs(backend_run, run).environment}
    assert env[("packages", "onnxruntime")][1] == "0.0.1"
    assert ("cpu isa", "avx512_bf16") in env
    data = json.loads(json.dumps(diff_runs(backend_run, run).to_json()))
    assert {"section": "packages", "key": "onnxruntime", "b": "0.0.1"} in [
        {k: e[k] for k in ("section", "key", "b")} for e in data["environment"]]


# ------------------------------------------------------------------ pictures and report

def test_re_rendered_inputs_reproduce_the_runs_input_difference(pipeline_run: Path):
    m = _manifest(pipeline_run)
    pre = preprocess_from_manifest(m["model"]["preprocess"])
    rows = pq.read_table(next((pipeline_run / "rows").glob("chunk=*/part-0.parquet"))).to_pylist()
    images = {r["image_id"]: r["path"] for r in pq.read_table(pipeline_run / "images.parquet").to_pylist()}
    row = next(r for r in rows if r["resize"] == "cv2-linear" and r["decoder"] == "pil"
               and r["backend"] == "torch")
    ref = model_input(images[row["image_id"]], REFERENCE, pre)
    variant = model_input(images[row["image_id"]], row, pre)
    assert ref.shape == variant.shape == (32, 32, 3)
    assert float(np.abs(ref - variant).max()) == pytest.approx(row["px_max_abs"])


def test_divergent_rows_are_picked_one_per_cell_first():
    rows = [{"cell_id": c, "image_id": i, "cos_dist": d, "max_abs": d}
            for c, i, d in (("a", "x", 0.9), ("a", "y", 0.8), ("b", "x", 0.5), ("c", "z", 0.0))]
    assert [(r["cell_id"], r["image_id"]) for r in pick_divergent(rows, 2)] == [("a", "x"), ("b", "x")]
    assert len(pick_divergent(rows, 6)) == 3, "a row that does not diverge is never shown"


class _Page(HTMLParser):
    """Element ids, <img> sources and external references of an HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.imgs: list[str] = []
        self.external: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(a["id"])
        if tag == "img":
            self.imgs.append(a.get("src") or "")
        for key in ("src", "href"):
            v = a.get(key) or ""
            if v and not v.startswith(("data:", "#")):
                self.external.append(v)


def _parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    return page


def _assert_pngs(srcs: list[str]) -> None:
    for src in srcs:
        assert src.startswith("data:image/png;base64,"), src[:40]
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as im:
            assert im.format == "PNG"
            im.load()
            assert im.size[0] > 0 and im.size[1] > 0


@pytest.fixture(scope="module")
def report(pipeline_run: Path) -> Path:
    return write_report(pipeline_run, pipeline_run.parent / "report.html")


def test_report_is_one_self_contained_page_with_every_section(report: Path):
    text = report.read_text(encoding="utf-8")
    page = _parse(text)
    assert set(SECTIONS) <= page.ids
    assert {"chart-ranking", "chart-interactions", "chart-distributions"} <= page.ids
    assert not page.external, page.external
    assert "http://" not in text and "https://" not in text
    _assert_pngs(page.imgs)


def test_report_shows_reference_variant_and_difference_for_the_divergent_images(report: Path):
    text = report.read_text(encoding="utf-8")
    assert "variant: resize = cv2-linear" in text
    assert "|difference| &times;" in text
    assert re.search(r"<td>\d class\d</td>", text), "class names of the built-in tiny model"
    assert len(_parse(text).imgs) >= 3 + 3, "three charts and one reference/variant/difference triple"


def test_report_of_a_run_whose_images_moved_says_why_pictures_are_missing(
        pipeline_run: Path, tmp_path: Path):
    run = _copy(pipeline_run, tmp_path)
    images = pq.read_table(run / "images.parquet")
    i = images.schema.get_field_index("path")
    gone = pa.array([str(tmp_path / "gone" / Path(p).name) for p in images["path"].to_pylist()])
    pq.write_table(images.set_column(i, "path", gone), run / "images.parquet")
    text = write_report(run, tmp_path / "report.html").read_text(encoding="utf-8")
    assert "cannot read" in text and "No such file" in text
    _assert_pngs(_parse(text).imgs)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed "
                    "(apt-get install -y chromium); the CI script installs it")
def test_report_renders_in_headless_chromium(report: Path, tmp_path: Path):
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,4000"]
    url = report.resolve().as_uri()
    dom = subprocess.run(flags + ["--dump-dom", url], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    page = _parse(dom)
    assert set(SECTIONS) <= page.ids
    assert len(page.imgs) >= 6
    _assert_pngs(page.imgs)
    shot = tmp_path / "report.png"
    subprocess.run(flags + [f"--screenshot={shot}", url], capture_output=True, timeout=120, check=True)
    with Image.open(shot) as im:
        pixels = np.asarray(im.convert("L"))
    assert pixels.shape == (4000, 1400)
    assert pixels.std() > 10, "the screenshot is not a blank page"
