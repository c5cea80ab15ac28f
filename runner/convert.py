"""Model conversion on the driver, before the sweep: torch -> ONNX, ONNX fp16, int8 quantisation.

Each product is cached on disk under dmx's cache directory, keyed by a hash of the weights and
the conversion settings, so the second run of a spec converts nothing.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from matrix import ModelSpec

from .backends.base import ModelArtifacts
from .detection import DetectionConfig, config_from
from .models.base import ModelDef, Preprocess


class ConversionError(RuntimeError):
    """A model could not be converted (export failed); names the step and the library's message."""


def cache_dir() -> Path:
    """dmx's cache: ``$DMX_CACHE`` or ``~/.cache/dmx``."""
    root = Path(os.environ.get("DMX_CACHE") or Path.home() / ".cache" / "dmx")
    root.mkdir(parents=True, exist_ok=True)
    return root


@dataclass(frozen=True)
class ResolvedModel:
    """A spec's model made concrete: how to build it, feed it, and name its classes."""

    name: str
    task: str
    preprocess: Preprocess
    labels: tuple[str, ...] | None
    torch_factory: str | None
    weights: str | None
    onnx: str | None
    opset: int
    detection: DetectionConfig | None = None


def resolve_model(spec: ModelSpec) -> ResolvedModel:
    """Look up a built-in model or assemble a user one; raises ModelUnavailable/UnknownModel."""
    if spec.name:
        from .models import get_model
        d: ModelDef = get_model(spec.name)
        pre = d.preprocess
        if spec.input:
            pre = _preprocess_from(spec.input, default=pre)
        det = config_from(spec.detection, d.detection) if d.task == "detection" else None
        return ResolvedModel(d.name, d.task, pre, d.labels, f"builtin:{d.name}", d.weights_path,
                             d.onnx_path, spec.opset, det)
    labels = None
    if spec.labels:
        labels = tuple(Path(spec.labels).read_text(encoding="utf-8").splitlines())
    name = spec.torch or Path(spec.onnx or "model").stem
    det = config_from(spec.detection) if spec.task == "detection" else None
    return ResolvedModel(name, spec.task, _preprocess_from(spec.input or {}), labels, spec.torch,
                         spec.weights, spec.onnx, spec.opset, det)


def _preprocess_from(inp: dict[str, Any], default: Preprocess | None = None) -> Preprocess:
    size = int(inp.get("size", default.crop if default else 224))
    mode = inp.get("mode", default.mode if default else "resize-crop")
    resize = int(inp.get("resize", default.resize if default else round(size * 256 / 224)))
    mean = tuple(float(v) for v in inp.get("mean", default.mean if default else (0.485, 0.456, 0.406)))
    std = tuple(float(v) for v in inp.get("std", default.std if default else (0.229, 0.224, 0.225)))
    extra = {k: inp[k] if k == "channels" else float(inp[k])
             for k in ("pad", "scale", "channels") if k in inp}
    if default:
        extra = {"pad": default.pad, "scale": default.scale, "channels": default.channels, **extra}
    return Preprocess(mode=mode, resize=resize if mode == "resize-crop" else size, crop=size,
                      mean=mean, std=std, **extra)  # type: ignore[arg-type]


def onnx_batch_limit(path: str) -> int | None:
    """The batch size an ONNX file is fixed to (its first input's static first dimension), or None
    when the batch is dynamic: many detector exports are batch-1 only."""
    import onnx
    m = onnx.load(path, load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    first = next((i for i in m.graph.input if i.name not in inits), None)
    dims = first.type.tensor_type.shape.dim if first is not None else []
    return int(dims[0].dim_value) if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0 else None


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_digest(model: ResolvedModel, build: Callable[[], Any]) -> str:
    """Hash of the weights: the weights file when there is one, else the state dict's bytes."""
    if model.weights and os.path.isfile(model.weights):
        return _file_digest(model.weights)[:20]
    h = hashlib.sha256()
    for k, v in build().state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:20]


def _cached(key: str, filename: str, make: Callable[[Path], dict[str, Any]]) -> tuple[str, dict]:
    """Return the cached product ``filename`` for ``key``, making it (atomically) if absent."""
    target_dir = cache_dir() / "models" / key
    target = target_dir / filename
    meta_path = target_dir / (filename + ".json")
    if target.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        meta["cached"] = True
        return str(target), meta
    target_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target_dir))
    try:
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            meta = make(tmp / filename)
        meta["seconds"] = round(time.perf_counter() - t0, 2)
        meta["warnings"] = sorted({str(w.message).splitlines()[0][:200] for w in caught})[:20]
        for p in tmp.iterdir():  # the file and any sidecar (.bin for OpenVINO IR)
            os.replace(p, target_dir / p.name)
        meta_path.write_text(json.dumps(meta, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    meta["cached"] = False
    return str(target), meta


def export_onnx(model: ResolvedModel, digest: str, exporter: str = "onnx-dynamo") -> tuple[str, dict]:
    """torch -> ONNX with dynamic batch, cached by weights hash. ``onnx-dynamo`` is torch's
    default ``torch.export``-based exporter; ``onnx-legacy`` the TorchScript one (dynamo=False)."""
    import torch

    dynamo = exporter == "onnx-dynamo"
    key = f"{digest}-{exporter}-op{model.opset}-torch{torch.__version__}"

    def make(out: Path) -> dict[str, Any]:
        import contextlib
        import io
        import logging
        from .models.loading import build_torch_model
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

    return _cached(key, "model.onnx", make)


def openvino_from_torch(model: ResolvedModel, digest: str) -> tuple[str, dict]:
    """torch -> OpenVINO IR directly with ``openvino.convert_model`` (no ONNX in between)."""
    import openvino as ov
    import torch

    key = f"{digest}-ov-from-torch-ov{ov.__version__.split('-')[0]}-torch{torch.__version__}"

    def make(out: Path) -> dict[str, Any]:
        from .models.loading import build_torch_model
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

    return _cached(key, "model.xml", make)


def convert_fp16(onnx_path: str, digest: str) -> tuple[str, dict]:
    """fp32 ONNX -> fp16 weights/activations, fp32 inputs and outputs (``keep_io_types``)."""
    key = f"{digest}-{_file_digest(onnx_path)[:12]}-fp16"

    def make(out: Path) -> dict[str, Any]:
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16
        m = convert_float_to_float16(onnx.load(onnx_path), keep_io_types=True)
        onnx.save(m, str(out))
        return {"command": "onnxruntime.transformers.float16.convert_float_to_float16(keep_io_types=True)"}

    return _cached(key, "model-fp16.onnx", make)


def quantize_ort_int8(onnx_path: str, digest: str, calib: np.ndarray,
                      calib_ids: list[str]) -> tuple[str, dict]:
    """Static post-training quantisation for ONNX Runtime: QDQ, uint8 activations, per-channel
    int8 weights, after ``quant_pre_process``; calibrated on ``calib`` (N, 3, H, W)."""
    key = f"{digest}-{_file_digest(onnx_path)[:12]}-ortq-{hashlib.sha1(calib.tobytes()).hexdigest()[:12]}"

    def make(out: Path) -> dict[str, Any]:
        from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                              quantize_static)
        from onnxruntime.quantization.shape_inference import quant_pre_process

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.it = iter(calib[i: i + 1] for i in range(len(calib)))

            def get_next(self) -> dict | None:
                x = next(self.it, None)
                return None if x is None else {"input": x}

        pre = out.with_name("pre.onnx")
        quant_pre_process(onnx_path, str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        per_channel=True)
        pre.unlink()
        return {"command": "quant_pre_process + quantize_static(QDQ, QUInt8 activations, QInt8 "
                           "per-channel weights)", "calibration_images": calib_ids}

    return _cached(key, "model-int8.onnx", make)


def quantize_openvino_int8(src_path: str, digest: str, calib: np.ndarray,
                           calib_ids: list[str]) -> tuple[str, dict]:
    """Post-training int8 quantisation with NNCF on the OpenVINO model (saved as IR)."""
    key = f"{digest}-{_file_digest(src_path)[:12]}-nncf-{hashlib.sha1(calib.tobytes()).hexdigest()[:12]}"

    def make(out: Path) -> dict[str, Any]:
        import nncf
        import openvino as ov
        model = ov.Core().read_model(src_path)
        data = nncf.Dataset([calib[i: i + 1] for i in range(len(calib))])
        q = nncf.quantize(model, data, subset_size=len(calib))
        ov.save_model(q, str(out))
        return {"command": "nncf.quantize(openvino model, calibration dataset)",
                "nncf": nncf.__version__, "calibration_images": calib_ids}

    return _cached(key, "model-int8.xml", make)


ONNX_EXPORTERS = ("onnx-dynamo", "onnx-legacy")


def file_key(backend: str, precision: str, conversion: str | None) -> str:
    """Which model file a (backend, precision, conversion) runs; shared with the backends.

    onnxruntime: ``ort:<exporter>:<precision>``; openvino: ``ov:<source>`` for float precisions
    (the precision is a compile hint) and ``ov:<source>:int8`` for NNCF-quantised models.
    """
    if backend == "onnxruntime":
        return f"ort:{conversion or 'onnx-dynamo'}:{precision}"
    if backend == "openvino":
        source = {None: "onnx-dynamo", "openvino-from-onnx": "onnx-dynamo",
                  "openvino-from-torch": "torch"}.get(conversion, conversion)
        return f"ov:{source}" + (":int8" if precision == "int8" else "")
    return f"{backend}:{precision}"


def conversion_unsupported(backend: str, conversion: str | None) -> str | None:
    """A conversion level that means nothing for this backend (a skipped cell)."""
    if conversion is None:
        return None
    if backend == "onnxruntime" and conversion not in ONNX_EXPORTERS:
        return f"conversion {conversion} makes an OpenVINO model; onnxruntime runs ONNX (onnx-dynamo, onnx-legacy)"
    if backend == "torch":
        return "torch runs the eager model: conversion does not apply"
    return None


def prepare_artifacts(model: ResolvedModel, settings: Iterable[tuple[str, str, str | None]],
                      calibration: Callable[[], tuple[np.ndarray, list[str]]]) -> ModelArtifacts:
    """Make every model file the (backend, precision, conversion) settings need. A conversion
    that fails is recorded as the reason its cells are skipped, not raised."""
    settings = set(settings)
    files: dict[str, str] = {}
    notes: dict[str, Any] = {}
    from .models.loading import build_torch_model
    digest = "onnx-" + _file_digest(model.onnx)[:20] if model.onnx else \
        weights_digest(model, lambda: build_torch_model(model.torch_factory, model.weights))
    calib: list = []

    def calibration_once() -> tuple[np.ndarray, list[str]]:
        if not calib:
            calib.extend(calibration())
            notes["calibration_images"] = calib[1]
        return calib[0], calib[1]

    def base_onnx(exporter: str) -> str | None:
        key = f"onnx:{exporter}"
        if key not in files and key not in notes:
            if model.onnx:
                files[key], notes[key] = model.onnx, {"command": "user-supplied ONNX file"}
            elif model.torch_factory is None:
                notes[key] = "no torch model to export"
            else:
                try:
                    files[key], notes[key] = export_onnx(model, digest, exporter)
                except ConversionError as e:
                    notes[key] = str(e)
        return files.get(key)

    for backend, precision, conversion in sorted(settings, key=str):
        if backend not in ("onnxruntime", "openvino") or conversion_unsupported(backend, conversion):
            continue
        key = file_key(backend, precision, conversion)
        if key in files or key in notes:
            continue
        if backend == "openvino" and key.startswith("ov:torch"):
            try:
                src, notes["ov:torch"] = openvino_from_torch(model, digest)
                files["ov:torch"] = src
            except ConversionError as e:
                notes[key] = str(e)
                continue
        else:
            exporter = key.split(":")[1]
            src = base_onnx(exporter)
            if src is None:
                notes[key] = notes[f"onnx:{exporter}"]
                continue
        if backend == "onnxruntime":
            if precision == "fp32":
                files[key] = src
            elif precision == "fp16":
                files[key], notes[key] = convert_fp16(src, digest)
            elif precision == "int8":
                x, ids = calibration_once()
                files[key], notes[key] = quantize_ort_int8(src, digest, x, ids)
            else:
                notes[key] = f"onnxruntime's CPU provider has no {precision} kernels for this model"
        elif precision == "int8":
            try:
                import nncf  # noqa: F401
            except ImportError:
                notes[key] = "int8 on OpenVINO needs NNCF: pip install 'dmx[int8]'"
                continue
            x, ids = calibration_once()
            files[key], notes[key] = quantize_openvino_int8(src, digest, x, ids)
        else:
            files[key] = src
    return ModelArtifacts(name=model.name, task=model.task, torch_factory=model.torch_factory,
                          weights=model.weights, files=files, conversion_notes=notes,
                          input_shape=(3, model.preprocess.crop, model.preprocess.crop),
                          max_batch=onnx_batch_limit(model.onnx) if model.onnx else None)
