"""OpenVINO (CPU plugin) from the ONNX model; the precision it used is read back after compile.

Without a hint the CPU plugin picks bf16 on CPUs with avx512_bf16/AMX, so an "fp32" request
sets ``INFERENCE_PRECISION_HINT=f32`` explicitly unless the ``openvino_hint`` axis says otherwise.
"""
from __future__ import annotations

import re
from typing import Any

import numpy as np

from .base import BackendRunner, InferSetting, ModelArtifacts

_HINT_FOR_PRECISION = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32"}
_EFFECTIVE = {"f32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16",
              "f16": "fp16", "float16": "fp16"}


class OpenVinoRunner(BackendRunner):
    system_name = "openvino"

    @classmethod
    def unsupported(cls, artifacts: ModelArtifacts, setting: InferSetting) -> str | None:
        try:
            import openvino  # noqa: F401
        except ImportError:
            return "openvino is not installed"
        if setting.device != "cpu":
            import openvino as ov
            if "GPU" not in ov.Core().available_devices:
                return f"device {setting.device}: OpenVINO sees no GPU plugin device here"
        if artifacts.file_for(setting) is None:
            return artifacts.missing_reason(setting)
        return None

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

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        res = self.request.infer({0: batch})
        return np.array(res[self.compiled.outputs[0]])

    def _infer_all(self, batch: np.ndarray) -> list[np.ndarray]:
        res = self.request.infer({0: batch})
        return [np.array(res[o]) for o in self.compiled.outputs]

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
