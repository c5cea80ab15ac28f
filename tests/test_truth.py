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

from dmx.analysis.check import check_run, render_check_text
from dmx.analysis.explain import explain_run
from dmx.analysis.render import render_text
from dmx.matrix import make_cell
from dmx.results import IMAGE_SCHEMA, RunDir, cell_schema, row_schema, write_parquet_atomic


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
    from dmx.analysis.effects import CellStat
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
    from dmx.analysis.effects import attribute
    cells, axes = _random_design(np.random.default_rng(seed))
    a = attribute(cells, axes)
    total = sum(a.main.values()) + sum(i["eta_squared"] for i in a.interactions)
    assert 0.0 <= a.explained <= 1.0 + 1e-12
    assert total <= a.explained + 1e-9
    assert all(v >= 0 for v in a.main.values())


def test_type_ii_shares_equal_classic_eta_squared_on_a_balanced_design():
    from dmx.analysis.effects import CellStat, attribute
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
    from dmx.analysis.effects import CellStat, attribute
    cells = [CellStat({"a": x, "b": y}, n, (1.0 if x == "q" else 0.0) + (2.0 if y == "t" else 0.0), 0.5)
             for (x, y), n in {("p", "s"): 3, ("p", "t"): 9, ("q", "s"): 14, ("r", "t"): 2,
                               ("r", "s"): 5}.items()]
    got = attribute(cells, ["a", "b"])
    assert got.interactions[0]["eta_squared"] < 1e-12
    assert got.main["a"] > 0 and got.main["b"] > 0


# ------------------------------------------------------------------ planted pipelines

N_IMAGES = 20
WIDE = {"img03.jpg", "img14.jpg"}       # 10% of the images: 72 px wide instead of 64
SHORT = "img07.jpg"                     # 40 px high: the noisy decoder fails on it


def _photo(seed: int, w: int, h: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 3 + seed * 11, y * 4 + seed * 5, (x + y) * 2], axis=-1) + rng.integers(0, 50, (h, w, 3))
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")


@pytest.fixture(scope="module")
def planted_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("planted_images")
    for i in range(N_IMAGES):
        name = f"img{i:02d}.jpg"
        w = 72 if name in WIDE else 64
        h = 40 if name == SHORT else 48
        _photo(i, w, h).save(root / name, quality=92)
    return root


def _invert_corner_of_wide(img: np.ndarray, data: bytes) -> np.ndarray:
    """The rare effect: only 72-px-wide images, their top-left 24x24 block inverted."""
    if img.shape[1] == 72:
        img[:24, :24] = 255 - img[:24, :24]
    return img


def _noise(img: np.ndarray, data: bytes) -> np.ndarray:
    """The noisy effect: every image, +-1..4 levels of noise whose amplitude varies per image;
    a decode error on the short image (error rows)."""
    from dmx.runner.decoders import DecodeError
    if img.shape[0] == 40:
        raise DecodeError("planted: cannot decode the short image")
    seed = zlib.crc32(data)
    amp = 1 + seed % 4
    noise = np.random.default_rng(seed).integers(-amp, amp + 1, img.shape)
    return np.clip(img.astype(int) + noise, 0, 255).astype(np.uint8)


def _swap_channels(img: np.ndarray, data: bytes) -> np.ndarray:
    """A decoder that hands out BGR: it cancels ``color: bgr`` exactly."""
    return np.ascontiguousarray(img[..., ::-1])


def _fail(img: np.ndarray, data: bytes) -> np.ndarray:
    from dmx.runner.decoders import DecodeError
    raise DecodeError("planted: this decoder fails on every image")


def _planted_decoder(perturb: Callable[[np.ndarray, bytes], np.ndarray]):
    from dmx.runner.decoders.pil import PilDecoder

    class Planted(PilDecoder):
        system_name = "planted"

        def _decode(self, data, options):
            return perturb(super()._decode(data, options).copy(), data)

        def version(self):
            return {"library": f"planted-{perturb.__name__}", "version": "1", "libjpeg": None}
    return Planted()


def _unavailable(label: str):
    from dmx.runner.decoders import DecoderUnavailable
    raise DecoderUnavailable(f"planted: {label} cannot run here")


def planted_sweep(images: Path, out: Path, axes: dict[str, list], reference: dict[str, str],
                  decoders: dict[str, Callable | None], **spec: Any) -> Path:
    """Run a real sweep (tiny model, local executor) with planted decoders registered for the
    given decoder levels (None: a level that cannot run here, i.e. skipped cells)."""
    import dmx.runner.decoders as registry
    from dmx.matrix import parse_spec
    from dmx.runner.sweep import RunOptions, run_spec
    raw = {"name": "planted", "dataset": {"path": str(images)}, "model": "tiny", "axes": axes,
           "reference": reference, **spec}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(registry, "_CACHE", {})
        for level, perturb in decoders.items():
            mp.setitem(registry._FACTORIES, level,
                       _unavailable if perturb is None else (lambda _l, p=perturb: _planted_decoder(p)))
        run_spec(parse_spec(raw), RunOptions(out=str(out), executor="local", progress=False))
    return out


def test_a_reference_that_fails_on_every_image_fails_the_gate(planted_images: Path, tmp_path: Path):
    """Issue 12 item 1: the reference failed on every image, every other row was 'ok' without
    metrics, and ``dmx check`` passed. Fails on 16e8c81."""
    run = planted_sweep(planted_images, tmp_path / "run", {"decoder": ["nvjpeg", "pil"]},
                        {"decoder": "nvjpeg"}, {"nvjpeg": _fail})
    result = check_run(run)
    assert not result.passed, render_check_text(result)
    checks = {f.check for f in result.failures}
    assert "reference_errors" in checks
    ref_failure = next(f for f in result.failures if f.check == "reference_errors")
    assert (ref_failure.rows_bad, ref_failure.rows) == (N_IMAGES, N_IMAGES)
    # allowing every reference failure still judges nothing: the gate must not pass
    lenient = check_run(run, {"max_reference_errors": N_IMAGES})
    assert not lenient.passed
    assert [f.check for f in lenient.failures] == ["not_judged"]
    assert "NOT JUDGED" in render_check_text(lenient)


def test_a_cell_with_images_the_reference_failed_on_is_reported(planted_images: Path, tmp_path: Path):
    """The reference fails on the short image only: one image of every other cell is not judged
    and reported; max_reference_errors 1 lets the rest be judged."""
    run = planted_sweep(planted_images, tmp_path / "run",
                        {"decoder": ["turbojpeg", "pil"], "resize": ["pil-bilinear", "cv2-linear"]},
                        {"decoder": "turbojpeg", "resize": "pil-bilinear"}, {"turbojpeg": _noise})
    strict = check_run(run)
    assert "reference_errors" in {f.check for f in strict.failures}
    result = check_run(run, {"max_reference_errors": 1, "max_rel_l2": None, "min_cosine": None,
                             "min_top1_agreement": None})
    assert result.passed, render_check_text(result)
    assert result.not_judged_rows and all(
        (u["rows"], u["reference_failed"], u["image_id"]) == (1, 1, SHORT)
        for u in result.not_judged_rows.values())
    # the two pil cells; turbojpeg x cv2-linear fails on that image itself (an error row)
    assert sorted(result.not_judged_rows) == ["decoder=pil resize=cv2-linear",
                                              "decoder=pil resize=pil-bilinear"]
    assert result.to_json()["reference_errors"]["images"] == 1


PLANTED_AXES = {"decoder": ["pil", "simplejpeg", "turbojpeg", "opencv"], "exif": ["apply", "ignore"],
                "backend": ["torch", "openvino"], "openvino_hint": ["f32", "accuracy"]}
PLANTED_REFERENCE = {"decoder": "pil", "exif": "apply", "backend": "torch"}


@pytest.fixture(scope="module")
def planted_run(planted_images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """simplejpeg = the rare effect, turbojpeg = the noisy one (and a decode error), opencv cannot
    run (skipped cells), exif has no effect (no image carries an orientation), openvino_hint is
    nested in backend; turbojpeg x exif=ignore is excluded."""
    return planted_sweep(planted_images, tmp_path_factory.mktemp("planted") / "run", PLANTED_AXES,
                         PLANTED_REFERENCE,
                         {"simplejpeg": _invert_corner_of_wide, "turbojpeg": _noise, "opencv": None},
                         exclude=[{"decoder": "turbojpeg", "exif": "ignore"}])


def test_the_planted_design_is_unbalanced(planted_run: Path):
    e = explain_run(planted_run)
    status = {(s["status"], s["error_stage"]) for s in e.status}
    assert ("skipped", None) in status and ("error", "decode") in status
    assert e.cells == 4 * 2 * 3 - 3 and len(e.skipped) == 2 * 3


def test_the_rare_effect_appears_as_rare_but_large_with_exactly_its_images(planted_run: Path):
    e = explain_run(planted_run)
    rare = [c for c in e.rare_but_large() if c.factor == "decoder" and c.level == "simplejpeg"]
    assert rare, render_text(e)
    c = rare[0]
    assert c.cos_dist_p50 == 0 and c.cos_dist_max > 0
    assert {w["image_id"] for w in c.worst} == WIDE
    assert c.n_diff_input == len(WIDE)


def test_ranking_puts_the_noisy_factor_first_and_the_no_effect_factor_at_zero(planted_run: Path):
    e = explain_run(planted_run)
    ranking = e.factor_ranking()
    assert ranking[0]["factor"] == "decoder" and ranking[0]["level"] == "turbojpeg"
    exif = next(f for f in ranking if f["factor"] == "exif")
    assert exif["effect"] == 0 and exif["max_abs_max"] == 0
    assert e.eta_squared["decoder"] == max(e.eta_squared.values())
    assert e.eta_squared["exif"] < 0.01 * e.eta_squared["decoder"]


def test_the_nested_axis_is_analysed_within_its_backend(planted_run: Path):
    e = explain_run(planted_run)
    assert e.nested["openvino_hint"] == {"backend": ["openvino"]}
    assert e.eta_squared["openvino_hint"] < 0.01 * e.eta_squared["decoder"]
    assert all(c.level != "None" and "None" not in c.detail for c in e.contrasts)
    total = sum(e.eta_squared.values()) + sum(i["eta_squared"] for i in e.interactions)
    assert total <= e.explained + 1e-9 <= 1 + 1e-9


def test_the_gate_fails_exactly_the_cells_a_planted_effect_breaks(planted_run: Path):
    from dmx.matrix.cells import Cell  # noqa: F401  (the cells table is the truth here)
    import pyarrow.parquet as pq
    cells = pq.read_table(planted_run / "cells.parquet").to_pylist()
    planted = {c["cell_id"] for c in cells
               if c["status"] == "ok" and c["decoder"] in ("simplejpeg", "turbojpeg")}
    result = check_run(planted_run)
    assert set(result.failing_cells) == planted, render_check_text(result)
    rare = [f for f in result.failures if f.check == "max_rel_l2"
            and next(c for c in cells if c["cell_id"] == f.cell_id)["decoder"] == "simplejpeg"]
    assert rare and all(f.rows_bad == len(WIDE) for f in rare)
    noisy_errors = [f for f in result.failures if f.check == "errors"]
    assert noisy_errors and all(f.image_id == SHORT and f.rows_bad == 1 for f in noisy_errors)


@pytest.fixture(scope="module")
def interaction_run(planted_images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A decoder that hands out BGR and ``color: bgr``: each alone swaps the channels, together
    they cancel - the effect of one depends entirely on the other."""
    return planted_sweep(planted_images, tmp_path_factory.mktemp("xor") / "run",
                         {"decoder": ["pil", "simplejpeg"], "color": ["rgb", "bgr"]},
                         {"decoder": "pil", "color": "rgb"}, {"simplejpeg": _swap_channels})


def test_two_factors_that_cancel_are_a_pure_interaction(interaction_run: Path):
    e = explain_run(interaction_run)
    assert e.eta_squared["decoder"] < 1e-9 and e.eta_squared["color"] < 1e-9
    (top, *_) = e.interactions
    assert top["factors"] == ["decoder", "color"]
    assert top["eta_squared"] == pytest.approx(e.explained, rel=1e-6) and top["eta_squared"] > 0.3
    both = {(c.factor, c.level): c for c in e.contrasts}
    assert both[("decoder", "simplejpeg")].cos_dist_p50 == both[("color", "bgr")].cos_dist_p50 > 0
    result = check_run(interaction_run)
    import pyarrow.parquet as pq
    cancelled = next(c["cell_id"] for c in pq.read_table(interaction_run / "cells.parquet").to_pylist()
                     if c["decoder"] == "simplejpeg" and c["color"] == "bgr")
    assert cancelled not in result.failing_cells and len(result.failing_cells) == 2


def _chart_rows(html: str) -> list[dict[str, Any]]:
    import re
    m = re.search(r'<script type="application/json" id="chart-ranking-data">(.*?)</script>', html, re.S)
    assert m, "the ranking chart's numbers are not in the page"
    return json.loads(m.group(1).replace("<\\/", "</"))


def test_the_ranking_chart_draws_explains_numbers_and_never_hides_a_rare_large_effect(planted_run: Path):
    """Issue 12 item 4: the chart plotted the median under an axis saying mean, and drew a level
    with 5% top-1 flips and max abs 7.68 as '(identical outputs)'. Fails on 16e8c81."""
    from dmx.analysis.render import g
    from dmx.analysis.report import build_report
    e = explain_run(planted_run)
    html = build_report(planted_run)
    section = html[html.index('<section id="ranking">'):]
    section = section[:section.index("</section>")]
    assert "median" in section and "mean cosine distance" not in section
    chart = _chart_rows(html)
    ranking = e.to_json()["ranking"]
    assert [(r["factor"], r["level"], r["detail"]) for r in chart] == \
        [(r["factor"], r["level"], r["detail"]) for r in ranking]
    text = render_text(e)
    for c, r in zip(chart, ranking):
        assert c["median"] == r["effect"] and c["max"] == r["cosine_distance_max"]
        assert c["top1_flips"] == r["top1_disagreement"] and c["max_abs_max"] == r["max_abs_max"]
        if r["top1_disagreement"] or r["max_abs_max"]:
            assert not c["identical"] and "identical" not in c["annotation"]
        # the same numbers as explain's text, digit for digit
        assert f"max abs {g(r['max_abs_max'])}" in c["annotation"]
    by_contrast = {(r["factor"], r["level"], r["detail"]): r for r in chart}
    for i, f in enumerate(e.factor_ranking(), 1):      # explain's ranked lines, one per factor
        line = next(ln for ln in text.splitlines() if ln.startswith(f"  {i}. {f['factor']} "))
        c = by_contrast[(f["factor"], f["level"], f["detail"])]
        assert f"median {g(c['median']):>8}" in line and f"max abs {g(c['max_abs_max']):>8}" in line
    rare = next(c for c in chart if c["factor"] == "decoder" and c["level"] == "simplejpeg")
    assert rare["median"] == 0 and rare["max"] > 0 and rare["rare_but_large"]
    assert "(rare but large)" in rare["annotation"]
    exif = next(c for c in chart if c["factor"] == "exif")
    assert exif["identical"] and "(identical outputs)" in exif["annotation"]


# ------------------------------------------------------------------ the reuse guard

def batch_dependent():
    """A model factory (trusted code named by the spec): the tiny CNN plus 0.05 x the batch's mean
    input - an output that depends on the other images in the batch, as some fused kernels'
    do on their batch size."""
    import torch
    from dmx.runner.models.tiny import build

    class BatchDependent(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = build()

        def forward(self, x):
            return self.net(x) + 0.05 * x.mean()
    return BatchDependent().eval()


TINY_INPUT = {"size": 32, "resize": 32, "mode": "stretch", "mean": [0.5, 0.5, 0.5],
              "std": [0.5, 0.5, 0.5]}


def _sweep(images: Path, out: Path, model: Any, axes: dict, reference: dict, **opts: Any) -> Path:
    from dmx.matrix import parse_spec
    from dmx.runner.sweep import RunOptions, run_spec
    raw = {"name": "guard", "dataset": {"path": str(images)}, "model": model, "axes": axes,
           "reference": reference}
    run_spec(parse_spec(raw), RunOptions(out=str(out), executor="local", progress=False, **opts))
    return out


def test_the_reuse_guard_catches_an_output_that_depends_on_its_batch(planted_images: Path,
                                                                      tmp_path: Path):
    """Issue 12 item 5: the guard recomputed the same batch (run-to-run nondeterminism only); an
    output that depends on the batch went unseen and never reached the gate. Fails on 16e8c81."""
    import pyarrow.parquet as pq
    run = _sweep(planted_images, tmp_path / "run", {"torch": "test_truth:batch_dependent",
                                                     "input": TINY_INPUT},
                 {"decoder": ["pil", "opencv"]}, {"decoder": "pil"}, chunk_size=20, batch=8)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["counters"]["determinism_mismatches"] >= 1
    rows = pq.read_table(run / "rows").to_pylist()
    sampled = [r for r in rows if r["batch_max_abs"] is not None]
    assert sampled and max(r["batch_max_abs"] for r in sampled) > 1e-4
    assert manifest["counters"]["determinism_max_abs"] == max(r["batch_max_abs"] for r in sampled)
    result = check_run(run)
    assert "batch_dependence" in {f.check for f in result.failures}, render_check_text(result)
    assert result.reuse_guard["max_abs"] == max(r["batch_max_abs"] for r in sampled)
    assert "reuse guard:" in render_check_text(result)


def test_the_reuse_guard_passes_a_model_without_batch_dependence(planted_images: Path, tmp_path: Path):
    import pyarrow.parquet as pq
    run = _sweep(planted_images, tmp_path / "run", "tiny", {"decoder": ["pil", "opencv"]},
                 {"decoder": "pil"}, chunk_size=20, batch=8)
    rows = pq.read_table(run / "rows").to_pylist()
    assert any(r["batch_rel_l2"] is not None for r in rows)
    result = check_run(run)
    assert "batch_dependence" not in {f.check for f in result.failures}, render_check_text(result)


def test_the_guards_maximum_is_merged_across_workers_as_a_maximum(planted_images: Path,
                                                                  tmp_path: Path, monkeypatch):
    """Each Ray actor reports its own maximum; the run's must be the largest, not their sum
    (a sum of 0.1 and 0.1 claimed 0.2). One Worker per chunk stands for one actor per chunk.
    Fails on 16e8c81."""
    import dataclasses

    import dmx.runner.sweep as sweep
    from dmx.runner.executors import LocalExecutor
    from dmx.runner.worker import Worker
    seen: list[float] = []

    class OneWorkerPerChunk(LocalExecutor):
        def run(self, plan, chunks, on_result):
            plan = dataclasses.replace(plan, reuse_check_every=1)   # every chunk is checked
            for chunk in chunks:
                worker = Worker(plan)
                # a worker that writes its own part files reports a summary (run_chunk)
                res = (worker.run_chunk(chunk) if hasattr(worker, "run_chunk")
                       else worker.process_chunk(chunk))
                seen.append(res.counters.get("determinism_max_abs", 0.0))
                on_result(res)
    monkeypatch.setattr(sweep, "LocalExecutor", OneWorkerPerChunk)
    run = _sweep(planted_images, tmp_path / "run", {"torch": "test_truth:batch_dependent",
                                                     "input": TINY_INPUT},
                 {"decoder": ["pil"]}, {"decoder": "pil"}, chunk_size=5, batch=4)
    manifest = json.loads((run / "manifest.json").read_text())
    assert len([v for v in seen if v > 0]) >= 2
    assert manifest["counters"]["determinism_max_abs"] == max(seen)


def test_a_diff_of_runs_with_other_threads_does_not_call_rounding_a_move(planted_images: Path,
                                                                         tmp_path: Path):
    """Issue 12 item 5: rows did not record threads (local: all cores, Ray: 1), so ``dmx diff`` of
    a local and a Ray run reported cells as moved for the thread count alone. Fails on 16e8c81."""
    import shutil

    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from dmx.analysis.diff import diff_runs, render_diff_text
    a = _sweep(planted_images, tmp_path / "a", "tiny", {"resize": ["pil-bilinear", "cv2-linear"]},
               {"resize": "pil-bilinear"}, workers=2)
    rows_a = pq.read_table(a / "rows").to_pylist()
    assert {r["threads_used"] for r in rows_a if r["status"] == "ok"} == {2}
    b = Path(shutil.copytree(a, tmp_path / "b"))
    moved_cell = next(r["cell_id"] for r in rows_a if not r["is_reference"])
    for part in (b / "rows").glob("chunk=*/part-0.parquet"):   # as a 1-thread worker wrote them
        t = pq.read_table(part)
        mine = pc.equal(t["cell_id"], moved_cell)
        i = t.schema.get_field_index("out_max_abs")
        t = t.set_column(i, t.schema.field(i), pc.if_else(mine, pc.add(t["out_max_abs"], 1e-3),
                                                          t["out_max_abs"]))
        i = t.schema.get_field_index("threads_used")
        t = t.set_column(i, t.schema.field(i), pa.array([1] * len(t), pa.int32()))
        pq.write_table(t, part)
    d = diff_runs(a, b)
    assert d.moved == []
    assert [c.cell_id for c in d.threads_only] == [moved_cell]
    assert "ran with other threads (A 2 -> B 1)" in render_diff_text(d)
