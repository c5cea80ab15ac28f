"""Building a torch model from an artifact reference: a built-in name or a user factory."""
from __future__ import annotations

import importlib
import pickle
import re
from typing import Any


class ModelLoadError(RuntimeError):
    """A user model could not be imported, built or loaded."""


def build_torch_model(factory: str | None, weights: str | None) -> Any:
    """``builtin:<name>`` or ``package.module:factory`` (trusted code) -> an eval() fp32 module.

    User weights load with ``torch.load(..., weights_only=True)``: a checkpoint cannot run code.
    """
    if factory is None:
        raise ModelLoadError("this model has no torch form (it was given as an ONNX file)")
    if factory.startswith("builtin:"):
        from dmx.runner.models import get_model
        return get_model(factory.split(":", 1)[1]).build()
    module_name, func_name = factory.split(":", 1)
    try:
        fn = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as e:
        raise ModelLoadError(f"model.torch {factory!r}: {e}") from None
    model = fn()
    if weights:
        state = load_weights(weights)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        try:
            model.load_state_dict(state)
        except (RuntimeError, TypeError, ValueError) as e:
            raise ModelLoadError(f"model.weights {weights} does not fit {factory}: "
                                 f"{_first_line(e)}") from None
    return model.eval().float()


def load_weights(path: str) -> Any:
    """``torch.load(path, weights_only=True)``; a checkpoint that holds anything but tensors and
    plain containers is refused as unsafe - never loaded another way."""
    import torch
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's text advises weights_only=False, i.e. running the file's code: not ours to say
        found = re.search(r"(?:unsupported GLOBAL|Unsupported global: GLOBAL|Unsupported operand) "
                          r"([\w.]+)", str(e), re.I)
        what = f" (it calls {found.group(1)})" if found else ""
        raise ModelLoadError(f"model.weights {path} was refused as unsafe: it holds Python "
                             f"objects, not only tensors{what}; dmx loads weights only") from None
    except FileNotFoundError:
        raise ModelLoadError(f"model.weights {path}: file not found") from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise ModelLoadError(f"model.weights {path} cannot be read as a torch checkpoint: "
                             f"{_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
