"""ONNX Runtime (CPU provider; CUDA where present): fp32, fp16 (converted graph) and int8
(static QDQ) models, made from the ONNX export and cached; ``ort_opt`` sets the graph
optimisation level."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dmx.matrix.axes import INFER, Axis
from dmx.runner.cache import cache_dir, cached, file_digest

from .base import BackendRunner, Conversion, InferSetting, ModelArtifacts
from .onnx_export import ONNX_EXPORTERS

if TYPE_CHECKING:
    import numpy as np   # imported where used: `import dmx.runner.backends` stays cheap

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


_FLOAT_TYPES = ("fp32", "fp16", "bf16", "int8")


def graph_float_type(path: str) -> str:
    """``_onnx_float_types``, remembered in dmx's cache per file (its path, size and mtime):
    reading it needs the ``onnx`` package, whose import cost every worker ~0.7 s of its first
    chunk for a fact that stays the same until the file changes."""
    st = os.stat(path)
    key = hashlib.sha256(f"{os.path.realpath(path)}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    memo = cache_dir() / "graph-float-types" / f"{key.hexdigest()[:32]}.txt"
    try:
        known = memo.read_text(encoding="utf-8").strip()
        if known in _FLOAT_TYPES:
            return known
    except OSError:
        pass
    found = _onnx_float_types(path)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f".{memo.name}.{os.getpid()}.tmp")
        tmp.write_text(found, encoding="utf-8")
        os.replace(tmp, memo)
    except OSError:   # a read-only cache: computed again next time
        pass
    return found


def convert_fp16(onnx_path: str, digest: str) -> tuple[str, dict]:
    """fp32 ONNX -> fp16 weights/activations, fp32 inputs and outputs (``keep_io_types``)."""
    key = f"{digest}-{file_digest(onnx_path)[:12]}-fp16"

    def make(out: Path) -> dict[str, Any]:
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16
        m = convert_float_to_float16(onnx.load(onnx_path), keep_io_types=True)
        onnx.save(m, str(out))
        return {"command": "onnxruntime.transformers.float16.convert_float_to_float16(keep_io_types=True)"}

    return cached(key, "model-fp16.onnx", make)


def quantize_ort_int8(onnx_path: str, digest: str, calib: np.ndarray,
                      calib_ids: list[str]) -> tuple[str, dict]:
    """Static post-training quantisation for ONNX Runtime: QDQ, uint8 activations, per-channel
    int8 weights, after ``quant_pre_process``; calibrated on ``calib`` (N, 3, H, W)."""
    key = f"{digest}-{file_digest(onnx_path)[:12]}-ortq-{hashlib.sha1(calib.tobytes()).hexdigest()[:12]}"

    def make(out: Path) -> dict[str, Any]:
        from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                              quantize_static)
        from onnxruntime.quantization.shape_inference import quant_pre_process

        name = _input_name(onnx_path)

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.it = iter(calib[i: i + 1] for i in range(len(calib)))

            def get_next(self) -> dict | None:
                x = next(self.it, None)
                return None if x is None else {name: x}

        pre = out.with_name("pre.onnx")
        quant_pre_process(onnx_path, str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        per_channel=True)
        pre.unlink()
        return {"command": "quant_pre_process + quantize_static(QDQ, QUInt8 activations, QInt8 "
                           "per-channel weights)", "calibration_images": calib_ids}

    return cached(key, "model-int8.onnx", make)


def _input_name(onnx_path: str) -> str:
    """The model's image input: its first graph input that is not a weight (a user's ONNX file
    names it as it likes: ``pixel_values``, ``images``, ...)."""
    import onnx
    graph = onnx.load(onnx_path, load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    return next(i.name for i in graph.input if i.name not in weights)


class OnnxRuntimeRunner(BackendRunner):
    name = "onnxruntime"
    precisions = ("fp32", "fp16", "int8")
    axes = (
        Axis("ort_opt", INFER, tuple(_OPT), "ONNX Runtime graph optimisation level", rank=11),
        Axis("conversion", INFER, ONNX_EXPORTERS,
             "how the backend's model was made: torch's dynamo or legacy ONNX exporter, or "
             "OpenVINO from ONNX / straight from torch", rank=12),
    )

    @classmethod
    def version(cls) -> str | None:
        try:
            import onnxruntime
        except ImportError:
            return None
        return onnxruntime.__version__

    @classmethod
    def model_key(cls, setting: InferSetting) -> str:
        return f"ort:{setting.conversion or 'onnx-dynamo'}:{setting.precision}"

    @classmethod
    def make_model(cls, setting: InferSetting, conv: Conversion) -> tuple[str, dict[str, Any] | None]:
        src = conv.onnx(setting.conversion or "onnx-dynamo")
        if setting.precision == "fp16":
            return convert_fp16(src, conv.digest)
        if setting.precision == "int8":
            x, ids = conv.calibration()
            return quantize_ort_int8(src, conv.digest, x, ids)
        return src, None      # fp32 runs the export itself (its notes are under onnx:<exporter>)

    @classmethod
    def unsupported(cls, artifacts: ModelArtifacts, setting: InferSetting) -> str | None:
        if setting.device != "cpu" and cls.version() is not None:
            import onnxruntime as ort
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                return f"device {setting.device}: onnxruntime has no CUDAExecutionProvider here"
        if setting.precision == "bf16":
            return "onnxruntime's CPU provider has no bf16 kernels for this model"
        return super().unsupported(artifacts, setting)

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

    def _infer_all(self, batch: np.ndarray) -> list[np.ndarray]:
        return list(self.session.run(None, {self.input_name: batch}))

    def _deactivate(self) -> None:
        del self.session

    def info(self) -> dict[str, Any]:
        graph = graph_float_type(self.path)
        note = None
        if graph == "fp16" and self.setting.device == "cpu":
            note = "fp16 weights; ONNX Runtime's CPU provider computes most ops in fp32 via inserted casts"
        return {"backend": "onnxruntime", "version": self._ort.__version__,
                "providers": self.session.get_providers(), "precision_effective": graph,
                "threads": self.threads, "note": note,
                "properties": {"graph_optimization_level": self.setting.ort_opt or "all",
                               "graph_float_type": graph}}
