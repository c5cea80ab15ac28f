"""Detection against ground truth: matches equal COCOeval's own, mAP from COCOeval, and a paired
bootstrap that finds a planted drop and none where nothing changed."""
from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmx.analysis.paired_map import (Boxes, _resampled_metrics, coco_eval, coco_metrics,
                                 image_matches, paired_map)


def random_gt(rng: np.random.Generator, n_images: int, n_boxes: int, n_cls: int,
              crowd_share: float = 0.0) -> Boxes:
    xy = rng.uniform(0, 300, (n_boxes, 2))
    wh = rng.uniform(8, 90, (n_boxes, 2))
    return Boxes(rng.integers(0, n_images, n_boxes), np.c_[xy, xy + wh],
                 rng.integers(0, n_cls, n_boxes), iscrowd=rng.random(n_boxes) < crowd_share)


def detector(rng: np.random.Generator, gt: Boxes, n_images: int, found: float, jitter: float,
             n_false: int) -> Boxes:
    """Detections: a jittered copy of a share of the ground truth plus scattered false boxes."""
    keep = rng.random(len(gt.image)) < found
    fx = rng.uniform(0, 300, (n_false, 2))
    boxes = np.r_[gt.xyxy[keep] + rng.normal(0, jitter, (keep.sum(), 4)),
                  np.c_[fx, fx + rng.uniform(8, 90, (n_false, 2))]]
    return Boxes(np.r_[gt.image[keep], rng.integers(0, n_images, n_false)], boxes,
                 np.r_[gt.cls[keep], rng.integers(0, gt.cls.max() + 1, n_false)],
                 rng.uniform(0.05, 1.0, len(boxes)))


def cocoeval_matches(gt: Boxes, dets: Boxes, n_images: int) -> tuple[np.ndarray, ...]:
    """tp, fp, fn per image read from COCOeval's evalImgs at IoU 0.5, area all, 100 dets."""
    ev = coco_eval(gt, dets, n_images)
    p = ev._paramsEval
    n_cat, n_area, n_img = len(p.catIds), len(p.areaRng), len(p.imgIds)
    tp, fp, fn = (np.zeros(n_images, np.int64) for _ in range(3))
    for k in range(n_cat):
        for i in range(n_img):
            e = ev.evalImgs[k * n_area * n_img + i]
            if e is None:
                continue
            hit, ign = e["dtMatches"][0] > 0, e["dtIgnore"][0].astype(bool)
            gt_counted = int((~np.asarray(e["gtIgnore"], bool)).sum())
            tp[i] += (hit & ~ign).sum()
            fp[i] += (~hit & ~ign).sum()
            fn[i] += gt_counted - (hit & ~ign).sum()
    return tp, fp, fn


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32 - 1), st.floats(0.0, 0.3))
def test_image_matches_equal_cocoevals_own_matches_at_iou_half(seed, crowd_share):
    rng = np.random.default_rng(seed)
    gt = random_gt(rng, 12, 60, 3, crowd_share)
    dets = detector(rng, gt, 12, found=0.8, jitter=6.0, n_false=20)
    m = image_matches(gt, dets, 12)
    tp, fp, fn = cocoeval_matches(gt, dets, 12)
    assert m.tp.tolist() == tp.tolist()
    assert m.fp.tolist() == fp.tolist()
    assert m.fn.tolist() == fn.tolist()


def test_perfect_detections_score_100_points_and_an_empty_set_zero():
    rng = np.random.default_rng(0)
    gt = random_gt(rng, 10, 40, 2)
    perfect = Boxes(gt.image, gt.xyxy, gt.cls, np.ones(len(gt.image)))
    assert coco_metrics(gt, perfect, 10).map == pytest.approx(100.0)
    none = Boxes(np.zeros(0, int), np.zeros((0, 4)), np.zeros(0, int), np.zeros(0))
    assert coco_metrics(gt, none, 10).map == pytest.approx(0.0)


def test_resampling_all_images_once_reproduces_cocoeval_summarize():
    rng = np.random.default_rng(1)
    gt = random_gt(rng, 30, 120, 3)
    dets = detector(rng, gt, 30, found=0.85, jitter=5.0, n_false=40)
    ev = coco_eval(gt, dets, 30)
    with contextlib.redirect_stdout(io.StringIO()):
        ev.accumulate()
        ev.summarize()
    got = _resampled_metrics(coco_eval(gt, dets, 30), np.arange(30))
    assert got == pytest.approx((100 * ev.stats[0], 100 * ev.stats[1]), abs=1e-9)


def test_planted_drop_in_recall_gives_a_negative_change_whose_interval_excludes_zero():
    rng = np.random.default_rng(2)
    n = 60
    gt = random_gt(rng, n, 240, 3)
    ref = Boxes(gt.image, gt.xyxy + rng.normal(0, 2, gt.xyxy.shape), gt.cls,
                rng.uniform(0.5, 1, len(gt.image)))
    lost = np.isin(ref.image, np.arange(0, 20))  # the cell misses every box on 20 known images
    cell = Boxes(ref.image[~lost], ref.xyxy[~lost], ref.cls[~lost], ref.score[~lost])
    r = paired_map(gt, cell, ref, n, resamples=100, seed=0)
    assert r.delta < 0 and r.ci_high < 0
    assert r.map_ref == pytest.approx(coco_metrics(gt, ref, n).map)
    assert r.ci_low <= r.delta <= r.ci_high


def test_identical_detections_have_a_zero_change_and_a_zero_width_interval():
    rng = np.random.default_rng(3)
    gt = random_gt(rng, 25, 80, 2)
    dets = detector(rng, gt, 25, found=0.7, jitter=5.0, n_false=20)
    r = paired_map(gt, dets, dets, 25, resamples=30)
    assert (r.delta, r.ci_low, r.ci_high, r.delta50) == (0.0, 0.0, 0.0, 0.0)
    assert r.resamples == 30
