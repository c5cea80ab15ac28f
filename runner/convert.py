"""The model a spec names, made concrete, and its products made on the driver before the sweep.

``resolve_model`` turns a spec's model into a ``ResolvedModel``; ``prepare_artifacts`` asks each
cell's backend (``dmx.runner.backends``) which model product its setting runs and lets the backend
make it: the conversion code lives in the backend that needs it (ONNX export in
``backends/onnx_export.py``, fp16/int8 for ONNX Runtime in ``onnxruntime_backend.py``, OpenVINO
IR and NNCF in ``openvino_backend.py``...). Products are cached under dmx's cache directory,
keyed by ``conversion_digest`` - everything that goes into a conversion: the weights, the code of
the torch model, the input shape, the opset and the converting libraries' versions (the backends
add the exporter and their settings) - so the second run converts nothing, and an edited
``forward`` or a new input size converts again.
"""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from dmx.matrix import ModelSpec

from .backends import BACKENDS, InferSetting
from .backends.base import ConversionError, ModelArtifacts
from .backends.onnx_export import ONNX_EXPORTERS, export_onnx, onnx_batch_limit
from .cache import cache_dir, cached, file_digest, torch_version  # noqa: F401 - cache_dir: public name kept
from .detection import DetectionConfig, config_from
from .models.base import ModelDef, Preprocess

from .backends.onnxruntime_backend import convert_fp16, quantize_ort_int8  # noqa: E402,F401
from .backends.openvino_backend import openvino_from_torch, quantize_openvino_int8  # noqa: E402,F401

# Older names of what moved to the backends (kept for code that imports them from here).
_cached, _file_digest = cached, file_digest


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
    outputs: tuple[str, ...] | None = None
    compare_outputs: tuple[str, ...] | None = None

    def output_names(self, k: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
        """The names of the model's ``k`` outputs (``model.outputs``, else output0, output1, ...)
        and the positions whose divergence out_* and check judge (``model.compare_outputs``,
        else all). Raises ValueError (one line) when the spec's names do not fit ``k``."""
        names = self.outputs or tuple(f"output{i}" for i in range(k))
        if len(names) != k:
            raise ValueError(f"model.outputs names {len(names)} output(s) ({', '.join(names)}), "
                             f"but the model returned {k}")
        if not self.compare_outputs:
            return names, tuple(range(k))
        unknown = [n for n in self.compare_outputs if n not in names]
        if unknown:
            raise ValueError(f"model.compare_outputs names {unknown[0]!r}, not an output of the "
                             f"model ({', '.join(names)})")
        return names, tuple(i for i, n in enumerate(names) if n in self.compare_outputs)


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
                             d.onnx_path, spec.opset, det, spec.outputs, spec.compare_outputs)
    labels = None
    if spec.labels:
        labels = tuple(Path(spec.labels).read_text(encoding="utf-8").splitlines())
    name = spec.torch or Path(spec.onnx or "model").stem
    det = config_from(spec.detection) if spec.task == "detection" else None
    return ResolvedModel(name, spec.task, _preprocess_from(spec.input or {}), labels, spec.torch,
                         spec.weights, spec.onnx, spec.opset, det, spec.outputs, spec.compare_outputs)


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


def weights_digest(model: ResolvedModel, build: Callable[[], Any]) -> str:
    """Hash of the weights: the weights file when there is one, else the state dict's bytes."""
    if model.weights and os.path.isfile(model.weights):
        return _file_digest(model.weights)[:20]
    h = hashlib.sha256()
    for k, v in build().state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:20]


# The libraries that make model products: another version may make another file.
CONVERTERS = ("torch", "onnx", "onnxscript", "onnxruntime", "openvino", "nncf")


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def code_digest(model: ResolvedModel, net: Any) -> str:
    """Hash of the code that defines the torch model: the factory's module and the source file
    of every module class in ``net`` outside torch (torch's own version is keyed apart)."""
    return _code_digest(_code_files(model, net))


def _code_digest(files: Iterable[str]) -> str:
    return hashlib.sha256("".join(sorted(file_digest(f) for f in files)).encode()).hexdigest()[:20]


def _code_files(model: ResolvedModel, net: Any) -> list[str]:
    """The source files ``code_digest`` hashes."""
    import torch
    factory = model.torch_factory or ""
    if factory.startswith("builtin:"):
        from .models import get_model
        files = {inspect.getsourcefile(get_model(factory.split(":", 1)[1]).build)}
    else:
        found = importlib.util.find_spec(factory.split(":", 1)[0]) if factory else None
        files = {found.origin} if found is not None and found.origin else set()
    torch_dir = os.path.dirname(torch.__file__)
    for m in net.modules():
        try:
            files.add(inspect.getsourcefile(type(m)))
        except TypeError:   # a class without a source file (built in C)
            pass
    return sorted(f for f in files if f and os.path.isfile(f) and not f.startswith(torch_dir))


def conversion_digest(model: ResolvedModel, build: Callable[[], Any]) -> str:
    """The root of every cache key of the model's products: a user ONNX file's bytes, or the
    weights and the code of the torch model; plus the input shape, opset and the converting
    libraries' versions."""
    if model.onnx:
        root = {"onnx": file_digest(model.onnx)[:20]}
    else:
        root = _known_root(model)
        if root is None:
            net = build()
            files = _code_files(model, net)
            root = {"weights": weights_digest(model, lambda: net), "code": _code_digest(files)}
            _remember_root(model, files, root)
    pre = model.preprocess
    text = json.dumps({**root, "input": [getattr(pre, "channels", "rgb"), 3, pre.crop, pre.crop],
                       "opset": model.opset, "libraries": {d: _version(d) for d in CONVERTERS}},
                      sort_keys=True)
    return ("onnx-" if model.onnx else "") + hashlib.sha256(text.encode()).hexdigest()[:20]


def _root_record(model: ResolvedModel) -> Path | None:
    """Where the digest root of a built-in torch model is kept: it is a function of its code,
    its weights file and torch's version, so a later run need not import torch and build the
    network to know it (~2-3 s of CPU while Ray starts). A user's factory is built every time:
    nothing says its initialisation is deterministic."""
    factory = model.torch_factory or ""
    if not factory.startswith("builtin:"):
        return None
    from .models import get_model
    name = factory.split(":", 1)[1]
    # one record per installed copy of dmx: two checkouts sharing the cache may hold other code
    where = os.path.abspath(inspect.getsourcefile(get_model(name).build) or name)
    return cache_dir() / "digests" / f"{name}-{hashlib.sha256(where.encode()).hexdigest()[:16]}.json"


def _weights_stat(model: ResolvedModel) -> list | None:
    if not model.weights or not os.path.isfile(model.weights):
        return None
    st = os.stat(model.weights)
    return [os.path.abspath(model.weights), st.st_size, st.st_mtime_ns]


def _known_root(model: ResolvedModel) -> dict | None:
    """The remembered root (``_remember_root``) while torch's version, the weights file and
    every source file it hashed are unchanged; else None."""
    path = _root_record(model)
    try:
        rec = json.loads(path.read_text()) if path is not None else None
        if (rec is None or rec["torch"] != torch_version() or rec["weights"] != _weights_stat(model)
                or _code_digest(rec["files"]) != rec["root"]["code"]):
            return None
        return rec["root"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _remember_root(model: ResolvedModel, files: list[str], root: dict) -> None:
    path = _root_record(model)
    if path is None:
        return
    rec = {"torch": torch_version(), "weights": _weights_stat(model), "files": files, "root": root}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(rec))
        os.replace(tmp, path)
    except OSError:
        pass   # a cache that cannot be written costs the next run the build, nothing else


def conversion_root_known(model: ResolvedModel) -> bool:
    """Whether ``conversion_digest`` can answer without building the torch model."""
    return bool(model.onnx) or _known_root(model) is not None


def file_key(backend: str, precision: str, conversion: str | None) -> str:
    """Which model product a (backend, precision, conversion) runs (the backend's ``model_key``)."""
    setting = InferSetting(backend=backend, precision=precision, conversion=conversion)
    return BACKENDS[backend].model_key(setting) or f"{backend}:{precision}"


def conversion_unsupported(backend: str, conversion: str | None) -> str | None:
    """A conversion level that means nothing for this backend (a skipped cell), or None."""
    if conversion is None:
        return None
    axis = next((a for a in BACKENDS[backend].axes if a.name == "conversion"), None)
    if axis is None:
        return f"{backend}: conversion does not apply"
    if conversion not in axis.levels:
        return f"conversion {conversion} does not apply to {backend} (its levels: {', '.join(axis.levels)})"
    return None


class _Conversion:
    """The driver's side of ``dmx.runner.backends.Conversion``: the model, its weights digest, the
    ONNX exports and the calibration inputs, each made at most once per run."""

    def __init__(self, model: ResolvedModel, digest: str, files: dict[str, str],
                 notes: dict[str, Any], calibration: Callable[[], tuple[np.ndarray, list[str]]],
                 threads: int | None = None) -> None:
        self.model, self.digest, self.threads = model, digest, threads
        self._files, self._notes, self._calibration = files, notes, calibration
        self._calib: list = []

    def onnx(self, exporter: str) -> str:
        key = f"onnx:{exporter}"
        if key not in self._files and key not in self._notes:
            if self.model.onnx:
                self._files[key], self._notes[key] = self.model.onnx, {"command": "user-supplied ONNX file"}
            elif self.model.torch_factory is None:
                self._notes[key] = "no torch model to export"
            elif exporter not in ONNX_EXPORTERS:
                self._notes[key] = f"unknown ONNX exporter {exporter!r}"
            else:
                try:
                    self._files[key], self._notes[key] = export_onnx(self.model, self.digest, exporter)
                except ConversionError as e:
                    self._notes[key] = str(e)
        if key not in self._files:
            raise ConversionError(self._notes[key])
        return self._files[key]

    def calibration(self) -> tuple[np.ndarray, list[str]]:
        if not self._calib:
            self._calib.extend(self._calibration())
            self._notes["calibration_images"] = self._calib[1]
        return self._calib[0], self._calib[1]


def prepare_artifacts(model: ResolvedModel,
                      settings: Iterable[InferSetting | tuple[str, str, str | None]],
                      calibration: Callable[[], tuple[np.ndarray, list[str]]],
                      threads: int | None = None) -> ModelArtifacts:
    """Make every model product the settings need (each an ``InferSetting``, or the older
    ``(backend, precision, conversion)`` triple), by asking each setting's backend. A product
    that cannot be made is recorded as the reason its cells are skipped, not raised.
    ``threads``: the workers' intra-op threads where a setting names none (a compile for
    another thread count is another product)."""
    wanted = {s if isinstance(s, InferSetting) else
              InferSetting(backend=s[0], precision=s[1], conversion=s[2]) for s in settings}
    files: dict[str, str] = {}
    notes: dict[str, Any] = {}
    from .models.loading import build_torch_model
    digest = conversion_digest(model, lambda: build_torch_model(model.torch_factory, model.weights))
    conv = _Conversion(model, digest, files, notes, calibration, threads)
    for setting in sorted(wanted, key=repr):
        backend = BACKENDS.get(setting.backend)
        if backend is None:
            continue
        key = backend.model_key(setting)
        if key is None or key in files or key in notes:
            continue
        if backend.version() is None:
            continue      # the library is missing: ``unsupported`` says so per cell
        reason = _level_unsupported(backend, setting)
        if reason:
            continue      # ditto: a level this backend lacks is a skip reason, not a product
        try:
            files[key], note = backend.make_model(setting, conv)
            if note is not None:
                notes[key] = note
        except ConversionError as e:
            notes[key] = str(e)
    return ModelArtifacts(name=model.name, task=model.task, torch_factory=model.torch_factory,
                          weights=model.weights, files=files, conversion_notes=notes,
                          input_shape=(3, model.preprocess.crop, model.preprocess.crop),
                          max_batch=onnx_batch_limit(model.onnx) if model.onnx else None,
                          digest=digest)


def _level_unsupported(backend: type, setting: InferSetting) -> str | None:
    """A precision or a backend-axis level this backend has no path for."""
    if setting.precision not in backend.precisions:
        return "precision"
    return next((a.name for a in backend.axes
                 if getattr(setting, a.name) is not None and getattr(setting, a.name) not in a.levels), None)
