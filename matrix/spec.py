"""The matrix spec: YAML in, a validated frozen ``Spec`` out. Parsing, validation, defaults
and error messages are the one pydantic model's (``schema``); here the spec is read, overridden
and held as dataclasses.

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

from . import schema
from .axes import AXES, AXIS_ORDER
from .errors import SpecError
from .schema import DETECTION_LAYOUTS, resolve, validate_spec_data  # noqa: F401 (dmx.runner.detection)
from .yamlsafe import LIMITS, load_yaml_bounded

DEFAULT_MAX_CELLS = 100_000

#: The spec's top-level keys (overrides may set only these, or an axis).
TOP_KEYS = ("name", "dataset", "model", "axes", "include", "exclude", "reference",
            "calibration", "check")


@dataclass(frozen=True)
class LabelsSpec:
    """Ground truth of a classifier (``dataset.labels``). ``path`` and ``meta_mat`` are
    resolved against the spec's folder (``path`` is None for ``imagefolder``); the other
    fields say how to read the file (``dmx.runner.labels.read_labels``, ``attach``)."""

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
    outputs: tuple[str, ...] | None = None           # names of the outputs, in output order
    compare_outputs: tuple[str, ...] | None = None   # the outputs out_* and check judge


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
    """Validate a spec given as plain data (the parsed YAML) against the one model
    (``schema``), then hold it as frozen dataclasses; paths are resolved against ``base_dir``."""
    if not isinstance(raw, dict):
        raise SpecError("", "a spec must be a YAML mapping with keys " + ", ".join(TOP_KEYS))
    raw = copy.deepcopy(raw)
    for ov in overrides:
        apply_override(raw, ov)
    m = validate_spec_data(raw, base_dir)
    raw = json.loads(json.dumps(raw))  # plain JSON types only: the digest hashes this
    dataset = DatasetSpec(path=m.dataset.path, limit=m.dataset.limit, base_dir=base_dir,
                          labels=_labels(m.dataset.labels, base_dir))
    model = _model(m.model, raw["model"], base_dir)
    axes = tuple((a, getattr(m.axes, a)) for a in AXIS_ORDER if getattr(m.axes, a) is not None)
    include, exclude = (tuple(_cell(c, w) for c, w in zip(getattr(m, k) or (), raw.get(k) or ()))
                        for k in ("include", "exclude"))
    reference = _cell(m.reference, raw.get("reference") or {})
    cal_limit = (m.calibration or schema.Calibration()).limit
    check = raw.get("check") or {}
    normalised = {
        "name": m.name,
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
    return Spec(m.name, dataset, model, axes, include, exclude, reference, cal_limit,
                check, normalised, max_cells=max_cells)


def _cell(cell: Any, written: Mapping[str, Any]) -> dict[str, str]:
    """A partial cell's canonical levels, in the order the spec writes its axes."""
    return {a: getattr(cell, a) for a in written} if cell is not None else {}


def _labels(v: Any, base_dir: str) -> LabelsSpec | None:
    if v is None:
        return None
    return LabelsSpec(path=v.path and resolve(base_dir, v.path), format=v.value("format"),
                      by=v.value("by"), index_base=v.value("index_base"),
                      meta_mat=v.meta_mat and resolve(base_dir, v.meta_mat), match=v.value("match"))


def _model(m: Any, written: Any, base_dir: str) -> ModelSpec:
    written = {"name": written} if isinstance(written, str) else written

    def rel(p: Any) -> str | None:
        return None if p is None else resolve(base_dir, p)
    return ModelSpec(name=m.name, torch=m.torch, weights=rel(m.weights), onnx=rel(m.onnx),
                     input=written.get("input"), task=m.value("task"), opset=m.value("opset"),
                     labels=rel(m.labels), detection=written.get("detection"),
                     outputs=tuple(m.outputs) if m.outputs else None,
                     compare_outputs=tuple(m.compare_outputs) if m.compare_outputs else None)


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


def _labels_raw(d: Any) -> dict[str, Any]:
    """``dataset.labels`` as written, in its mapping form (the digest hashes it)."""
    v = d.get("labels") if isinstance(d, dict) else None
    return {"path": v} if isinstance(v, str) else dict(v)
