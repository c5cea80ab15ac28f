"""Model registry: ``get_model(name) -> ModelDef`` for every name in ``MODELS``.

Model modules are imported lazily, so listing names never touches weight packages.
``get_model`` raises ``UnknownModel`` for a name not in ``MODELS`` and
``ModelUnavailable`` (with the exact install command) when weights or the
architecture package are missing.
"""

from __future__ import annotations

import importlib

from dmx.runner.models.base import ModelDef, ModelUnavailable, Preprocess, UnknownModel, imagenet_labels

__all__ = [
    "MODELS",
    "ModelDef",
    "ModelUnavailable",
    "Preprocess",
    "UnknownModel",
    "check_model_name",
    "get_model",
    "imagenet_labels",
]

_MODULES: dict[str, str] = {
    "mobilenet_v2": "dmx.runner.models.mobilenet_v2",
    "efficientnet_lite0": "dmx.runner.models.efficientnet_lite0",
    "tiny": "dmx.runner.models.tiny",
    "ddddocr_det": "dmx.runner.models.ddddocr_det",
}

MODELS: tuple[str, ...] = tuple(_MODULES)


def check_model_name(name: str) -> None:
    """Raise ``UnknownModel`` for a name not in ``MODELS`` (nothing is imported)."""
    if name not in _MODULES:
        raise UnknownModel(f"unknown model {name!r}; known models: {', '.join(MODELS)}")


def get_model(name: str) -> ModelDef:
    """Return the ``ModelDef`` registered under ``name``."""
    check_model_name(name)
    module_name = _MODULES[name]
    module = importlib.import_module(module_name)
    model_def: ModelDef = module.model_def()
    return model_def
