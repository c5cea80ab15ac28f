"""Detectors: decoding raw heads, NMS, letterbox geometry, detection metrics on planted cases, and
a real detector (ddddocr's YOLOX text detector) run through every backend."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

from dmx.matrix import SpecError, parse_spec
from dmx.runner.detection import (Candidates, DetectionConfig, DetectionDecodeError, box_iou,
                              config_from, decode_candidates, detect, nms, to_image)
from dmx.runner.metrics import (candidate_rank_agreement, detection_divergence, kendall_tau_b,
                            match_detections)
from dmx.runner.models.base import Preprocess
from dmx.runner.preprocess import model_input, normalise

HAS_DDDDOCR = importlib.util.find_spec("ddddocr") is not None
needs_ddddocr = pytest.mark.skipif(not HAS_DDDDOCR, reason="ddddocr not installed (pip install 'dmx[detect]')")

REF_BOXES = np.array([[10, 10, 50, 50], [100, 40, 140, 100], [200, 200, 260, 230]], np.float64)
REF_SCORES = np.array([0.9, 0.8, 0.6])
REF_CLASSES = np.array([0, 1, 2])


# --- planted detection sets -------------------------------------------------------------------

def test_a_box_shifted_by_4px_of_40_has_iou_36_over_44():
    shifted = REF_BOXES + np.array([4, 0, 4, 0])
    iou = box_iou(REF_BOXES[:1], shifted[:1])[0, 0]
    assert iou == pytest.approx((36 * 40) / (40 * 40 * 2 - 36 * 40))


def test_perturbed_boxes_all_match_with_the_expected_mean_iou_and_score_delta():
    shift = np.array([[4, 0, 4, 0], [0, 6, 0, 6], [0, 0, 0, 0]], np.float64)
    boxes, scores = REF_BOXES + shift, REF_SCORES + np.array([-0.02, 0.03, 0.0])
    m = detection_divergence(boxes, scores, REF_CLASSES, REF_BOXES, REF_SCORES, REF_CLASSES)
    ious = [36 * 40 / (2 * 1600 - 36 * 40), 40 * 54 / (2 * 2400 - 40 * 54), 1.0]
    assert (m["det_n_ref"], m["det_n"], m["det_matched"], m["det_missed"], m["det_extra"]) == (3, 3, 3, 0, 0)
    assert m["det_mean_iou"] == pytest.approx(np.mean(ious))
    assert m["det_score_delta_max"] == pytest.approx(0.03)
    assert m["det_class_flips"] == 0
    assert m["det_same"] is False  # IoU 0.82 and 0.82 are below the 0.9 "same" tolerance


def test_a_one_pixel_jitter_and_small_score_change_is_the_same_detection_set():
    boxes = REF_BOXES + np.array([1, 0, 1, 0])
    m = detection_divergence(boxes, REF_SCORES + 0.01, REF_CLASSES, REF_BOXES, REF_SCORES, REF_CLASSES)
    assert m["det_same"] is True and m["det_matched"] == 3


def test_a_dropped_box_is_missed_and_a_new_one_is_extra():
    boxes = np.vstack([REF_BOXES[:2], [[400, 400, 420, 420]]])
    m = detection_divergence(boxes, REF_SCORES, REF_CLASSES, REF_BOXES, REF_SCORES, REF_CLASSES)
    assert (m["det_matched"], m["det_missed"], m["det_extra"]) == (2, 1, 1)
    assert m["det_mean_iou"] == 1.0 and m["det_same"] is False


def test_a_box_moved_past_iou_half_no_longer_matches():
    boxes = REF_BOXES.copy()
    boxes[0] += np.array([20, 0, 20, 0])  # IoU 20*40 / (2*1600 - 800) = 1/3
    m = detection_divergence(boxes, REF_SCORES, REF_CLASSES, REF_BOXES, REF_SCORES, REF_CLASSES)
    assert (m["det_matched"], m["det_missed"], m["det_extra"]) == (2, 1, 1)


def test_a_matched_box_with_another_class_is_a_class_flip():
    classes = np.array([0, 5, 2])
    m = detection_divergence(REF_BOXES, REF_SCORES, classes, REF_BOXES, REF_SCORES, REF_CLASSES)
    assert m["det_class_flips"] == 1 and m["det_matched"] == 3 and m["det_same"] is False


def test_two_empty_detection_sets_are_the_same():
    empty = np.zeros((0, 4))
    m = detection_divergence(empty, np.zeros(0), np.zeros(0, int), empty, np.zeros(0), np.zeros(0, int))
    assert m["det_same"] is True and m["det_mean_iou"] is None and m["det_matched"] == 0


def test_pixel_inclusive_iou_is_the_legacy_nms_convention():
    a, b = np.array([[0, 0, 9, 9]], float), np.array([[5, 0, 14, 9]], float)
    assert box_iou(a, b)[0, 0] == pytest.approx(36 / 126)
    assert box_iou(a, b, plus_one=True)[0, 0] == pytest.approx(50 / 150)


def test_greedy_matching_gives_the_best_reference_box_its_best_partner_first():
    ref = np.array([[0, 0, 10, 10], [2, 0, 12, 10]], np.float64)
    cell = np.array([[1, 0, 11, 10]], np.float64)  # IoU 0.818 with both reference boxes
    assert [(r, j) for r, j, _ in match_detections(cell, ref)] == [(0, 0)]


# --- candidate ranking ------------------------------------------------------------------------

def test_swapping_the_two_best_candidates_gives_tau_0_8_and_full_top2_overlap():
    ref = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
    cell = np.array([4.0, 5.0, 3.0, 2.0, 1.0])
    r = candidate_rank_agreement(cell, ref, k=5)
    assert r["det_rank_tau"] == pytest.approx(0.8)  # 1 discordant pair of 10
    assert candidate_rank_agreement(cell, ref, k=2)["det_topk_overlap"] == 1.0


def test_a_candidate_leaving_the_top_k_halves_the_top2_overlap():
    ref = np.array([0.9, 0.8, 0.1, 0.05])
    cell = np.array([0.9, 0.05, 0.7, 0.1])
    assert candidate_rank_agreement(cell, ref, k=2)["det_topk_overlap"] == 0.5


def test_identical_scores_rank_identically():
    s = np.random.default_rng(0).random(3549)
    r = candidate_rank_agreement(s, s.copy(), k=100)
    assert r == {"det_rank_tau": 1.0, "det_topk_overlap": 1.0}


def test_kendall_tau_b_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(3)
    x, y = rng.integers(0, 6, 60).astype(float), rng.integers(0, 6, 60).astype(float)
    assert kendall_tau_b(x, y) == pytest.approx(stats.kendalltau(x, y).statistic)


# --- decoding and NMS -------------------------------------------------------------------------

def _yolox_head(boxes: list[tuple[float, float, float, float]], scores: list[float],
                size: int = 64, strides: tuple[int, ...] = (8, 16, 32)) -> np.ndarray:
    """A raw YOLOX head (1 class) whose stride-8 anchors 0.. carry ``boxes`` (cx, cy, w, h px)."""
    n = sum((size // s) ** 2 for s in strides)
    head = np.zeros((n, 6), np.float32)
    head[:, 2:4] = 0.0
    w8 = size // 8
    for i, ((cx, cy, w, h), sc) in enumerate(zip(boxes, scores)):
        gx, gy = i % w8, i // w8
        head[i] = [cx / 8 - gx, cy / 8 - gy, math.log(w / 8), math.log(h / 8), sc, 1.0]
    return head


def test_yolox_raw_head_decodes_to_the_planted_boxes():
    head = _yolox_head([(20, 20, 16, 8), (40, 30, 10, 10)], [0.9, 0.6])
    cfg = DetectionConfig(layout="yolox", score_threshold=0.1, nms_iou=0.45)
    c, d = detect([head], (64, 64), cfg)
    assert len(c.scores) == 64 + 16 + 4
    np.testing.assert_allclose(d.boxes, [[12, 16, 28, 24], [35, 25, 45, 35]], atol=1e-4)
    np.testing.assert_allclose(d.scores, [0.9, 0.6], atol=1e-6)


def test_nms_drops_the_weaker_overlapping_box_and_keeps_a_distant_one():
    c = Candidates(np.array([[0, 0, 10, 10], [1, 0, 11, 10], [50, 50, 60, 60]], float),
                   np.array([0.8, 0.9, 0.5]), np.zeros(3, np.int64))
    d = nms(c, DetectionConfig(score_threshold=0.1, nms_iou=0.45))
    np.testing.assert_array_equal(d.scores, [0.9, 0.5])


def test_per_class_nms_keeps_overlapping_boxes_of_different_classes():
    c = Candidates(np.array([[0, 0, 10, 10], [1, 0, 11, 10]], float), np.array([0.8, 0.9]),
                   np.array([0, 1]))
    assert len(nms(c, DetectionConfig(score_threshold=0.1)).scores) == 2
    assert len(nms(c, DetectionConfig(score_threshold=0.1, class_agnostic=True)).scores) == 1


def test_scores_at_or_below_the_threshold_are_dropped_before_nms():
    c = Candidates(np.array([[0, 0, 10, 10], [50, 50, 60, 60]], float), np.array([0.25, 0.26]),
                   np.zeros(2, np.int64))
    assert nms(c, DetectionConfig(score_threshold=0.25)).scores.tolist() == [0.26]


# Where dmx's NMS and cv2.dnn.NMSBoxesBatched part (the reason dmx keeps its own):

def test_two_zero_area_boxes_far_apart_do_not_suppress_each_other():
    c = Candidates(np.array([[10, 10, 10, 50], [200, 200, 260, 200]], float), np.array([0.9, 0.8]),
                   np.zeros(2, np.int64))
    assert nms(c, DetectionConfig(score_threshold=0.1)).scores.tolist() == [0.9, 0.8]


def test_a_box_with_negative_coordinates_is_not_suppressed_by_another_class():
    c = Candidates(np.array([[400, 400, 460, 460], [-60, -60, 0, 0]], float), np.array([0.9, 0.8]),
                   np.array([0, 1]))
    assert nms(c, DetectionConfig(score_threshold=0.1)).scores.tolist() == [0.9, 0.8]


def test_scores_that_differ_below_float32_precision_keep_their_order():
    lo, hi = 0.6763463459355165, 0.6763463868814563  # one float32, two float64
    c = Candidates(np.array([[0, 0, 10, 10], [50, 50, 60, 60]], float), np.array([lo, hi]),
                   np.zeros(2, np.int64))
    assert nms(c, DetectionConfig(score_threshold=0.1)).scores.tolist() == [hi, lo]


def test_every_layout_decodes_the_same_boxes():
    xyxy = np.array([[12, 16, 28, 24], [35, 25, 45, 35]], np.float64)
    cxcywh = np.c_[(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]]
    probs = np.array([[0.1, 0.9], [0.7, 0.2]])
    obj = np.ones((2, 1))
    heads = {
        "yolov5": [np.c_[cxcywh, obj, probs]],
        "yolo": [np.c_[cxcywh, probs]],
        "yolo-transposed": [np.c_[cxcywh, probs].T],
        "boxes-scores": [probs, xyxy],  # DAMO-YOLO order: scores first
    }
    for layout, outs in heads.items():
        c = decode_candidates(outs, (64, 64), DetectionConfig(layout=layout))
        np.testing.assert_allclose(c.boxes, xyxy, err_msg=layout)
        assert c.classes.tolist() == [1, 0] and c.scores.tolist() == pytest.approx([0.9, 0.7])


def user_decoder(outputs, input_hw):
    """A user decoder for the test below: boxes in the first output, score in the second."""
    return outputs[0], outputs[1][:, 0], np.zeros(len(outputs[0]), int)


def test_a_user_decoder_callable_feeds_dmx_nms():
    cfg = config_from({"decoder": "test_detection:user_decoder", "score_threshold": 0.3})
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10]], float)
    _, d = detect([boxes, np.array([[0.9], [0.8]])], (32, 32), cfg)
    assert d.scores.tolist() == [0.9]


def test_a_head_that_does_not_fit_the_layout_is_a_decode_error():
    with pytest.raises(DetectionDecodeError, match="strides"):
        decode_candidates([np.zeros((10, 6))], (416, 416), DetectionConfig(layout="yolox"))


# --- letterbox geometry -----------------------------------------------------------------------

LB = Preprocess(mode="letterbox", resize=416, crop=416, mean=(0, 0, 0), std=(1, 1, 1), pad=114, scale=1)


@pytest.mark.parametrize("fit", ["letterbox", "letterbox-center", "stretch", "resize-crop"])
def test_boxes_map_back_to_the_decoded_image_for_every_fit(fit: str):
    img = np.random.default_rng(0).integers(0, 255, (200, 320, 3), np.uint8)
    p = Preprocess(mode="letterbox", resize=416, crop=416, mean=(0, 0, 0), std=(1, 1, 1))
    pixels, pl = model_input(img, "cv2-linear", p, fit)
    assert pixels.shape == (416, 416, 3)
    box = np.array([[40.0, 30.0, 120.0, 90.0]])
    in_input = box * np.array([pl.scale_x, pl.scale_y] * 2) + np.array([pl.offset_x, pl.offset_y] * 2)
    from dmx.runner.detection import Detections
    back = to_image(Detections(in_input, np.ones(1), np.zeros(1, int)),
                    (pl.scale_x, pl.scale_y), (pl.offset_x, pl.offset_y), pl.image_hw)
    np.testing.assert_allclose(back.boxes, box)


def test_letterbox_keeps_the_aspect_and_pads_right_and_bottom_with_the_pad_value():
    img = np.full((100, 200, 3), 7, np.uint8)
    pixels, pl = model_input(img, "cv2-linear", LB)
    assert (pl.scale_x, pl.scale_y, pl.offset_x, pl.offset_y) == (416 / 200, 208 / 100, 0.0, 0.0)
    assert np.all(pixels[:208] == 7) and np.all(pixels[208:] == 114)


def test_letterbox_center_pads_both_sides():
    img = np.full((100, 200, 3), 7, np.uint8)
    pixels, pl = model_input(img, "cv2-linear", LB, "letterbox-center")
    assert pl.offset_y == 104 and np.all(pixels[:104] == 114) and np.all(pixels[104:312] == 7)


def test_raw_bgr_models_get_unscaled_pixels_in_bgr_order():
    p = Preprocess(mode="stretch", resize=4, crop=4, mean=(0, 0, 0), std=(1, 1, 1), scale=1, channels="bgr")
    x = normalise(np.tile(np.array([10, 20, 30], np.float32), (4, 4, 1)), p)
    assert x[:, 0, 0].tolist() == [30.0, 20.0, 10.0]


# --- spec -------------------------------------------------------------------------------------

def _spec(model: dict, axes: dict | None = None):
    return parse_spec({"dataset": "x", "model": model, "axes": axes or {"backend": ["onnxruntime"]}},
                      base_dir=str(Path(__file__).parent))


def test_a_user_detector_must_declare_its_output_layout():
    with pytest.raises(SpecError, match="layout"):
        _spec({"torch": "pkg.mod:f", "task": "detection", "input": {"size": 416}})


def test_an_unknown_layout_names_the_allowed_ones():
    with pytest.raises(SpecError, match="yolo-transposed"):
        _spec({"torch": "pkg.mod:f", "task": "detection", "input": {"size": 416},
               "detection": {"layout": "damo"}})


def test_a_damo_yolo_style_spec_parses_with_letterbox_and_fit_levels():
    s = _spec({"torch": "pkg.mod:f", "task": "detection",
               "input": {"size": 416, "mode": "letterbox", "pad": 114, "scale": 1, "channels": "bgr",
                         "mean": [0, 0, 0], "std": [1, 1, 1]},
               "detection": {"layout": "boxes-scores", "score_threshold": 0.3}},
              {"fit": ["letterbox", "stretch"], "backend": ["torch"]})
    assert s.model.task == "detection" and s.levels("fit") == ("letterbox", "stretch")


# --- the built-in detector --------------------------------------------------------------------

@pytest.fixture(scope="module")
def text_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real text-bearing images shipped with scikit-image, as JPEGs."""
    import skimage.data
    from PIL import Image
    d = tmp_path_factory.mktemp("text-images")
    Image.fromarray(skimage.data.page()).save(d / "page.jpg", quality=90)
    Image.fromarray(skimage.data.text()).save(d / "text.jpg", quality=90)
    return d


@needs_ddddocr
def test_the_torch_interpreter_matches_onnxruntime_on_the_builtin_detector():
    import onnxruntime as ort
    import torch
    from dmx.runner.models import get_model
    mdef = get_model("ddddocr_det")
    x = np.random.default_rng(0).uniform(0, 255, (1, 3, 416, 416)).astype(np.float32)
    ref = ort.InferenceSession(mdef.onnx_path, providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
    with torch.inference_mode():
        y = mdef.build()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(y, ref, atol=1e-4)


@needs_ddddocr
def test_dmx_decoding_reproduces_ddddocrs_own_boxes(text_images: Path):
    import ddddocr
    import onnxruntime as ort
    from dmx.runner.decoders import decode_options, get_decoder
    from dmx.runner.models import get_model
    mdef = get_model("ddddocr_det")
    engine = ddddocr.DdddOcr(det=True, ocr=False, show_ad=False)
    session = ort.InferenceSession(mdef.onnx_path, providers=["CPUExecutionProvider"])
    found = 0
    for name in ("page.jpg", "text.jpg"):
        data = (text_images / name).read_bytes()
        img = get_decoder("opencv").decode(data, decode_options({}))
        pixels, pl = model_input(img, "cv2-linear", mdef.preprocess)
        raw = session.run(None, {"images": normalise(pixels, mdef.preprocess)[None]})[0][0]
        _, d = detect([raw], (416, 416), mdef.detection)
        r = min(416 / img.shape[0], 416 / img.shape[1])  # ddddocr maps back with one ratio
        mine = to_image(d, (r, r), (0, 0), pl.image_hw).boxes.astype(int).tolist()
        assert mine == engine.detection(data), name
        found += len(mine)
    assert found > 40


@needs_ddddocr
def test_every_backend_feeds_the_same_decode_and_nms(text_images: Path, tmp_path: Path):
    """A real run: torch (ONNX interpreter), ONNX Runtime and OpenVINO f32 on the same inputs give
    the reference's detections through one shared decode/NMS, and every row has det_* metrics."""
    import duckdb
    from dmx.runner.sweep import RunOptions, run_spec
    spec = parse_spec({"name": "det", "dataset": str(text_images), "model": "ddddocr_det",
                       "axes": {"resize": ["cv2-linear", "pil-bilinear"], "fit": ["letterbox", "stretch"],
                                "backend": ["torch", "onnxruntime", "openvino"], "openvino_hint": ["f32"]},
                       "reference": {"resize": "cv2-linear", "fit": "letterbox", "backend": "torch"}})
    out = tmp_path / "run"
    run_spec(spec, RunOptions(out=str(out), executor="local", progress=False))
    con = duckdb.connect()
    rows = f"read_parquet('{out}/rows/*/*.parquet')"
    assert con.execute(f"SELECT count(*) FROM {rows} WHERE status <> 'ok'").fetchone()[0] == 0
    same_input = con.execute(
        f"SELECT backend, image_id, det_n, det_n_ref, det_same, det_topk_overlap FROM {rows} "
        "WHERE resize = 'cv2-linear' AND fit = 'letterbox' ORDER BY ALL").fetchall()
    assert len(same_input) == 6
    for backend, image, n, n_ref, same, overlap in same_input:
        assert same and n == n_ref and overlap > 0.9, (backend, image)
    stretched = con.execute(f"SELECT min(det_rank_tau), bool_and(det_same) FROM {rows} "
                            "WHERE fit = 'stretch' AND image_id = 'page.jpg'").fetchone()
    assert stretched[0] < 0.9 and stretched[1] is False  # another fit: other anchors, other boxes


@needs_ddddocr
def test_a_fixed_batch_torch_detector_gives_error_rows_at_batch_8_and_runs_at_batch_1(text_images: Path,
                                                                                      tmp_path: Path):
    """A user torch factory whose graph reshapes to batch 1 (ddddocr's, as a user would point at
    it): the batch of 8 is an inference error with the fix named, batch 1 runs."""
    import duckdb
    from dmx.runner.sweep import RunOptions, run_spec
    spec = parse_spec({"name": "fixed-batch", "dataset": str(text_images),
                       "model": {"torch": "dmx.runner.models.ddddocr_det:build", "task": "detection",
                                 "input": {"size": 416, "mode": "letterbox", "scale": 1, "channels": "bgr",
                                           "mean": [0, 0, 0], "std": [1, 1, 1]},
                                 "detection": {"layout": "yolox", "score_threshold": 0.1,
                                               "class_agnostic": True}},
                       "axes": {"backend": ["torch"], "batch": [1, 8]}})
    out = tmp_path / "run"
    run_spec(spec, RunOptions(out=str(out), executor="local", progress=False))
    rows = duckdb.connect().execute(
        f"SELECT batch, status, any_value(error), sum(det_n) FROM read_parquet('{out}/rows/*/*.parquet') "
        "GROUP BY ALL ORDER BY batch").fetchall()
    assert rows[0][:2] == ("1", "ok") and rows[0][3] > 40
    assert rows[1][:2] == ("8", "error") and "batch=1" in rows[1][2]
