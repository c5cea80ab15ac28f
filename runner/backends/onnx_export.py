"""torch -> ONNX, shared by the backends that run ONNX (onnxruntime, and OpenVINO from ONNX).

Not a backend itself: it defines no ``BackendRunner``. The export is cached under dmx's cache,
keyed by the weights hash, exporter, opset and torch version.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from dmx.runner.cache import cached, torch_version

from .base import ConversionError

#: The exporters a ``conversion`` level can name: torch's ``torch.export``-based one (the
#: default) and the TorchScript one (``dynamo=False``).
ONNX_EXPORTERS = ("onnx-dynamo", "onnx-legacy")


def export_onnx(model: Any, digest: str, exporter: str = "onnx-dynamo") -> tuple[str, dict]:
    """torch -> ONNX with a dynamic batch, cached by weights hash; ``model`` is a
    ``dmx.runner.convert.ResolvedModel``. Raises ConversionError."""
    dynamo = exporter == "onnx-dynamo"
    key = f"{digest}-{exporter}-op{model.opset}-torch{torch_version()}"   # cached: no torch import

    def make(out: Path) -> dict[str, Any]:
        import contextlib
        import io
        import logging

        import torch
        from dmx.runner.models.loading import build_torch_model
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" noise
        net = build_torch_model(model.torch_factory, model.weights)
        dummy = torch.zeros(2, 3, model.preprocess.crop, model.preprocess.crop)
        if dynamo:
            shape_args: dict[str, Any] = {"dynamic_shapes": ({0: torch.export.Dim("batch", min=1, max=1024)},)}
        else:
            shape_args = {"dynamic_axes": {"input": {0: "batch"}, "output": {0: "batch"}}}
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                torch.onnx.export(net, (dummy,), str(out), dynamo=dynamo, opset_version=model.opset,
                                  input_names=["input"], output_names=["output"], external_data=False,
                                  **shape_args)
        except Exception as e:  # torch.onnx raises many types; report the step and message
            raise ConversionError(f"torch.onnx.export ({exporter}) failed: {type(e).__name__}: {e}") from e
        return {"command": f"torch.onnx.export(dynamo={dynamo}, opset_version={model.opset}, "
                           "dynamic batch)", "torch": torch.__version__}

    return cached(key, "model.onnx", make)


def onnx_batch_limit(path: str) -> int | None:
    """The batch size an ONNX file is fixed to (its first input's static first dimension), or None
    when the batch is dynamic: many detector exports are batch-1 only."""
    import onnx
    m = onnx.load(path, load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    first = next((i for i in m.graph.input if i.name not in inits), None)
    dims = first.type.tensor_type.shape.dim if first is not None else []
    return int(dims[0].dim_value) if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0 else None
