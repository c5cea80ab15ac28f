"""Building a torch model from an artifact reference: a built-in name or a user factory."""
from __future__ import annotations

import importlib
from typing import Any


class ModelLoadError(RuntimeError):
    """A user model could not be imported, built or loaded."""


def build_torch_model(factory: str | None, weights: str | None) -> Any:
    """``builtin:<name>`` or ``package.module:factory`` (trusted code) -> an eval() fp32 module.

    User weights load with ``torch.load(..., weights_only=True)``: a checkpoint cannot run code.
    """
    import torch
    if factory is None:
        raise ModelLoadError("this model has no torch form (it was given as an ONNX file)")
    if factory.startswith("builtin:"):
        from runner.models import get_model
        return get_model(factory.split(":", 1)[1]).build()
    module_name, func_name = factory.split(":", 1)
    try:
        fn = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as e:
        raise ModelLoadError(f"model.torch {factory!r}: {e}") from None
    model = fn()
    if weights:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        model.load_state_dict(state)
    return model.eval().float()
