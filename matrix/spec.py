"""The matrix spec: YAML in, a validated frozen ``Spec`` out.

Everything in a spec is data except ``model.torch`` (``"pkg.module:factory"``), which names code
to import: a spec that uses it is trusted configuration.
"""
from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from .axes import AXES, AXIS_ORDER
from .errors import SpecError
from .levels import _reject_unknown, normalise_level
from .schema import validate_spec_data
from .yamlsafe import LIMITS, load_yaml_bounded

DEFAULT_MAX_CELLS = 100_000

TOP_KEYS = ("name", "dataset", "model", "axes", "include", "exclude", "reference",
            "calibration", "check")
DATASET_KEYS = ("path", "limit", "labels")
LABELS_KEYS = ("path", "format", "by", "index_base", "meta_mat", "match")
MODEL_KEYS = ("name", "torch", "weights", "onnx", "input", "task", "opset", "labels", "detection")
INPUT_KEYS = ("mode", "resize", "size", "mean", "std", "pad", "scale", "channels")
INPUT_MODES = ("resize-crop", "stretch", "letterbox", "letterbox-center")
TASKS = ("classification", "detection", "tensor")
DETECTION_LAYOUTS = ("yolox", "yolov5", "yolo", "yolo-transposed", "boxes-scores")
DETECTION_KEYS = ("layout", "decoder", "strides", "score_threshold", "nms_iou", "class_agnostic",
                  "nms_plus_one", "max_detections", "rank_k", "match_iou", "same_iou", "same_score")
_FRACTIONS = ("score_threshold", "nms_iou", "match_iou", "same_iou", "same_score")


@dataclass(frozen=True)
class LabelsSpec:
    """Ground truth of a classifier (``dataset.labels``). ``path`` and ``meta_mat`` are
    resolved against the spec's folder (``path`` is None for ``imagefolder``); the other
    fields say how to read the file (``runner.labels.read_labels``, ``attach``)."""

    path: str | None
    format: str = "auto"
    by: str = "auto"
    index_base: int = 0
    meta_mat: str | None = None
    match: str = "auto"


@dataclass(frozen=True)
class DatasetSpec:
    """Where the images are: a folder (recursive), a glob, or a text/CSV manifest of paths;
    ``labels``, their ground truth where the spec gives one."""

    path: str
    limit: int | None
    base_dir: str
    labels: LabelsSpec | None = None


@dataclass(frozen=True)
class ModelSpec:
    """A built-in model name, or user artifacts: a torch factory and/or an ONNX file."""

    name: str | None = None
    torch: str | None = None
    weights: str | None = None
    onnx: str | None = None
    input: Mapping[str, Any] | None = None
    task: str = "classification"
    opset: int = 18
    labels: str | None = None
    detection: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Spec:
    name: str
    dataset: DatasetSpec
    model: ModelSpec
    axes: tuple[tuple[str, tuple[str, ...]], ...]
    include: tuple[Mapping[str, str], ...]
    exclude: tuple[Mapping[str, str], ...]
    reference: Mapping[str, str]
    calibration_limit: int
    check: Mapping[str, Any]
    raw: Mapping[str, Any] = field(repr=False)
    # Not part of the spec's identity (digest): a guard against matrices nobody meant to run.
    max_cells: int = field(default=DEFAULT_MAX_CELLS, compare=False)

    @property
    def axis_names(self) -> tuple[str, ...]:
        return tuple(a for a, _ in self.axes)

    def levels(self, axis: str) -> tuple[str, ...]:
        return dict(self.axes)[axis]

    @property
    def digest(self) -> str:
        """Stable hash of the normalised spec: a run directory belongs to exactly one."""
        blob = json.dumps(self.raw, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def load_spec(path: str | Path, overrides: Iterable[str] = (),
              max_cells: int = DEFAULT_MAX_CELLS) -> Spec:
    """Read a YAML spec file (bounded, safe), apply ``key=value`` overrides, validate."""
    p = Path(path)
    if not p.is_file():
        raise SpecError("", f"spec file not found: {path}")
    with open(p, "rb") as f:  # read one byte past the limit: a huge file is never read whole
        data = f.read(LIMITS.max_bytes + 1)
    raw = load_yaml_bounded(data, str(path))
    return parse_spec(raw, base_dir=str(p.resolve().parent), overrides=overrides,
                      max_cells=max_cells)


def parse_spec(raw: Any, base_dir: str = ".", overrides: Iterable[str] = (),
               max_cells: int = DEFAULT_MAX_CELLS) -> Spec:
    """Validate a spec given as plain data (the parsed YAML)."""
    if not isinstance(raw, dict):
        raise SpecError("", "a spec must be a YAML mapping with keys " + ", ".join(TOP_KEYS))
    raw = copy.deepcopy(raw)
    for ov in overrides:
        apply_override(raw, ov)
    validate_spec_data(raw)  # structure and types; below: what depends on several keys
    raw = json.loads(json.dumps(raw))  # plain JSON types only: the digest hashes this
    name = raw.get("name", "dmx-run")
    if not isinstance(name, str) or not name:
        raise SpecError("name", "must be a non-empty string")
    dataset = _parse_dataset(raw.get("dataset"), base_dir)
    model = _parse_model(raw.get("model"), base_dir)
    axes = _parse_axes(raw.get("axes"))
    include = tuple(_parse_partial(f"include[{i}]", c, axes) for i, c in
                    enumerate(_as_list("include", raw.get("include"))))
    exclude = tuple(_parse_partial(f"exclude[{i}]", c, axes) for i, c in
                    enumerate(_as_list("exclude", raw.get("exclude"))))
    reference = _parse_partial("reference", raw.get("reference") or {}, axes)
    calibration = raw.get("calibration") or {}
    if not isinstance(calibration, dict):
        raise SpecError("calibration", "must be a mapping like {limit: 16}")
    _reject_unknown("calibration", calibration, ("limit",))
    cal_limit = _positive_int("calibration.limit", calibration.get("limit", 16))
    check = raw.get("check") or {}
    if not isinstance(check, dict):
        raise SpecError("check", "must be a mapping of metric tolerances")
    normalised = {
        "name": name,
        # labels only when given: the digest of a spec without them stays what it was
        "dataset": {"path": dataset.path, "limit": dataset.limit,
                    **({"labels": _labels_raw(raw["dataset"])} if dataset.labels else {})},
        "model": {k: v for k, v in model.__dict__.items() if v is not None},
        "axes": {a: list(v) for a, v in axes},
        "include": [dict(c) for c in include],
        "exclude": [dict(c) for c in exclude],
        "reference": dict(reference),
        "calibration": {"limit": cal_limit},
        "check": check,
    }
    return Spec(name, dataset, model, axes, include, exclude, reference, cal_limit, check,
                normalised, max_cells=max_cells)


def apply_override(raw: dict, text: str) -> None:
    """Apply one Hydra-style override: ``backend=torch,openvino``, ``dataset.limit=10``."""
    if "=" not in text:
        raise SpecError("-o", f"override {text!r} must look like key=value (e.g. backend=torch,openvino)")
    key, value = text.split("=", 1)
    key = key.strip().lstrip("+")
    if key in AXES:
        key = f"axes.{key}"
    parts = key.split(".")
    if parts[0] not in TOP_KEYS:
        raise SpecError(key, f"unknown key; allowed: {', '.join(TOP_KEYS)} or an axis "
                             f"({', '.join(AXIS_ORDER)})")
    if parts[0] == "axes" and len(parts) == 2:
        # split on commas outside [...]: pil[pillow>=9,<10] is one level
        items = re.findall(r"(?:[^,\[]|\[[^\]]*\])+", value)
        parsed: Any = [_scalar(v) for v in items if v.strip()]
    else:
        parsed = _scalar(value)
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {} if child is None else {"name": child} if part == "model" else None
            if child is None:
                raise SpecError(key, f"cannot set a field of {part!r}, which is not a mapping")
            node[part] = child
        node = child
    node[parts[-1]] = parsed


def _scalar(text: str) -> Any:
    try:
        return load_yaml_bounded(text.strip().encode("utf-8", "surrogateescape"), "override")
    except SpecError:
        return text.strip()





def _as_list(key: str, v: Any) -> list:
    if v is None:
        return []
    if not isinstance(v, list):
        raise SpecError(key, "must be a list of mappings axis: level")
    return v


def _positive_int(key: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise SpecError(key, f"must be a positive integer, got {v!r}")
    return v


def _parse_dataset(d: Any, base_dir: str) -> DatasetSpec:
    if d is None:
        raise SpecError("dataset", "missing; give {path: images/} (a folder, a glob or a manifest)")
    if isinstance(d, str):
        d = {"path": d}
    if not isinstance(d, dict):
        raise SpecError("dataset", "must be a mapping {path: ..., limit: N}")
    _reject_unknown("dataset", d, DATASET_KEYS)
    path = d.get("path")
    if not isinstance(path, str) or not path:
        raise SpecError("dataset.path", "missing; a folder, a glob (** recursive) or a .txt/.csv manifest")
    limit = d.get("limit")
    if limit is not None:
        limit = _positive_int("dataset.limit", limit)
    return DatasetSpec(path=path, limit=limit, base_dir=base_dir,
                       labels=_parse_labels(d.get("labels"), base_dir))


def _labels_raw(d: Any) -> dict[str, Any]:
    """``dataset.labels`` as written, in its mapping form (the digest hashes it)."""
    v = d.get("labels") if isinstance(d, dict) else None
    return {"path": v} if isinstance(v, str) else dict(v)


def _parse_labels(v: Any, base_dir: str) -> LabelsSpec | None:
    """``dataset.labels``: a path, or {path, format, by, index_base, meta_mat, match}; the
    files must exist (relative paths are the spec's folder's)."""
    if v is None:
        return None
    if isinstance(v, str):
        v = {"path": v}
    if not isinstance(v, dict):
        raise SpecError("dataset.labels", "must be a labels file path or a mapping "
                                          "{" + ", ".join(LABELS_KEYS) + "}")
    _reject_unknown("dataset.labels", v, LABELS_KEYS)

    def existing(key: str) -> str | None:
        if v.get(key) is None:
            return None
        p = (Path(base_dir) / str(v[key])).resolve()
        if not p.is_file():
            raise SpecError(f"dataset.labels.{key}", f"file not found: {v[key]} (looked in {p})")
        return str(p)
    fmt = v.get("format") or "auto"
    if fmt != "imagefolder" and not v.get("path"):
        raise SpecError("dataset.labels.path", "missing; give the labels file (or format: "
                                               "imagefolder for class folders)")
    return LabelsSpec(path=existing("path"), format=fmt, by=v.get("by") or "auto",
                      index_base=int(v.get("index_base") or 0), meta_mat=existing("meta_mat"),
                      match=v.get("match") or "auto")


def _parse_model(m: Any, base_dir: str) -> ModelSpec:
    if m is None:
        raise SpecError("model", "missing; a built-in name (mobilenet_v2, efficientnet_lite0) or "
                                 "{torch: pkg.mod:factory, input: {...}} or {onnx: file.onnx, input: {...}}")
    if isinstance(m, str):
        m = {"name": m}
    if not isinstance(m, dict):
        raise SpecError("model", "must be a built-in name or a mapping")
    _reject_unknown("model", m, MODEL_KEYS)
    kinds = [k for k in ("name", "torch", "onnx") if m.get(k)]
    if not kinds:
        raise SpecError("model", "give one of name (built-in), torch (pkg.mod:factory) or onnx (file)")
    if "name" in kinds and len(kinds) > 1:
        raise SpecError("model", "a built-in name cannot be combined with torch/onnx artifacts")
    if m.get("torch") and not re.match(r"^[\w.]+:\w+$", str(m["torch"])):
        raise SpecError("model.torch", f"must look like package.module:factory, got {m['torch']!r}")
    task = m.get("task", "classification")
    if task not in TASKS:
        raise SpecError("model.task", f"unknown task {task!r}; allowed: {', '.join(TASKS)}")
    inp = m.get("input")
    if inp is not None:
        if not isinstance(inp, dict):
            raise SpecError("model.input", "must be a mapping {size, resize, mode, mean, std}")
        _reject_unknown("model.input", inp, INPUT_KEYS)
        _check_input(inp)
    detection = _parse_detection(m.get("detection"), needed=task == "detection" and not m.get("name"))
    if not m.get("name") and inp is None:
        raise SpecError("model.input", "a torch/onnx model needs input: {size: 224, mode: "
                                       "resize-crop|stretch|letterbox|letterbox-center, resize: 256, mean: [...], "
                                       "std: [...]}")

    def rel(p: Any) -> str | None:
        return None if p is None else str((Path(base_dir) / str(p)).resolve())

    onnx_path = rel(m.get("onnx"))
    if onnx_path and not Path(onnx_path).is_file():
        raise SpecError("model.onnx", f"file not found: {m['onnx']}")
    opset = m.get("opset", 18)
    if not isinstance(opset, int) or not 7 <= opset <= 23:
        raise SpecError("model.opset", f"must be an integer ONNX opset 7-23, got {opset!r}")
    return ModelSpec(name=m.get("name"), torch=m.get("torch"), weights=rel(m.get("weights")),
                     onnx=onnx_path, input=inp, task=task, opset=opset, labels=rel(m.get("labels")),
                     detection=detection)


def _check_input(inp: Mapping[str, Any]) -> None:
    if "mode" in inp and inp["mode"] not in INPUT_MODES:
        raise SpecError("model.input.mode", f"unknown mode {inp['mode']!r}; allowed: {', '.join(INPUT_MODES)}")
    if "channels" in inp and inp["channels"] not in ("rgb", "bgr"):
        raise SpecError("model.input.channels", f"must be rgb or bgr (the order the model expects), "
                                                f"got {inp['channels']!r}")
    pad = inp.get("pad", 0)
    if isinstance(pad, bool) or not isinstance(pad, (int, float)) or not 0 <= pad <= 255:
        raise SpecError("model.input.pad", f"letterbox pad value on the 0-255 scale, got {pad!r}")
    scale = inp.get("scale", 1)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale <= 0:
        raise SpecError("model.input.scale", f"pixels are divided by scale (255 for 0-1 inputs, 1 for "
                                             f"raw 0-255 inputs), got {scale!r}")


def _parse_detection(d: Any, needed: bool) -> dict[str, Any] | None:
    """``model.detection``: the output layout (or a user decoder) and the post-processing and
    comparison thresholds; every key but layout/decoder has a documented default."""
    if d is None:
        if needed:
            raise SpecError("model.detection", "a detection model needs {layout: "
                            + "|".join(DETECTION_LAYOUTS) + "} or {decoder: pkg.module:function}")
        return None
    if not isinstance(d, dict):
        raise SpecError("model.detection", "must be a mapping {layout: ..., score_threshold: ...}")
    _reject_unknown("model.detection", d, DETECTION_KEYS)
    if d.get("layout") is not None and d["layout"] not in DETECTION_LAYOUTS:
        raise SpecError("model.detection.layout", f"unknown layout {d['layout']!r}; allowed: "
                                                  f"{', '.join(DETECTION_LAYOUTS)}")
    if d.get("decoder") is not None and not re.match(r"^[\w.]+:\w+$", str(d["decoder"])):
        raise SpecError("model.detection.decoder", f"must look like package.module:function, got {d['decoder']!r}")
    if needed and not d.get("layout") and not d.get("decoder"):
        raise SpecError("model.detection", "give layout (" + ", ".join(DETECTION_LAYOUTS)
                        + ") or decoder (pkg.module:function)")
    for k in _FRACTIONS:
        v = d.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1):
            raise SpecError(f"model.detection.{k}", f"must be a number from 0 to 1, got {v!r}")
    for k in ("max_detections", "rank_k"):
        if d.get(k) is not None:
            _positive_int(f"model.detection.{k}", d[k])
    strides = d.get("strides")
    if strides is not None and (not isinstance(strides, list) or not strides
                                or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in strides)):
        raise SpecError("model.detection.strides", f"must be a list of positive integers like [8, 16, 32], "
                                                   f"got {strides!r}")
    for k in ("class_agnostic", "nms_plus_one"):
        if d.get(k) is not None and not isinstance(d[k], bool):
            raise SpecError(f"model.detection.{k}", f"must be true or false, got {d[k]!r}")
    return dict(d)


def _parse_axes(a: Any) -> tuple[tuple[str, tuple[str, ...]], ...]:
    if not isinstance(a, dict) or not a:
        raise SpecError("axes", "missing; a mapping axis -> list of levels, axes: "
                                + ", ".join(AXIS_ORDER))
    out = []
    for axis in a:
        if axis not in AXES:
            raise SpecError(f"axes.{axis}", f"unknown axis; allowed: {', '.join(AXIS_ORDER)}")
    for axis in AXIS_ORDER:  # canonical order, whatever order the YAML used
        if axis not in a:
            continue
        levels = a[axis] if isinstance(a[axis], list) else [a[axis]]
        if not levels:
            raise SpecError(f"axes.{axis}", "needs at least one level")
        norm = tuple(normalise_level(axis, lv, f"axes.{axis}") for lv in levels)
        if len(set(norm)) != len(norm):
            raise SpecError(f"axes.{axis}", f"a level is listed twice: {list(norm)}")
        out.append((axis, norm))
    return tuple(out)


def _parse_partial(key: str, c: Any, axes: tuple[tuple[str, tuple[str, ...]], ...]) -> dict[str, str]:
    if not isinstance(c, dict):
        raise SpecError(key, "must be a mapping axis: level")
    known = dict(axes)
    out = {}
    for axis, level in c.items():
        if axis not in known:
            raise SpecError(f"{key}.{axis}", f"not an axis of this spec; axes: {', '.join(known)}")
        norm = normalise_level(axis, level, f"{key}.{axis}")
        if norm not in known[axis]:
            raise SpecError(f"{key}.{axis}", f"level {norm!r} is not in axes.{axis}; "
                                              f"allowed: {', '.join(known[axis])}")
        out[axis] = norm
    return out
