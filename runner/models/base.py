"""Core types for the model registry: preprocessing spec, model definition, errors."""

from __future__ import annotations

import importlib.resources
import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from dmx.runner.detection import DetectionConfig

if TYPE_CHECKING:   # the model modules import torch; workers that never build one skip it
    import torch

__all__ = [
    "FIT_MODES",
    "ModelDef",
    "ModelUnavailable",
    "Preprocess",
    "UnknownModel",
    "imagenet_labels",
    "package_file",
]


class ModelUnavailable(Exception):
    """A known model cannot be built here (weights or architecture package missing)."""


class UnknownModel(Exception):
    """The requested model name is not in the registry."""


FIT_MODES = ("resize-crop", "stretch", "letterbox", "letterbox-center")


@dataclass(frozen=True)
class Preprocess:
    """How an RGB image becomes the model's NCHW float input.

    ``mode`` is the model's default fit (the ``fit`` axis overrides it per cell):
    ``resize-crop``: resize the shorter side to ``resize``, then center-crop ``crop``x``crop``.
    ``stretch``: resize straight to ``crop``x``crop`` ignoring aspect ratio (``resize`` unused).
    ``letterbox``: resize the longer side to ``crop`` keeping the aspect ratio, pad right and
    bottom with ``pad`` (YOLOX, DAMO-YOLO); ``letterbox-center``: pad both sides (Ultralytics).
    Pixel values become ``(x / scale - mean) / std`` per channel, handed over in ``channels``
    order (``bgr`` for models trained on OpenCV-decoded images).
    """

    mode: str
    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pad: float = 114.0
    scale: float = 255.0
    channels: str = "rgb"

    def __post_init__(self) -> None:
        if self.mode not in FIT_MODES:
            raise ValueError(f"unknown preprocess mode {self.mode!r}; allowed: {', '.join(FIT_MODES)}")
        if self.crop <= 0 or (self.mode == "resize-crop" and self.resize < self.crop):
            raise ValueError(f"bad sizes resize={self.resize} crop={self.crop}")
        if self.channels not in ("rgb", "bgr"):
            raise ValueError(f"channels must be rgb or bgr, got {self.channels!r}")
        if not 0.0 <= self.pad <= 255.0 or self.scale <= 0:
            raise ValueError(f"bad pad={self.pad} (0-255) or scale={self.scale} (> 0)")


@dataclass(frozen=True)
class ModelDef:
    """A registered model: how to build it and how to feed it.

    ``onnx_path`` is set for a model that ships as ONNX (its ONNX Runtime and OpenVINO cells run
    that file); ``detection`` says how a detector's raw outputs become boxes.
    """

    name: str
    task: str
    preprocess: Preprocess
    build: Callable[[], torch.nn.Module]
    weights_path: str | None
    labels: tuple[str, ...] | None
    source: str
    onnx_path: str | None = None
    detection: DetectionConfig | None = None


def package_file(package: str, relative: str, install_hint: str) -> str:
    """Return the path of a data file shipped inside an installed package.

    Uses ``importlib.util.find_spec`` on the top-level package, which locates it
    without executing its ``__init__`` (some weight packages import old-torch code).
    Raises ``ModelUnavailable`` carrying ``install_hint`` if the package or file is missing.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(f"package {package!r} is not installed; install it with: {install_hint}")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / relative
        if candidate.is_file():
            return str(candidate)
    raise ModelUnavailable(
        f"package {package!r} is installed but {relative!r} is missing from it; "
        f"reinstall it with: {install_hint}"
    )


@lru_cache(maxsize=1)
def imagenet_labels() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in index order (torchvision / PyTorch Hub list)."""
    text = importlib.resources.files(__package__).joinpath("imagenet_labels.txt").read_text(encoding="utf-8")
    labels = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(labels) != 1000:
        raise RuntimeError(f"imagenet_labels.txt has {len(labels)} entries, expected 1000")
    return labels
