"""OpenVINO (CPU plugin; GPU plugin where present) from the ONNX export or straight from torch;
int8 by NNCF. The precision it used is read back after compile.

Without a hint the CPU plugin picks bf16 on CPUs with avx512_bf16/AMX, so an "fp32" request
sets ``INFERENCE_PRECISION_HINT=f32`` explicitly unless the ``openvino_hint`` axis says otherwise.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dmx.matrix.axes import INFER, Axis
from dmx.runner.cache import cached, file_digest, torch_version

from .base import BackendRunner, Conversion, ConversionError, InferSetting, ModelArtifacts
from .onnx_export import ONNX_EXPORTERS

if TYPE_CHECKING:
    import numpy as np   # imported where used: `import dmx.runner.backends` stays cheap

_HINT_FOR_PRECISION = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32"}
_EFFECTIVE = {"f32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16",
              "f16": "fp16", "float16": "fp16"}
#: conversion level -> where the OpenVINO model comes from (an ONNX exporter, or torch directly)
_SOURCE = {None: "onnx-dynamo", "openvino-from-onnx": "onnx-dynamo", "openvino-from-torch": "torch",
           **{e: e for e in ONNX_EXPORTERS}}


def openvino_from_torch(model: Any, digest: str) -> tuple[str, dict]:
    """torch -> OpenVINO IR directly with ``openvino.convert_model`` (no ONNX in between)."""
    import openvino as ov

    key = f"{digest}-ov-from-torch-ov{ov.__version__.split('-')[0]}-torch{torch_version()}"

    def make(out: Path) -> dict[str, Any]:
        import torch
        from dmx.runner.models.loading import build_torch_model
        net = build_torch_model(model.torch_factory, model.weights)
        crop = model.preprocess.crop
        try:
            ovm = ov.convert_model(net, example_input=torch.zeros(1, 3, crop, crop),
                                   input=[(-1, 3, crop, crop)])
        except Exception as e:  # the PyTorch frontend raises many types
            raise ConversionError(f"openvino.convert_model(torch) failed: {type(e).__name__}: {e}") from e
        ov.save_model(ovm, str(out), compress_to_fp16=False)
        return {"command": "openvino.convert_model(torch module, example_input), "
                           "save_model(compress_to_fp16=False)", "openvino": ov.__version__}

    return cached(key, "model.xml", make)


def quantize_openvino_int8(src_path: str, digest: str, calib: np.ndarray,
                           calib_ids: list[str]) -> tuple[str, dict]:
    """Post-training int8 quantisation with NNCF on the OpenVINO model (saved as IR)."""
    key = f"{digest}-{file_digest(src_path)[:12]}-nncf-{hashlib.sha1(calib.tobytes()).hexdigest()[:12]}"

    def make(out: Path) -> dict[str, Any]:
        import nncf
        import openvino as ov
        model = ov.Core().read_model(src_path)
        data = nncf.Dataset([calib[i: i + 1] for i in range(len(calib))])
        q = nncf.quantize(model, data, subset_size=len(calib))
        ov.save_model(q, str(out))
        return {"command": "nncf.quantize(openvino model, calibration dataset)",
                "nncf": nncf.__version__, "calibration_images": calib_ids}

    return cached(key, "model-int8.xml", make)


class OpenVinoRunner(BackendRunner):
    name = "openvino"
    precisions = ("fp32", "fp16", "bf16", "int8")
    axes = (
        Axis("openvino_hint", INFER, ("default", "f32", "bf16", "f16", "accuracy"),
             "OpenVINO INFERENCE_PRECISION_HINT (default = the plugin's own choice; "
             "accuracy = EXECUTION_MODE_HINT ACCURACY)", rank=10),
        Axis("conversion", INFER, (*ONNX_EXPORTERS, "openvino-from-onnx", "openvino-from-torch"),
             "how the backend's model was made: torch's dynamo or legacy ONNX exporter, or "
             "OpenVINO from ONNX / straight from torch", rank=12),
    )

    @classmethod
    def version(cls) -> str | None:
        try:
            import openvino
        except ImportError:
            return None
        return openvino.__version__

    @classmethod
    def model_key(cls, setting: InferSetting) -> str:
        """``ov:<source>`` for float precisions (the precision is a compile hint) and
        ``ov:<source>:int8`` for NNCF-quantised models."""
        source = _SOURCE.get(setting.conversion, setting.conversion)
        return f"ov:{source}" + (":int8" if setting.precision == "int8" else "")

    @classmethod
    def make_model(cls, setting: InferSetting, conv: Conversion) -> tuple[str, dict[str, Any] | None]:
        source = _SOURCE.get(setting.conversion, setting.conversion)
        if source == "torch":
            src, notes = openvino_from_torch(conv.model, conv.digest)
        else:
            src, notes = conv.onnx(source), None
        if setting.precision != "int8":
            return src, notes
        try:
            import nncf  # noqa: F401
        except ImportError:
            raise ConversionError("int8 on OpenVINO needs NNCF: pip install 'dmx[int8]'") from None
        x, ids = conv.calibration()
        return quantize_openvino_int8(src, conv.digest, x, ids)

    @classmethod
    def unsupported(cls, artifacts: ModelArtifacts, setting: InferSetting) -> str | None:
        if setting.device != "cpu" and cls.version() is not None:
            import openvino as ov
            if "GPU" not in ov.Core().available_devices:
                return f"device {setting.device}: OpenVINO sees no GPU plugin device here"
        return super().unsupported(artifacts, setting)

    def config(self) -> dict[str, Any]:
        hint = self.setting.openvino_hint
        # No CPU pinning: with one thread per Ray actor every actor would pin to core 0
        # (measured: two actors 4.3 -> 9.1 ms/image pinned, 4.7 unpinned).
        cfg: dict[str, Any] = {"INFERENCE_NUM_THREADS": self.threads, "NUM_STREAMS": 1,
                               "ENABLE_CPU_PINNING": False}
        if hint is None:
            cfg["INFERENCE_PRECISION_HINT"] = _HINT_FOR_PRECISION[self.setting.precision]
        elif hint == "accuracy":
            cfg["EXECUTION_MODE_HINT"] = "ACCURACY"
        elif hint != "default":
            cfg["INFERENCE_PRECISION_HINT"] = hint
        return cfg

    def _activate(self) -> None:
        import openvino as ov
        self._ov = ov
        core = ov.Core()
        self.path = self.artifacts.file_for(self.setting)
        model = core.read_model(self.path)
        device = "GPU" if self.setting.device.startswith("cuda") else "CPU"
        self.compiled = core.compile_model(model, device, self.config())
        self.request = self.compiled.create_infer_request()

    def _infer_all(self, batch: np.ndarray) -> list[np.ndarray]:
        import numpy as np
        res = self.request.infer({0: batch})
        return [np.array(res[o]) for o in self.compiled.outputs]

    def _deactivate(self) -> None:
        del self.request, self.compiled

    def info(self) -> dict[str, Any]:
        props = {}
        for name in ("INFERENCE_PRECISION_HINT", "EXECUTION_MODE_HINT", "INFERENCE_NUM_THREADS",
                     "NUM_STREAMS", "PERFORMANCE_HINT"):
            try:
                props[name] = str(self.compiled.get_property(name))
            except RuntimeError:
                props[name] = None
        hint = props["INFERENCE_PRECISION_HINT"] or ""
        m = re.search(r"'(\w+)'", hint)  # str(ov.Type) reads "<Type: 'float32'>"
        hint = m.group(1) if m else hint
        props["INFERENCE_PRECISION_HINT"] = hint
        eff = _EFFECTIVE.get(hint, hint)
        if self.setting.precision == "int8":
            eff = f"int8+{eff}"
        return {"backend": "openvino", "version": self._ov.__version__,
                "config_asked": {k: str(v) for k, v in self.config().items()},
                "precision_effective": eff, "threads": self.threads, "properties": props}
