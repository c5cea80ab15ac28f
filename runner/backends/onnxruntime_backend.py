"""ONNX Runtime (CPU provider): fp32, fp16 (converted graph) and int8 (static QDQ) models."""
from __future__ import annotations

from typing import Any

import numpy as np

from .base import BackendRunner, InferSetting, ModelArtifacts

_OPT = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
        "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


def _onnx_float_types(path: str) -> str:
    """The float type of the graph's initializers, as a precision name (what the graph holds)."""
    import onnx
    m = onnx.load(path, load_external_data=False)
    kinds = {init.data_type for init in m.graph.initializer}
    T = onnx.TensorProto
    if T.INT8 in kinds or T.UINT8 in kinds:
        return "int8"
    if T.FLOAT16 in kinds:
        return "fp16"
    if T.BFLOAT16 in kinds:
        return "bf16"
    return "fp32"


class OnnxRuntimeRunner(BackendRunner):
    system_name = "onnxruntime"

    @classmethod
    def unsupported(cls, artifacts: ModelArtifacts, setting: InferSetting) -> str | None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return "onnxruntime is not installed"
        if setting.device != "cpu":
            import onnxruntime as ort
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                return f"device {setting.device}: onnxruntime has no CUDAExecutionProvider here"
        from runner.convert import conversion_unsupported
        reason = conversion_unsupported("onnxruntime", setting.conversion)
        if reason:
            return reason
        if artifacts.file_for(setting) is None:
            return artifacts.missing_reason(setting)
        return None

    def _activate(self) -> None:
        import onnxruntime as ort
        self._ort = ort
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel,
                                              _OPT[self.setting.ort_opt or "all"])
        so.log_severity_level = 3
        providers = ["CPUExecutionProvider"]
        if self.setting.device.startswith("cuda"):
            providers.insert(0, "CUDAExecutionProvider")
        self.path = self.artifacts.file_for(self.setting)
        self.session = ort.InferenceSession(self.path, so, providers=providers)
        self.input_name = self.session.get_inputs()[0].name

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: batch})[0]

    def _infer_all(self, batch: np.ndarray) -> list[np.ndarray]:
        return list(self.session.run(None, {self.input_name: batch}))

    def info(self) -> dict[str, Any]:
        graph = _onnx_float_types(self.path)
        eff = graph
        note = None
        if graph == "fp16" and self.setting.device == "cpu":
            note = "fp16 weights; ONNX Runtime's CPU provider computes most ops in fp32 via inserted casts"
        return {"backend": "onnxruntime", "version": self._ort.__version__,
                "providers": self.session.get_providers(), "precision_effective": eff,
                "threads": self.threads, "note": note,
                "properties": {"graph_optimization_level": self.setting.ort_opt or "all",
                               "graph_float_type": graph}}
