"""dmx explain on a detector run: it names the factors that reorder the raw candidates and those
that change the final boxes, with numbers (needs ddddocr's detector: pip install 'dmx[detect]')."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from dmx.analysis.explain import explain_run
from dmx.analysis.render import render_markdown, render_text
from dmx.matrix import parse_spec
from dmx.runner.sweep import RunOptions, run_spec

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ddddocr") is None,
                                reason="ddddocr not installed (pip install 'dmx[detect]')")


@pytest.fixture(scope="module")
def det_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import skimage.data
    from PIL import Image
    d = tmp_path_factory.mktemp("text-images")
    Image.fromarray(skimage.data.page()).save(d / "page.jpg", quality=90)
    Image.fromarray(skimage.data.text()).save(d / "text.jpg", quality=90)
    spec = parse_spec({"name": "det-explain", "dataset": str(d), "model": "ddddocr_det",
                       "axes": {"resize": ["cv2-linear", "pil-bilinear"], "fit": ["letterbox", "stretch"],
                                "backend": ["onnxruntime", "openvino"], "openvino_hint": ["f32", "default"]},
                       "reference": {"resize": "cv2-linear", "fit": "letterbox", "backend": "onnxruntime"}})
    out = tmp_path_factory.mktemp("det-run") / "run"
    run_spec(spec, RunOptions(out=str(out), executor="local", progress=False))
    return out


def test_explain_ranks_detector_contrasts_by_candidate_order_and_by_final_boxes(det_run: Path):
    e = explain_run(det_run)
    assert e.task == "detection"
    taus = [c.detection.tau_mean for c in e.candidate_ranking()]
    assert taus == sorted(taus) and e.candidate_ranking()[0].factor == "fit"
    assert e.box_ranking()[0].factor == "fit" and e.box_ranking()[0].detection.changed_frac > 0
    for c in e.order_only():
        assert c.detection.reordered_frac > 0 and c.detection.changed_frac == 0


def test_the_openvino_f32_cell_keeps_the_candidate_order_and_the_boxes(det_run: Path):
    f32 = next(c for c in explain_run(det_run).contrasts
               if c.factor == "backend" and c.detail == "openvino_hint=f32")
    assert f32.detection.changed_frac == 0 and f32.detection.topk_mean > 0.95


def test_explain_text_and_markdown_name_both_questions_with_numbers(det_run: Path):
    e = explain_run(det_run)
    text = render_text(e)
    assert "Change the candidate ranking: fit=stretch (tau" in text
    assert "Change the final boxes:       fit=stretch (" in text
    assert "boxes changed on" in render_markdown(e)


def test_every_row_keeps_its_boxes_in_decoded_image_pixels(det_run: Path):
    """det_boxes is what mAP is computed from: one box per kept detection (det_n of them), inside
    the decoded image, best first; the reference's own boxes count det_n_ref."""
    import duckdb
    con = duckdb.connect()
    rows = con.sql(f"""SELECT det_n, det_n_ref, is_reference, len(det_boxes) AS k, decoded_w, decoded_h,
                              list_transform(det_boxes, lambda b: b.score) AS s,
                              list_bool_and(list_transform(det_boxes, lambda b: b.x1 >= -0.5 AND b.y1 >= -0.5
                                  AND b.x2 <= decoded_w + 0.5 AND b.y2 <= decoded_h + 0.5
                                  AND b.x2 >= b.x1 AND b.y2 >= b.y1)) AS inside
                       FROM read_parquet('{det_run}/rows/**/*.parquet')
                       WHERE status = 'ok'""").fetchall()
    assert rows and any(k > 0 for _, _, _, k, *_ in rows)
    for n, n_ref, is_ref, k, w, h, scores, inside in rows:
        assert k == n and (not is_ref or n == n_ref)
        assert scores == sorted(scores, reverse=True) and inside in (True, None)
