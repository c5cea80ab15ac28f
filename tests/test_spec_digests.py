"""Spec digests of existing specs never change: ``--resume`` finds a run by ``spec.digest``.
The digests below were computed before the hand-written parser and the pydantic schema became
one model (the parser of commit dd388ec); a change here strands every earlier run."""
from __future__ import annotations

from pathlib import Path

import pytest

from dmx.matrix import parse_spec

PINNED_SPECS = {
    "minimal": {"dataset": "imgs/", "model": "mobilenet_v2", "axes": {"decoder": ["pil", "opencv"]}},
    "detector_seed": {
        "name": "detector-seed", "dataset": {"path": "detector-images/"}, "model": "ddddocr_det",
        "axes": {"decoder": ["opencv", "pil"], "resize": ["cv2-linear", "pil-bilinear", "cv2-area"],
                 "fit": ["letterbox", "stretch"], "backend": ["torch", "onnxruntime", "openvino"],
                 "openvino_hint": ["f32", "default"]},
        "reference": {"decoder": "opencv", "resize": "cv2-linear", "fit": "letterbox",
                      "backend": "torch"}},
    "every_kind_of_level": {
        "name": "levels", "dataset": {"path": "imgs/*.jpg", "limit": 50}, "model": {"name": "tiny"},
        "axes": {"threads": [1, "2"], "device": ["cpu", "cuda:0"], "backend": ["torch", "onnxruntime"],
                 "decoder": ["pil", {"name": "libjpeg", "build": "9e"}, "pil[pillow==9.4.0]",
                             {"name": "opencv", "package": "opencv-python-headless==4.9.0.80"}],
                 "reduce": ["1", 2], "dct": ["islow", "float"], "exif": "apply",
                 "precision": ["fp32", "fp16"], "batch": [1, 8]},
        "include": [{"decoder": "opencv[opencv-python-headless==4.9.0.80]", "threads": 2}],
        "exclude": [{"decoder": "libjpeg:9e", "device": "cuda:0"}, {"batch": "8"}],
        "reference": {"decoder": "pil", "threads": 1},
        "calibration": {"limit": 8},
        "check": {"max_abs": 0.01, "max_rel_l2": "auto", "min_top1_agreement": 0.99,
                  "scope": "same-input", "allow_errors": True, "max_reference_errors": 2}},
    "user_detector": {
        "dataset": {"path": "imgs/"},
        "model": {"torch": "mypkg.models:build", "task": "detection", "opset": 17,
                  "input": {"size": 416, "mode": "letterbox", "pad": 114, "scale": 1,
                            "mean": [0, 0, 0], "std": [1, 1, 1], "channels": "bgr"},
                  "detection": {"layout": "yolox", "strides": [8, 16, 32], "score_threshold": 0.3,
                                "nms_iou": 0.5, "class_agnostic": False, "nms_plus_one": True,
                                "max_detections": 100, "rank_k": 50}},
        "axes": {"fit": ["letterbox", "letterbox-center"], "backend": ["torch", "openvino"],
                 "openvino_hint": ["f32"]}},
    "classifier_input": {
        "dataset": "imgs/",
        "model": {"torch": "mypkg.models:resnet", "input": {"size": 224, "resize": 256,
                                                             "mean": [0.485, 0.456, 0.406],
                                                             "std": [0.229, 0.224, 0.225]}},
        "axes": {"resize": ["pil-bilinear", "cv2-area", "torch-bilinear-aa"]}},
}

DIGESTS = {
    "minimal": "07963d75004e3481",
    "detector_seed": "1cb75f16a425d13d",
    "every_kind_of_level": "1149f66d7e67ac01",
    "user_detector": "4be8d83b11adfe72",
    "classifier_input": "c7905ed09e28fa93",
}


@pytest.mark.parametrize("name", sorted(DIGESTS))
def test_the_digest_of_an_existing_spec_is_unchanged(name: str) -> None:
    assert parse_spec(PINNED_SPECS[name]).digest == DIGESTS[name]


def test_the_digest_after_overrides_is_unchanged() -> None:
    s = parse_spec(PINNED_SPECS["detector_seed"],
                   overrides=["backend=torch,openvino", "dataset.limit=3", "resize=cv2-linear,cv2-area",
                              "model.detection.score_threshold=0.2"])
    assert s.digest == "37e71e1e82c04547"


def test_the_digest_of_a_spec_with_labels_is_unchanged(tmp_path: Path) -> None:
    (tmp_path / "val.txt").write_text("a.jpg 1\n")
    by_path = {"dataset": {"path": "imgs/", "labels": "val.txt"}, "model": "mobilenet_v2",
               "axes": {"backend": ["torch", "onnxruntime"]},
               "check": {"max_accuracy_drop": {"*": 0.5, "backend=onnxruntime": 1}}}
    by_mapping = {"dataset": {"path": "imgs/", "labels": {"path": "val.txt", "format": "pairs",
                                                          "by": "index", "index_base": 1,
                                                          "match": "name"}},
                  "model": "mobilenet_v2", "axes": {"backend": ["torch"]},
                  "check": {"max_accuracy_drop": 0.5}}
    assert parse_spec(by_path, base_dir=str(tmp_path)).digest == "d2f3e0b2ddc8f620"
    assert parse_spec(by_mapping, base_dir=str(tmp_path)).digest == "039bd7bc6018b72b"
