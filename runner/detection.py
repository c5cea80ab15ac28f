"""Detector outputs: raw head -> candidates -> NMS -> detections, identical for every backend.

A backend hands back the model's raw outputs; everything after that is dmx's own numpy code, so
two cells can only differ in their detections because their raw outputs differ. ``decode_candidates``
turns one image's outputs into one candidate per anchor (box in model-input pixels, best-class
score, class), index-aligned across cells so the pre-NMS score order can be compared;
``nms`` keeps the final detections; ``to_image`` maps boxes back to decoded-image pixels.
``nms`` is dmx's, not ``cv2.dnn.NMSBoxesBatched``: same boxes on ddddocr's outputs (16 of 16), but
cv2 ranks float32 scores, calls two zero-area boxes IoU 1 (472 of 600 integer-pixel sets differed)
and its class offset lets a box with negative coordinates suppress another class's.

Output layouts (``DetectionConfig.layout``), per image (batch dimension removed):
- ``yolox``: one output [N, 5+C], YOLOX's raw grid head (``decode_in_inference=False``): x, y
  offsets in grid cells, log w, log h, objectness, class probabilities; decoded with ``strides``.
- ``yolov5``: one output [N, 5+C]: cx, cy, w, h in input pixels, objectness, class probabilities
  (YOLOv5/v7, YOLOX exported with its decode).
- ``yolo``: one output [N, 4+C]: cx, cy, w, h, class scores (no objectness).
- ``yolo-transposed``: one output [4+C, N] (Ultralytics YOLOv8/11 exports, e.g. [84, 8400]).
- ``boxes-scores``: two outputs, boxes [N, 4] x1 y1 x2 y2 in input pixels and scores [N, C]
  (DAMO-YOLO's ONNX export); the output whose last dimension is 4 is taken as the boxes.
- a user callable ``decoder: "pkg.module:fn"`` (trusted code): ``fn(outputs, (h, w))`` returns
  ``(boxes [N, 4] xyxy input px, scores [N], classes [N])``; dmx's NMS runs on its result.
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from dmx.matrix.spec import DETECTION_LAYOUTS as LAYOUTS


class DetectionDecodeError(RuntimeError):
    """The raw outputs do not fit the declared layout, or the user decoder failed."""


@dataclass(frozen=True)
class DetectionConfig:
    """How a detector's raw outputs become boxes, and how two detection sets are compared.

    ``score_threshold``, ``nms_iou`` and ``nms_plus_one`` (pixel-inclusive box areas, x2 - x1 + 1,
    as the numpy NMS of YOLOX's demo and ddddocr computes them) are the detector's own
    post-processing; ``rank_k`` is the
    number of top candidates whose order is compared (Kendall tau, top-k overlap);
    ``match_iou`` the IoU at which a box matches the reference's; a detection set is "the same"
    when every box matches one-to-one with IoU >= ``same_iou``, |score delta| <= ``same_score``
    and the same class.
    """

    layout: str = "yolov5"
    decoder: str | None = None
    strides: tuple[int, ...] = (8, 16, 32)
    score_threshold: float = 0.25
    nms_iou: float = 0.45
    class_agnostic: bool = False
    nms_plus_one: bool = False
    max_detections: int = 300
    rank_k: int = 100
    match_iou: float = 0.5
    same_iou: float = 0.9
    same_score: float = 0.05

    def __post_init__(self) -> None:
        if self.decoder is None and self.layout not in LAYOUTS:
            raise ValueError(f"unknown detection layout {self.layout!r}; allowed: {', '.join(LAYOUTS)}")


@dataclass(frozen=True)
class Candidates:
    """One candidate per anchor, in the model's own order: boxes x1 y1 x2 y2 (model-input px),
    best-class score (objectness x class probability where the layout has objectness), class."""

    boxes: np.ndarray    # (N, 4) float64
    scores: np.ndarray   # (N,) float64
    classes: np.ndarray  # (N,) int64


@dataclass(frozen=True)
class Detections:
    """Boxes kept by NMS, best first; coordinates in whichever frame the caller put them."""

    boxes: np.ndarray    # (M, 4) float64, x1 y1 x2 y2
    scores: np.ndarray   # (M,) float64
    classes: np.ndarray  # (M,) int64


def _cxcywh_to_xyxy(b: np.ndarray) -> np.ndarray:
    half = b[:, 2:4] / 2.0
    return np.concatenate([b[:, 0:2] - half, b[:, 0:2] + half], axis=1)


def _single(outputs: Sequence[np.ndarray], layout: str) -> np.ndarray:
    if len(outputs) < 1:
        raise DetectionDecodeError(f"layout {layout} needs one output, the model gave none")
    y = np.asarray(outputs[0], dtype=np.float64)
    y = y.reshape(-1, y.shape[-1]) if layout != "yolo-transposed" else y.reshape(y.shape[-2], -1)
    return y


def _grid(input_hw: tuple[int, int], strides: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """YOLOX's anchor points: (x, y) grid cell per anchor and its stride, stride by stride."""
    grids, steps = [], []
    for s in strides:
        h, w = input_hw[0] // s, input_hw[1] // s
        xv, yv = np.meshgrid(np.arange(w), np.arange(h))
        grids.append(np.stack([xv, yv], axis=2).reshape(-1, 2))
        steps.append(np.full((h * w, 1), s))
    return np.concatenate(grids).astype(np.float64), np.concatenate(steps).astype(np.float64)


def _best_class(cls: np.ndarray, obj: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    scores = cls if obj is None else cls * obj[:, None]
    classes = np.argmax(scores, axis=1)
    return scores[np.arange(len(classes)), classes], classes.astype(np.int64)


def _decode_yolox(outputs: Sequence[np.ndarray], hw: tuple[int, int], cfg: DetectionConfig) -> Candidates:
    y = _single(outputs, "yolox")
    grid, stride = _grid(hw, cfg.strides)
    if len(grid) != len(y) or y.shape[1] < 6:
        raise DetectionDecodeError(f"yolox layout: output {y.shape} does not fit strides "
                                   f"{list(cfg.strides)} at {hw[1]}x{hw[0]} ({len(grid)} anchors, 5+C columns)")
    xy = (y[:, 0:2] + grid) * stride
    wh = np.exp(y[:, 2:4]) * stride
    scores, classes = _best_class(y[:, 5:], y[:, 4])
    return Candidates(_cxcywh_to_xyxy(np.concatenate([xy, wh], axis=1)), scores, classes)


def _decode_yolov5(outputs: Sequence[np.ndarray], hw: tuple[int, int], cfg: DetectionConfig) -> Candidates:
    y = _single(outputs, "yolov5")
    if y.shape[1] < 6:
        raise DetectionDecodeError(f"yolov5 layout needs [N, 5+C], got {y.shape}")
    scores, classes = _best_class(y[:, 5:], y[:, 4])
    return Candidates(_cxcywh_to_xyxy(y[:, :4]), scores, classes)


def _decode_yolo(outputs: Sequence[np.ndarray], hw: tuple[int, int], cfg: DetectionConfig) -> Candidates:
    y = _single(outputs, "yolo")
    if y.shape[1] < 5:
        raise DetectionDecodeError(f"yolo layout needs [N, 4+C], got {y.shape}")
    scores, classes = _best_class(y[:, 4:], None)
    return Candidates(_cxcywh_to_xyxy(y[:, :4]), scores, classes)


def _decode_yolo_transposed(outputs: Sequence[np.ndarray], hw: tuple[int, int],
                            cfg: DetectionConfig) -> Candidates:
    y = _single(outputs, "yolo-transposed").T
    if y.shape[1] < 5:
        raise DetectionDecodeError(f"yolo-transposed layout needs [4+C, N], got {y.T.shape}")
    scores, classes = _best_class(y[:, 4:], None)
    return Candidates(_cxcywh_to_xyxy(y[:, :4]), scores, classes)


def _decode_boxes_scores(outputs: Sequence[np.ndarray], hw: tuple[int, int],
                         cfg: DetectionConfig) -> Candidates:
    if len(outputs) != 2:
        raise DetectionDecodeError(f"boxes-scores layout needs two outputs, the model gave {len(outputs)}")
    a, b = (np.asarray(o, dtype=np.float64) for o in outputs)
    boxes, scores = (b, a) if a.shape[-1] != 4 and b.shape[-1] == 4 else (a, b)
    boxes, scores = boxes.reshape(-1, 4), scores.reshape(-1, scores.shape[-1])
    if len(boxes) != len(scores):
        raise DetectionDecodeError(f"boxes-scores: {len(boxes)} boxes but {len(scores)} score rows")
    best, classes = _best_class(scores, None)
    return Candidates(boxes, best, classes)


_DECODERS: dict[str, Callable[[Sequence[np.ndarray], tuple[int, int], DetectionConfig], Candidates]] = {
    "yolox": _decode_yolox,
    "yolov5": _decode_yolov5,
    "yolo": _decode_yolo,
    "yolo-transposed": _decode_yolo_transposed,
    "boxes-scores": _decode_boxes_scores,
}


def load_decoder(ref: str) -> Callable:
    """Import a user decoder ``package.module:function`` (trusted code named by the spec)."""
    module_name, func_name = ref.split(":", 1)
    try:
        return getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as e:
        raise DetectionDecodeError(f"detection.decoder {ref!r}: {e}") from None


def decode_candidates(outputs: Sequence[np.ndarray], input_hw: tuple[int, int],
                      cfg: DetectionConfig) -> Candidates:
    """One image's raw outputs (batch dimension removed) -> candidates in model-input pixels."""
    if cfg.decoder:
        try:
            boxes, scores, classes = load_decoder(cfg.decoder)(list(outputs), input_hw)
        except DetectionDecodeError:
            raise
        except Exception as e:  # user code: any failure is reported as a decode error
            raise DetectionDecodeError(f"detection.decoder {cfg.decoder}: {type(e).__name__}: {e}") from e
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        scores = np.asarray(scores, np.float64).ravel()
        classes = np.asarray(classes).astype(np.int64).ravel()
        if not len(boxes) == len(scores) == len(classes):
            raise DetectionDecodeError(f"detection.decoder {cfg.decoder} returned {len(boxes)} boxes, "
                                       f"{len(scores)} scores, {len(classes)} classes")
        return Candidates(boxes, scores, classes)
    return _DECODERS[cfg.layout](outputs, input_hw, cfg)


def box_iou(a: np.ndarray, b: np.ndarray, plus_one: bool = False) -> np.ndarray:
    """Pairwise IoU of boxes x1 y1 x2 y2, (A, 4) x (B, 4) -> (A, B); empty boxes give 0.
    ``plus_one``: the legacy pixel-inclusive convention (width x2 - x1 + 1)."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    one = 1.0 if plus_one else 0.0
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt + one, 0.0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2] + one, 0.0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2] + one, 0.0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def score_order(scores: np.ndarray) -> np.ndarray:
    """Candidate indices by score, best first; ties by lower index, so the order is reproducible."""
    return np.lexsort((np.arange(len(scores)), -np.asarray(scores, np.float64)))


def nms(c: Candidates, cfg: DetectionConfig) -> Detections:
    """Greedy NMS over candidates scoring above ``score_threshold`` (per class unless
    ``class_agnostic``), at most ``max_detections`` kept, best first."""
    keep_mask = c.scores > cfg.score_threshold
    idx = np.flatnonzero(keep_mask)
    idx = idx[score_order(c.scores[idx])]
    boxes, classes = c.boxes[idx], c.classes[idx]
    iou = box_iou(boxes, boxes, plus_one=cfg.nms_plus_one)
    if not cfg.class_agnostic:
        iou = np.where(classes[:, None] == classes[None, :], iou, 0.0)
    suppressed = np.zeros(len(idx), bool)
    kept: list[int] = []
    for i in range(len(idx)):
        if suppressed[i]:
            continue
        kept.append(i)
        if len(kept) >= cfg.max_detections:
            break
        suppressed |= iou[i] > cfg.nms_iou
    sel = idx[kept]
    return Detections(c.boxes[sel], c.scores[sel], c.classes[sel])


def to_image(d: Detections, scale_xy: tuple[float, float], offset_xy: tuple[float, float],
             image_hw: tuple[int, int]) -> Detections:
    """Map boxes from model-input pixels to decoded-image pixels (input = image * scale + offset),
    clipped to the image, so cells with different resize/fit compare in one frame."""
    b = d.boxes.copy()
    b[:, [0, 2]] = (b[:, [0, 2]] - offset_xy[0]) / scale_xy[0]
    b[:, [1, 3]] = (b[:, [1, 3]] - offset_xy[1]) / scale_xy[1]
    b[:, [0, 2]] = np.clip(b[:, [0, 2]], 0.0, float(image_hw[1]))
    b[:, [1, 3]] = np.clip(b[:, [1, 3]], 0.0, float(image_hw[0]))
    return Detections(b, d.scores, d.classes)


def detect(outputs: Sequence[np.ndarray], input_hw: tuple[int, int],
           cfg: DetectionConfig) -> tuple[Candidates, Detections]:
    """Raw outputs -> (candidates, detections), both in model-input pixels."""
    c = decode_candidates(outputs, input_hw, cfg)
    return c, nms(c, cfg)


def config_from(d: Mapping[str, Any] | None, default: DetectionConfig | None = None) -> DetectionConfig:
    """A ``DetectionConfig`` from the spec's ``model.detection`` mapping, over ``default`` (a
    built-in detector's own settings) or the documented defaults."""
    values = dict(dataclasses.asdict(default)) if default else {}
    for k, v in (d or {}).items():
        values[k] = tuple(v) if k == "strides" else v
    if (d or {}).get("decoder"):
        values.setdefault("layout", "yolov5")
    return DetectionConfig(**values)
