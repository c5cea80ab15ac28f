"""``ddddocr_det``: the YOLOX text/character detector that ships inside PyPI ``ddddocr`` (MIT).

File: ``ddddocr/common_det.onnx`` (20 MB; ddddocr 1.6.1), exported by PyTorch 1.9 at opset 11.
A YOLOX-Tiny-sized network (5.0 M parameters) with one class: a character or word of text (it
was trained for click-captchas; on photos it finds printed text). Input ``images`` [1, 3, 416,
416], fixed batch 1, BGR, raw 0-255 values. Output ``output`` [1, 3549, 6]: YOLOX's raw grid
head (decode_in_inference off) over strides 8/16/32 (52x52 + 26x26 + 13x13 anchors): x, y
offsets, log w, log h, objectness and class probability (both after sigmoid).

Preprocessing and post-processing follow ddddocr's own ``DetectionEngine``: letterbox with the
image at the top-left, padded with 114; cv2 INTER_LINEAR; score = objectness x class
probability; class-agnostic NMS at IoU 0.45 (pixel-inclusive areas, x2 - x1 + 1) above score
0.1. dmx's decoding gives ddddocr's own boxes exactly (tests/test_detection.py).

Torch cells run the ONNX graph through ``dmx.runner.models.onnx_torch`` (torch kernels, same weights).
"""

from __future__ import annotations

from typing import Any

from dmx.runner.detection import DetectionConfig
from dmx.runner.models.base import ModelDef, Preprocess, package_file

PACKAGE = "ddddocr"
ONNX_FILE = "common_det.onnx"
INSTALL_HINT = "pip install --no-deps ddddocr==1.6.1 (or pip install 'dmx[detect]')"
INPUT_SIZE = 416

PREPROCESS = Preprocess(mode="letterbox", resize=INPUT_SIZE, crop=INPUT_SIZE, mean=(0.0, 0.0, 0.0),
                        std=(1.0, 1.0, 1.0), pad=114.0, scale=1.0, channels="bgr")
DETECTION = DetectionConfig(layout="yolox", strides=(8, 16, 32), score_threshold=0.1, nms_iou=0.45,
                            class_agnostic=True, nms_plus_one=True)


def onnx_path() -> str:
    """Path of ``common_det.onnx`` inside the installed ddddocr; raises ``ModelUnavailable``."""
    return package_file(PACKAGE, ONNX_FILE, INSTALL_HINT)


def build() -> Any:
    """The ONNX graph as a torch module (fp32, CPU, eval mode)."""
    from dmx.runner.models.onnx_torch import OnnxModule
    return OnnxModule.from_file(onnx_path()).float().eval()


def model_def() -> ModelDef:
    """Registry entry (resolves the file, so raises ``ModelUnavailable`` early)."""
    path = onnx_path()
    return ModelDef(
        name="ddddocr_det",
        task="detection",
        preprocess=PREPROCESS,
        build=build,
        weights_path=path,
        labels=("text",),
        source=("ddddocr 1.6.1 (PyPI, MIT licence) common_det.onnx: YOLOX-style single-class "
                "text detector, 416x416, opset 11; torch runs it through dmx's ONNX interpreter"),
        onnx_path=path,
        detection=DETECTION,
    )
