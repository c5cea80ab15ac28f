"""Detection against ground truth: per-image matches at IoU 0.5, COCO mAP per cell, and a paired
bootstrap over images for a cell's mAP change against the reference.

Boxes are ``x1 y1 x2 y2`` in image pixels (continuous, COCO's convention). mAP values and their
changes are in **points** (COCO's 0-1 AP x 100: 0.374 -> 37.4). The COCO metrics come from
pycocotools' ``COCOeval`` (never re-implemented here); ``image_matches`` follows its matching
rules (per class, detections by descending score, each taking the best-IoU unmatched box;
crowd boxes absorb detections without counting) and the tests hold it equal to COCOeval's own
per-image matches.

Cost of ``paired_map``: one ``COCOeval.evaluate`` per side (the per-image matching, done once),
then per resample one ``COCOeval.accumulate`` per side restricted to area "all" and 100
detections (1/12 of the default's work), linear in images x classes. Measured here (2026-12-02,
2 shared cores, 80 classes, 7 boxes and ~19 detections per image): 1,000 images: evaluate
6.4 s per side, one resample 0.15 s per side. So COCO val2017 (5,000 images)
costs ~30 s per side plus ~1.5 s per resample: 200 resamples ~5 min. ``resamples`` is a parameter
(default 200); its interval's resolution is about 1/resamples in probability.
"""
from __future__ import annotations

import contextlib
import copy
import io
from dataclasses import dataclass

import numpy as np

__all__ = ["Boxes", "CocoMetrics", "ImageMatches", "PairedMap", "box_iou", "coco_eval",
           "coco_metrics", "image_matches", "paired_from_evals", "paired_map"]

_ALL_AREA = [0 ** 2, 1e5 ** 2]  # COCOeval's "all" area range


@dataclass(frozen=True)
class Boxes:
    """A set of boxes over a dataset: ``image`` (n,) image index 0..n_images-1, ``xyxy`` (n, 4) px,
    ``cls`` (n,) class index, ``score`` (n,) for detections (None for ground truth), ``iscrowd``
    (n,) bool and ``area`` (n,) px^2 for ground truth (None: not crowd, area from the box)."""

    image: np.ndarray
    xyxy: np.ndarray
    cls: np.ndarray
    score: np.ndarray | None = None
    iscrowd: np.ndarray | None = None
    area: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.image)
        for name in ("xyxy", "cls", "score", "iscrowd", "area"):
            v = getattr(self, name)
            if v is not None and len(v) != n:
                raise ValueError(f"Boxes.{name} has {len(v)} entries for {n} boxes")


def box_iou(a: np.ndarray, b: np.ndarray, crowd: np.ndarray | None = None) -> np.ndarray:
    """(len(a), len(b)) IoU of xyxy boxes; where ``crowd[j]``, intersection over a's area (COCO)."""
    a, b = np.asarray(a, float).reshape(-1, 4), np.asarray(b, float).reshape(-1, 4)
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    area_a = ((a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]))[:, None]
    area_b = ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))[None, :]
    union = area_a + area_b - inter
    if crowd is not None:
        union = np.where(np.asarray(crowd, bool)[None, :], area_a, union)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)


@dataclass(frozen=True)
class ImageMatches:
    """Per image: true positives, false positives, missed ground-truth boxes (crowd excluded)."""

    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray


def image_matches(gt: Boxes, dets: Boxes, n_images: int, iou: float = 0.5,
                  max_dets: int = 100) -> ImageMatches:
    """Match detections to ground truth per image and class, COCO's way, at IoU >= ``iou``.

    Per image and class only the ``max_dets`` best-scored detections count (COCO's maxDets);
    an unmatched detection with a negative area (x2 < x1 xor y2 < y1) is ignored, as COCOeval's
    area range ignores it.
    """
    tp, fp, fn = (np.zeros(n_images, np.int64) for _ in range(3))
    crowd_all = gt.iscrowd if gt.iscrowd is not None else np.zeros(len(gt.image), bool)
    np.add.at(fn, gt.image[~crowd_all], 1)
    if dets.score is None:
        raise ValueError("detections need scores")
    gkey = gt.image.astype(np.int64) * (1 << 20) + gt.cls
    dkey = dets.image.astype(np.int64) * (1 << 20) + dets.cls
    for key in np.unique(dkey):
        d = np.flatnonzero(dkey == key)
        d = d[np.argsort(-dets.score[d], kind="mergesort")][:max_dets]
        g = np.flatnonzero(gkey == key)
        g = g[np.argsort(crowd_all[g], kind="mergesort")]  # non-crowd first, as COCOeval
        img = int(key >> 20)
        wh = dets.xyxy[d, 2:] - dets.xyxy[d, :2]
        areas = wh[:, 0] * wh[:, 1]
        if len(g) == 0:
            fp[img] += int(((areas >= 0) & (areas <= _ALL_AREA[1])).sum())
            continue
        crowd = crowd_all[g]
        ious = box_iou(dets.xyxy[d], gt.xyxy[g], crowd)
        taken = np.zeros(len(g), bool)
        for i in range(len(d)):
            best, m = min(iou, 1 - 1e-10), -1
            for j in range(len(g)):
                if taken[j] and not crowd[j]:
                    continue
                if m > -1 and not crowd[m] and crowd[j]:
                    break
                if ious[i, j] < best:
                    continue
                best, m = ious[i, j], j
            if m == -1:
                fp[img] += int(0 <= areas[i] <= _ALL_AREA[1])  # COCO ignores boxes outside the range
            elif not crowd[m]:
                taken[m] = True
                tp[img] += 1
                fn[img] -= 1
    return ImageMatches(tp, fp, fn)


@dataclass(frozen=True)
class CocoMetrics:
    """COCO box AP in points: ``map`` = AP@[.5:.95], ``map50`` = AP@.5 (NaN: no ground truth)."""

    map: float
    map50: float


def _coco_objects(gt: Boxes, dets: Boxes, n_images: int):
    from pycocotools.coco import COCO

    crowd = gt.iscrowd if gt.iscrowd is not None else np.zeros(len(gt.image), bool)
    xywh = np.c_[gt.xyxy[:, :2], gt.xyxy[:, 2:] - gt.xyxy[:, :2]] if len(gt.image) else np.zeros((0, 4))
    area = gt.area if gt.area is not None else xywh[:, 2] * xywh[:, 3]
    cats = sorted(set(np.asarray(gt.cls).tolist()) | set(np.asarray(dets.cls).tolist()))
    ds = {"images": [{"id": i} for i in range(n_images)],
          "categories": [{"id": int(c)} for c in cats],
          "annotations": [{"id": k + 1, "image_id": int(gt.image[k]), "category_id": int(gt.cls[k]),
                           "bbox": xywh[k].tolist(), "area": float(area[k]),
                           "iscrowd": int(crowd[k])} for k in range(len(gt.image))]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = ds
        coco_gt.createIndex()
        dxywh = np.c_[dets.xyxy[:, :2], dets.xyxy[:, 2:] - dets.xyxy[:, :2]]
        res = np.c_[dets.image, dxywh, dets.score, dets.cls].astype(np.float64)
        coco_dt = coco_gt.loadRes(res) if len(res) else COCO()
        if not len(res):
            coco_dt.dataset = {"images": ds["images"], "categories": ds["categories"],
                               "annotations": []}
            coco_dt.createIndex()
    return coco_gt, coco_dt


def coco_eval(gt: Boxes, dets: Boxes, n_images: int):
    """A pycocotools ``COCOeval`` (bbox) over ``n_images`` images, evaluated (per-image matching
    done, not yet accumulated). Its printing is silenced."""
    from pycocotools.cocoeval import COCOeval

    coco_gt, coco_dt = _coco_objects(gt, dets, n_images)
    ev = COCOeval(coco_gt, coco_dt, "bbox")
    ev.params.imgIds = list(range(n_images))
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
    return ev


def coco_metrics(gt: Boxes, dets: Boxes, n_images: int) -> CocoMetrics:
    """COCO mAP@[.5:.95] and mAP@.5 (points) of ``dets`` against ``gt``, by COCOeval.summarize."""
    return _summary(coco_eval(gt, dets, n_images))


def _summary(ev) -> CocoMetrics:
    """AP@[.5:.95] and AP@.5 (points) of an evaluated COCOeval, by its accumulate + summarize
    (its per-image results stay as they were, for resampling)."""
    with contextlib.redirect_stdout(io.StringIO()):
        ev.accumulate()
        ev.summarize()
    return CocoMetrics(*(100.0 * s if s >= 0 else float("nan") for s in ev.stats[:2]))


def _resampled_metrics(ev, sample: np.ndarray) -> tuple[float, float]:
    """COCOeval.accumulate over the images ``sample`` (with repeats: each draw is a new image),
    area "all", 100 detections; AP@[.5:.95] and AP@.5 read from its precision as summarize does."""
    p0 = ev._paramsEval
    n_cat, n_area, n_img = len(p0.catIds), len(p0.areaRng), len(p0.imgIds)
    a_all = [list(a) for a in p0.areaRng].index(_ALL_AREA)
    ev2 = copy.copy(ev)
    ev2.evalImgs = [ev.evalImgs[k * n_area * n_img + a_all * n_img + int(i)]
                    for k in range(n_cat) for i in sample]
    p = copy.copy(p0)
    p.imgIds, p.areaRng, p.areaRngLbl, p.maxDets = list(range(len(sample))), [_ALL_AREA], ["all"], [p0.maxDets[-1]]
    ev2.params, ev2._paramsEval = p, copy.copy(p)
    with contextlib.redirect_stdout(io.StringIO()):
        ev2.accumulate()
    prec = ev2.eval["precision"][:, :, :, 0, 0]  # T x R x K
    t50 = int(np.flatnonzero(np.isclose(p.iouThrs, 0.5))[0])

    def mean(x: np.ndarray) -> float:
        x = x[x > -1]
        return 100.0 * float(x.mean()) if x.size else float("nan")

    return mean(prec), mean(prec[t50])


@dataclass(frozen=True)
class PairedMap:
    """A cell's COCO mAP against the reference's on the same images, in points, with paired
    bootstrap intervals (``level``) of the change over ``resamples`` image resamples."""

    n: int
    map_cell: float
    map_ref: float
    delta: float
    ci_low: float
    ci_high: float
    map50_cell: float
    map50_ref: float
    delta50: float
    ci50_low: float
    ci50_high: float
    resamples: int
    level: float


def paired_map(gt: Boxes, cell: Boxes, ref: Boxes, n_images: int, *, resamples: int = 200,
               seed: int = 0, level: float = 0.95) -> PairedMap:
    """mAP (and mAP@.5) of ``cell`` and ``ref`` against ``gt``, their change and its paired
    bootstrap interval: each resample draws ``n_images`` images with replacement, the same draw
    for both sides. See the module note for the cost."""
    return paired_from_evals(coco_eval(gt, cell, n_images), coco_eval(gt, ref, n_images),
                             n_images, resamples=resamples, seed=seed, level=level)


def paired_from_evals(ev_c, ev_r, n_images: int, *, resamples: int = 200, seed: int = 0,
                      level: float = 0.95) -> PairedMap:
    """``paired_map`` from two evaluated ``COCOeval`` (``coco_eval``) over the same ``n_images``
    images and ground truth: a reference evaluated once serves every cell compared with it.
    Neither evaluation is changed (resamples work on copies)."""
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    mc, mr = _summary(copy.copy(ev_c)), _summary(copy.copy(ev_r))
    rng = np.random.default_rng(seed)
    deltas = np.empty((resamples, 2))
    for b in range(resamples):
        sample = rng.integers(0, n_images, n_images)
        c, r = _resampled_metrics(ev_c, sample), _resampled_metrics(ev_r, sample)
        deltas[b] = (c[0] - r[0], c[1] - r[1])
    q = [(1 - level) / 2, (1 + level) / 2]
    (lo, lo50), (hi, hi50) = np.nanquantile(deltas, q, axis=0)
    return PairedMap(n_images, mc.map, mr.map, mc.map - mr.map, float(lo), float(hi),
                     mc.map50, mr.map50, mc.map50 - mr.map50, float(lo50), float(hi50),
                     resamples, level)
