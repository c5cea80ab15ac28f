"""The axes dmx knows: their levels, the pipeline stage they act on, and where they apply.

Adding an axis is one entry in ``AXES``. An axis that does not apply to a cell (an OpenVINO
hint on a torch cell) is null in that cell and does not multiply the matrix.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Mapping

Factors = Mapping[str, "str | None"]

DECODE, PREPROCESS, INFER = "decode", "preprocess", "infer"


@dataclass(frozen=True)
class Axis:
    """One dimension of the matrix.

    ``levels`` lists the allowed plain levels; ``open_levels`` marks axes whose levels may also be
    mappings (decoder variants such as ``{name: libjpeg, build: 9e}``) or free integers.
    ``applies`` decides from a cell's other factors whether the axis means anything there.
    """

    name: str
    stage: str
    levels: tuple[str, ...]
    doc: str
    applies: Callable[[Factors], bool] = field(default=lambda f: True)
    integer: bool = False
    mapping_levels: bool = False


def _backend_is(name: str) -> Callable[[Factors], bool]:
    return lambda f: f.get("backend") == name


def _decoder_in(*names: str) -> Callable[[Factors], bool]:
    """Applies when the cell's decoder library (``libjpeg:9e`` -> libjpeg) is one of ``names``."""
    return lambda f: re.split(r"[:\[]", str(f.get("decoder") or "pil"))[0] in names


def _on_cuda_torch(f: Factors) -> bool:
    return f.get("backend") == "torch" and str(f.get("device") or "cpu").startswith("cuda")


RESIZE_LEVELS = (
    "pil-bilinear", "pil-bicubic", "cv2-linear", "cv2-area", "cv2-cubic",
    "torch-bilinear", "torch-bilinear-aa",
)

FIT_LEVELS = ("letterbox", "letterbox-center", "stretch", "resize-crop")

AXES: dict[str, Axis] = {
    a.name: a
    for a in (
        Axis("decoder", DECODE, ("pil", "opencv", "simplejpeg", "turbojpeg", "libjpeg", "nvjpeg"),
             "image decoding library (a mapping adds a package version or libjpeg build)",
             mapping_levels=True),
        Axis("exif", DECODE, ("apply", "ignore", "native"),
             "EXIF orientation: apply (Pillow exif_transpose / OpenCV default), ignore, or native "
             "(each library's own default: OpenCV applies it, Pillow ignores it)"),
        Axis("color", DECODE, ("rgb", "bgr"),
             "channel order handed to the model (bgr reproduces the classic channel swap)"),
        Axis("reduce", DECODE, ("1", "2", "4", "8"),
             "decode at 1/n size per side with the library's DCT scaling (Pillow draft, OpenCV "
             "IMREAD_REDUCED_COLOR_n, simplejpeg/PyTurboJPEG scaling); jpeglib has none",
             applies=_decoder_in("pil", "opencv", "simplejpeg", "turbojpeg")),
        Axis("dct", DECODE, ("islow", "ifast", "float"),
             "inverse DCT (libjpeg dct_method; simplejpeg/PyTurboJPEG fast DCT, no float); "
             "Pillow and OpenCV have no such choice",
             applies=_decoder_in("libjpeg", "simplejpeg", "turbojpeg")),
        Axis("upsample", DECODE, ("fancy", "fast"),
             "chroma upsampling (libjpeg do_fancy_upsampling, simplejpeg fastupsample, "
             "TJFLAG_FASTUPSAMPLE); Pillow and OpenCV have no such choice",
             applies=_decoder_in("libjpeg", "simplejpeg", "turbojpeg")),
        Axis("resize", PREPROCESS, RESIZE_LEVELS, "resize library and interpolation"),
        Axis("fit", PREPROCESS, FIT_LEVELS,
             "how the image fits the model's square input: letterbox (aspect kept, padded right/"
             "bottom with the model's pad value: YOLOX, DAMO-YOLO), letterbox-center (padded on "
             "both sides: Ultralytics), stretch, or resize-crop (shorter side, center crop); "
             "absent, the model's own fit"),
        Axis("backend", INFER, ("torch", "onnxruntime", "openvino"), "inference engine"),
        Axis("precision", INFER, ("fp32", "fp16", "bf16", "int8"), "numeric precision asked for"),
        Axis("openvino_hint", INFER, ("default", "f32", "bf16", "f16", "accuracy"),
             "OpenVINO INFERENCE_PRECISION_HINT (default = the plugin's own choice; "
             "accuracy = EXECUTION_MODE_HINT ACCURACY)", applies=_backend_is("openvino")),
        Axis("ort_opt", INFER, ("disable", "basic", "extended", "all"),
             "ONNX Runtime graph optimisation level", applies=_backend_is("onnxruntime")),
        Axis("conversion", INFER, ("onnx-dynamo", "onnx-legacy", "openvino-from-onnx",
                                   "openvino-from-torch"),
             "how the backend's model was made: torch's dynamo or legacy ONNX exporter, or "
             "OpenVINO from ONNX / straight from torch",
             applies=lambda f: f.get("backend") in ("onnxruntime", "openvino")),
        Axis("threads", INFER, (), "intra-op threads set on every backend", integer=True),
        Axis("batch", INFER, (), "inference batch size", integer=True),
        Axis("device", INFER, ("cpu", "cuda"), "device the model runs on (cuda:N allowed)"),
        Axis("tf32", INFER, ("on", "off"), "TF32 for fp32 matmul/conv on CUDA (torch)",
             applies=_on_cuda_torch),
    )
}

AXIS_ORDER: tuple[str, ...] = tuple(AXES)

# The level a pipeline uses for an axis the spec does not sweep.
DEFAULT_LEVELS: dict[str, str] = {
    "decoder": "pil", "exif": "apply", "color": "rgb", "reduce": "1", "dct": "islow",
    "upsample": "fancy", "resize": "pil-bilinear",
    "backend": "torch", "precision": "fp32", "device": "cpu", "tf32": "off",
}


def stage_axes(stage: str, present: tuple[str, ...]) -> tuple[str, ...]:
    """Axes of ``present`` that act on ``stage``, in canonical order."""
    return tuple(a for a in AXIS_ORDER if a in present and AXES[a].stage == stage)
