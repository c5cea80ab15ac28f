"""The spec's one model: pydantic models built from the axis registry, and their JSON Schema.

Parsing, validation, defaults, error messages and the JSON Schema (``dmx schema``, the docs'
spec reference) all come from here. The models check structure and types (every key known,
every value of the right kind and within its bounds) and make levels canonical with
``normalise_level``, so the registry in ``axes.AXES`` stays the one list of axes and levels - an
axis added there (or declared by a backend) is in the schema, the error messages and the JSON
Schema with no edit here. What depends on several keys (a reference level that must be one of
the axis's, a file relative to the spec's folder) is checked once the whole spec has its types.
``validate_spec_data`` turns pydantic's first error into a ``SpecError`` naming the key (dotted,
``include[0].decoder``) and what is allowed. A key given as null is unset (its default), except
where null is no value at all (``name``, ``model.task``, a level, ...): there it is refused.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Optional

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, ValidationError,
                      ValidationInfo, WithJsonSchema, create_model, model_validator)
from pydantic_core import PydanticCustomError
from typing_extensions import Annotated

from .axes import AXES, AXIS_ORDER, Axis
from .errors import SpecError
from .levels import DEFAULT_INTEGER_CAP, INTEGER_CAPS, normalise_level

INPUT_MODES = ("resize-crop", "stretch", "letterbox", "letterbox-center")
TASKS = ("classification", "detection", "tensor")
DETECTION_LAYOUTS = ("yolox", "yolov5", "yolo", "yolo-transposed", "boxes-scores")
SCOPES = ("all", "same-input")
# Ground truth (dataset.labels); runner/labels.py and runner/label_classes.py read them and hold
# the same tuples (tests/test_accuracy_spec.py keeps them equal: matrix/ imports nothing above it).
LABEL_FORMATS = ("auto", "csv", "pairs", "imagenet-solution", "imagenet-index", "imagefolder",
                 "coco", "yolo")
LABEL_BY = ("auto", "index", "name", "synset")
LABEL_MATCHES = ("auto", "id", "name", "stem")

# Bounds with the reason a user sees when they pass one.
MAX_INPUT_SIZE = 8192   # px per side: 8192^2 x 3 float32 is 0.8 GB per image before batching
MAX_LEVELS = 1000       # levels per axis; the cell limit bounds the product anyway
MAX_LIMIT = 10**9       # images
_FACTORY = r"^[\w.]+:\w+$"

_DATASET_HINT = "give {path: images/} (a folder, a glob or a .txt/.csv manifest)"
_MODEL_HINT = ("a built-in name (mobilenet_v2, efficientnet_lite0) or {torch: pkg.mod:factory, "
               "input: {...}} or {onnx: file.onnx, input: {...}}")


def _fail(kind: str, message: str, **ctx: Any) -> PydanticCustomError:
    # pydantic formats the message with the context only when there is one: escape braces then
    return PydanticCustomError(kind, message.replace("{", "{{").replace("}", "}}") if ctx
                               else message, ctx or None)


def _no_null(message: str) -> BeforeValidator:
    """A key that has a value whenever it is written: null is refused with ``message``, not
    taken as unset."""
    def check(v: Any) -> Any:
        if v is None:
            raise _fail("null", message)
        return v
    return BeforeValidator(check)


class _Strict(BaseModel):
    """A spec mapping: strict types, and an unknown key named with the keys allowed there."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)
    what: ClassVar[str] = "key"

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            allowed = list(cls.model_fields)
            for k in data:
                if k not in cls.model_fields:
                    raise _fail("unknown_key", f"unknown {cls.what}; allowed: "
                                f"{', '.join(allowed)}", key=str(k))
        return data

    def value(self, name: str) -> Any:
        """The field's value, or its declared default where the spec leaves it unset (or null)."""
        v = getattr(self, name)
        return type(self).model_fields[name].default if v is None else v


def _level_validator(axis: Axis, many: bool) -> Callable[[Any], Any]:
    """Check one level (or a list of levels) of ``axis`` with the spec's own normalisation."""

    def check(v: Any) -> Any:
        items = v if many and isinstance(v, list) else [v]
        if many and not items:
            raise _fail("empty", "needs at least one level")
        if len(items) > MAX_LEVELS:
            raise _fail("too_many", f"{len(items)} levels; at most {MAX_LEVELS}")
        try:
            levels = tuple(normalise_level(axis.name, item, "") for item in items)
        except SpecError as e:
            raise _fail("level", str(e).lstrip(": ")) from None
        return levels if many else levels[0]
    return check


def level_json_schema(axis: Axis) -> dict[str, Any]:
    """JSON Schema of one level of ``axis``, from the registry."""
    if axis.integer:
        cap = INTEGER_CAPS.get(axis.name, DEFAULT_INTEGER_CAP)[0]
        return {"type": "integer", "minimum": 1, "maximum": cap, "description": axis.doc}
    options: list[dict[str, Any]] = [{"enum": list(axis.levels)}]
    if set(axis.levels) == {"on", "off"}:
        options.append({"type": "boolean"})
    if axis.name == "device":
        options.append({"type": "string", "pattern": r"^cuda(:\d+)?$"})
    if axis.mapping_levels:
        names = {"enum": list(axis.levels)}
        options.append({"type": "string", "pattern": r"^\w+(:[0-9a-z]+|\[[^\]]+\])$"})
        options.append({"type": "object", "additionalProperties": False, "required": ["name"],
                        "properties": {"name": names, "build": {"type": "string"},
                                       "package": {"type": "string"}}})
    return {"anyOf": options, "description": axis.doc} if len(options) > 1 else \
        {**options[0], "description": axis.doc}


def _level_type(axis: Axis, many: bool) -> Any:
    one = level_json_schema(axis)
    schema = {"anyOf": [one, {"type": "array", "items": one, "minItems": 1}],
              "description": axis.doc} if many else one
    return Annotated[Any, BeforeValidator(_level_validator(axis, many)), WithJsonSchema(schema)]


def _axes_model(name: str, many: bool, what: str) -> type[_Strict]:
    # not Optional: ``decoder: null`` is a level normalise_level refuses, not an axis left out
    fields: dict[str, Any] = {a: (_level_type(AXES[a], many), None) for a in AXIS_ORDER}
    model = create_model(name, __base__=_Strict, **fields)  # type: ignore[call-overload]
    model.what = what  # type: ignore[attr-defined]
    return model


PositiveInt = Annotated[int, Field(ge=1)]
Fraction = Annotated[float, Field(ge=0, le=1)]
Factory = Annotated[str, Field(pattern=_FACTORY)]


def _from_name(key: str) -> Callable[[Any], Any]:
    """``model: mobilenet_v2`` is ``model: {name: mobilenet_v2}``; ``dataset: x/`` likewise."""
    return lambda v: {key: v} if isinstance(v, str) else v


class Labels(_Strict):
    """Ground truth: for a classifier a labels file, for a detector COCO JSON or a YOLO folder,
    and how to read it (docs/accuracy.md)."""

    path: Optional[Annotated[str, Field(min_length=1)]] = Field(
        None, description="the labels file, relative to the spec (none for format imagefolder; "
                          "a folder of .txt files for format yolo)")
    format: Optional[Literal[LABEL_FORMATS]] = Field(  # type: ignore[valid-type]
        "auto", description="auto (default: from the file's name and first line), csv (path,label), "
                          "pairs (name label per line: ImageNet's synset lists, Caffe's val.txt), "
                          "imagenet-solution (LOC_val_solution.csv), imagenet-index (the devkit's "
                          "ILSVRC2012_validation_ground_truth.txt), imagefolder (the parent folder); "
                          "for a detector: coco (instances JSON), yolo (a folder of .txt files)")
    by: Optional[Literal[LABEL_BY]] = Field(  # type: ignore[valid-type]
        "auto", description="how a label names a class: auto (default: integers are indices, else "
                          "a name or a WordNet synset; COCO: category names), index, name, synset")
    index_base: Optional[Literal[0, 1]] = Field(
        0, description="the class index the file uses for the model's first class (0 default)")
    meta_mat: Optional[Annotated[str, Field(min_length=1)]] = Field(
        None, description="the ImageNet devkit's data/meta.mat, for format imagenet-index")
    match: Optional[Literal[LABEL_MATCHES]] = Field(  # type: ignore[valid-type]
        "auto", description="how a label's image name meets an image id: auto (default), id (the "
                          "path relative to the dataset root), name (file name), stem (no suffix)")

    @model_validator(mode="after")
    def _file_unless_imagefolder(self) -> "Labels":
        if self.format == "imagefolder":
            if self.path is not None:
                raise _fail("labels", "format imagefolder reads each image's folder name: give no "
                                  "path", field="path")
        elif self.path is None:
            raise _fail("labels", "missing; give the labels file (or format: imagefolder for "
                                  "class folders)", field="path")
        if self.meta_mat is not None and self.value("format") not in ("auto", "imagenet-index"):
            raise _fail("labels", f"is for format imagenet-index, not {self.format}",
                        field="meta_mat")
        return self


class Dataset(_Strict):
    path: Annotated[str, Field(min_length=1, description="a folder (recursive), a glob (** "
                                                         "recursive) or a .txt/.csv manifest")]
    limit: Optional[Annotated[int, Field(ge=1, le=MAX_LIMIT)]] = Field(
        None, description="use only the first N images (sorted by id)")
    labels: Optional[Annotated[Labels, BeforeValidator(_labels_source,
                                                      json_schema_input_type=str | Labels)]] = Field(
        None, description="ground truth: a labels file, or {path, format, by, index_base, "
                          "meta_mat, match} (docs/accuracy.md)")


class Input(_Strict):
    mode: Annotated[Literal[INPUT_MODES], _no_null(  # type: ignore[valid-type]
        "unknown mode None; allowed: " + ", ".join(INPUT_MODES))] = None
    size: Optional[Annotated[int, Field(ge=1, le=MAX_INPUT_SIZE)]] = Field(
        None, description="model input side in pixels")
    resize: Optional[Annotated[int, Field(ge=1, le=2 * MAX_INPUT_SIZE)]] = Field(
        None, description="shorter side before the center crop (resize-crop), pixels")
    mean: Optional[Annotated[list[float], Field(min_length=3, max_length=3)]] = None
    std: Optional[Annotated[list[Annotated[float, Field(gt=0)]], Field(min_length=3, max_length=3)]] = None
    pad: Annotated[float, Field(ge=0, le=255), _no_null("letterbox pad value on the 0-255 scale, "
                                                        "got None")] = Field(
        None, description="letterbox pad value on the 0-255 scale")
    scale: Annotated[float, Field(gt=0), _no_null("pixels are divided by scale (255 for 0-1 "
                                                  "inputs, 1 for raw 0-255 inputs), got None")] = Field(
        None, description="pixels are divided by scale (255 for 0-1 inputs, 1 for raw 0-255)")
    channels: Annotated[Literal["rgb", "bgr"], _no_null("must be rgb or bgr (the order the model "
                                                        "expects), got None")] = Field(
        None, description="the order the model expects")

    @model_validator(mode="after")
    def _resize_holds_the_crop(self) -> "Input":
        if (self.mode in (None, "resize-crop") and self.size and self.resize
                and self.resize < self.size):
            raise _fail("resize", f"resize ({self.resize}) must be at least size ({self.size}) "
                                  "for a resize-crop")
        return self


class Detection(_Strict):
    layout: Optional[Literal[DETECTION_LAYOUTS]] = None  # type: ignore[valid-type]
    decoder: Optional[Factory] = Field(None, description="package.module:function (trusted code)")
    strides: Optional[Annotated[list[Annotated[int, Field(ge=1, le=4096)]], Field(min_length=1, max_length=16)]] = None
    score_threshold: Optional[Fraction] = None
    nms_iou: Optional[Fraction] = None
    class_agnostic: Optional[bool] = None
    nms_plus_one: Optional[bool] = None
    max_detections: Optional[Annotated[int, Field(ge=1, le=100_000)]] = None
    rank_k: Optional[Annotated[int, Field(ge=1, le=100_000)]] = None
    match_iou: Optional[Fraction] = None
    same_iou: Optional[Fraction] = None
    same_score: Optional[Fraction] = None


class Model(_Strict):
    name: Optional[Annotated[str, Field(min_length=1)]] = Field(None, description="a built-in model")
    torch: Optional[Factory] = Field(None, description="package.module:factory (trusted code)")
    weights: Optional[str] = Field(None, description="a state_dict file, loaded with weights_only=True")
    onnx: Optional[str] = Field(None, description="an ONNX file")
    input: Optional[Input] = None
    task: Annotated[Literal[TASKS], _no_null(  # type: ignore[valid-type]
        "unknown task None; allowed: " + ", ".join(TASKS))] = "classification"
    opset: Annotated[int, Field(ge=7, le=23), _no_null("must be an integer ONNX opset 7-23, got None")] = Field(
        18, description="ONNX opset 7-23")
    labels: Optional[str] = Field(None, description="a text file, one class name per line")
    detection: Optional[Detection] = None
    outputs: Optional[Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]] = Field(
        None, description="names of the model's outputs in its output order (default output0, "
                          "output1, ...): rows (out_worst, outputs) and explain name them")
    compare_outputs: Optional[Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]] = Field(
        None, description="the outputs whose divergence out_* and check judge (default: every "
                          "output); names from model.outputs, else output0, output1, ...")

    @model_validator(mode="after")
    def _output_names(self) -> "Model":
        for field in ("outputs", "compare_outputs"):
            names = getattr(self, field) or []
            twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
            if twice is not None:
                raise _fail("model", f"names output {twice!r} twice", field=field)
        if self.outputs and self.compare_outputs:
            unknown = next((n for n in self.compare_outputs if n not in self.outputs), None)
            if unknown is not None:
                raise _fail("model", f"names {unknown!r}, which model.outputs does not "
                                     f"({', '.join(self.outputs)})", field="compare_outputs")
        return self


_POINTS_SCHEMA = {"type": "number", "minimum": 0, "maximum": 100}


def _accuracy_drop(v: Any) -> Any:
    """Points (0-100) for every cell, or a mapping selector -> points (``*``, a cell id, or
    ``axis=level`` pairs separated by spaces)."""
    def points(x: Any, where: str) -> None:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 <= x <= 100:
            raise _fail("points", f"{where}must be a drop in top-1 points from 0 to 100, got {x!r}")
    if isinstance(v, dict):
        if not v:
            raise _fail("points", "needs at least one selector: {'*': 0.5, 'backend=openvino': 1}")
        for k, x in v.items():
            if not isinstance(k, str) or not k.strip():
                raise _fail("points", f"selector {k!r} must be '*', a cell id or axis=level pairs")
            points(x, f"{k!r}: ")
        return v
    points(v, "")
    return v


AccuracyDrop = Annotated[Any, BeforeValidator(_accuracy_drop), WithJsonSchema({
    "anyOf": [_POINTS_SCHEMA, {"type": "object", "additionalProperties": _POINTS_SCHEMA}],
    "description": "top-1 points; or selector ('*', a cell id, 'axis=level ...') -> points"})]


def _labels_source(v: Any) -> Any:
    """``labels: val.txt`` is ``labels: {path: val.txt}``; anything but text or a mapping is
    refused with both forms named."""
    if isinstance(v, str):
        return {"path": v}
    if not isinstance(v, dict):
        raise _fail("labels", "must be a labels file path or a mapping {path, format, by, "
                              f"index_base, meta_mat, match}}, got {v!r}")
    return v


Tolerance = Optional[Annotated[float, Field(ge=0)] | Literal["auto"]]


class Check(_Strict):
    max_abs: Tolerance = None
    max_rel_l2: Tolerance = None
    min_cosine: Tolerance = None
    min_top1_agreement: Tolerance = None
    scope: Optional[Literal[SCOPES]] = None  # type: ignore[valid-type]
    allow_lower_precision: Optional[bool] = None
    allow_errors: Optional[bool] = None
    max_reference_errors: Optional[Annotated[int, Field(ge=0)]] = Field(
        None, description="images the reference cell may fail on before the gate fails (default 0)")
    max_accuracy_drop: Optional[AccuracyDrop] = Field(
        None, description="top-1 points a cell may lose against the reference (needs "
                          "dataset.labels): a number for every cell, or {'*': 0.5, "
                          "'backend=openvino': 1.0} per cell, the most specific selector winning")


class Calibration(_Strict):
    limit: Annotated[int, Field(ge=1, le=100_000), _no_null("must be a positive integer, got None")] = Field(
        16, description="images for int8 calibration")


def _wrong(key: str, message: str) -> PydanticCustomError:
    """A problem found across keys, reported at ``key`` (dotted, as the user wrote it)."""
    return PydanticCustomError("across_keys", message, {"key": key})


def resolve(base_dir: str, path: Any) -> str:
    """A path written in the spec, relative to the spec's folder."""
    return str((Path(base_dir) / str(path)).resolve())


def _check_across(spec: Any, raw: dict, base_dir: str) -> None:
    """What the types alone cannot say, in the order a reader meets it in the spec."""
    labels = spec.dataset.labels
    for key in ("path", "meta_mat"):
        written = getattr(labels, key) if labels is not None else None
        if written is None:
            continue
        where = Path(resolve(base_dir, written))
        folder = key == "path" and labels.value("format") in ("auto", "yolo")   # YOLO: a folder
        if not (where.is_file() or (folder and where.is_dir())):
            raise _wrong(f"dataset.labels.{key}", f"{'file or folder' if folder else 'file'} not "
                                                  f"found: {written} (looked in {where})")
    m = spec.model
    kinds = [k for k in ("name", "torch", "onnx") if getattr(m, k)]
    if not kinds:
        raise _wrong("model", "give one of name (built-in), torch (pkg.mod:factory) or onnx (file)")
    if "name" in kinds and len(kinds) > 1:
        raise _wrong("model", "a built-in name cannot be combined with torch/onnx artifacts")
    if m.task == "detection" and not m.name:
        if m.detection is None:
            raise _wrong("model.detection", "a detection model needs {layout: "
                         + "|".join(DETECTION_LAYOUTS) + "} or {decoder: pkg.module:function}")
        if not m.detection.layout and not m.detection.decoder:
            raise _wrong("model.detection", "give layout (" + ", ".join(DETECTION_LAYOUTS)
                         + ") or decoder (pkg.module:function)")
    if not m.name and m.input is None:
        raise _wrong("model.input", "a torch/onnx model needs input: {size: 224, mode: "
                                    "resize-crop|stretch|letterbox|letterbox-center, resize: 256, "
                                    "mean: [...], std: [...]}")
    if m.onnx and not Path(resolve(base_dir, m.onnx)).is_file():
        raise _wrong("model.onnx", f"file not found: {m.onnx}")
    axes = {a: getattr(spec.axes, a) for a in AXIS_ORDER if getattr(spec.axes, a) is not None}
    if not axes:
        raise _wrong("axes", "missing; " + _hint("axes"))
    for axis, levels in axes.items():
        if len(set(levels)) != len(levels):
            raise _wrong(f"axes.{axis}", f"a level is listed twice: {list(levels)}")
    cells = [(f"{k}[{i}]", c, raw[k][i]) for k in ("include", "exclude")
             for i, c in enumerate(getattr(spec, k) or ())]
    if spec.reference is not None:
        cells.append(("reference", spec.reference, raw["reference"]))
    for key, cell, written in cells:
        for axis in written:    # in the order the spec writes them
            if axis not in axes:
                raise _wrong(f"{key}.{axis}", f"not an axis of this spec; axes: {', '.join(axes)}")
            if getattr(cell, axis) not in axes[axis]:
                raise _wrong(f"{key}.{axis}", f"level {getattr(cell, axis)!r} is not in axes.{axis}; "
                                              f"allowed: {', '.join(axes[axis])}")


@model_validator(mode="wrap")
def _across(cls: type, data: Any, handler: Callable[[Any], Any], info: ValidationInfo) -> Any:
    spec = handler(data)
    _check_across(spec, data, (info.context or {}).get("base_dir", "."))
    return spec


@functools.lru_cache(maxsize=8)
def _spec_model(axes_key: tuple[str, ...], _registry: tuple = ()) -> type[_Strict]:
    """The top-level model for the axes registered now: backends register their axes and
    levels when imported, so the cache is keyed by the registry's content."""
    axes = _axes_model("Axes", True, "axis")
    partial = _axes_model("Cell", False, "axis")
    fields: dict[str, Any] = {
        "name": (Annotated[str, Field(min_length=1, max_length=200),
                           _no_null("must be a non-empty string")],
                 Field("dmx-run", description="the run's name")),
        "dataset": (Annotated[Dataset, BeforeValidator(_from_name("path"),
                                                       json_schema_input_type=str | Dataset)],
                    Field(description=_DATASET_HINT)),
        "model": (Annotated[Model, BeforeValidator(_from_name("name"),
                                                   json_schema_input_type=str | Model)],
                  Field(description=_MODEL_HINT)),
        "axes": (axes, Field(description="axis -> list of levels; axes: " + ", ".join(axes_key))),
        "include": (Optional[Annotated[list[partial], Field(max_length=10_000)]],  # type: ignore[valid-type]
                    Field(None, description="cells added to the product (axis: level)")),
        "exclude": (Optional[Annotated[list[partial], Field(max_length=10_000)]],  # type: ignore[valid-type]
                    Field(None, description="cells removed from the product (axis: level)")),
        "reference": (Optional[partial], Field(None, description="the cell every other is "
                                                                 "compared to (default: first levels)")),
        "calibration": (Optional[Calibration], None),
        "check": (Optional[Check], Field(None, description="tolerances for dmx check")),
    }
    return create_model("Spec", __base__=_Strict, __validators__={"_across": _across},  # type: ignore[call-overload]
                        **fields)


def spec_model() -> type[_Strict]:
    registry = tuple((a.name, tuple(a.levels), a.integer, a.mapping_levels, a.doc)
                     for a in (AXES[n] for n in AXIS_ORDER))
    return _spec_model(tuple(AXIS_ORDER), registry)


def spec_json_schema() -> dict[str, Any]:
    """The JSON Schema of a spec file (for editors: yaml-language-server's ``$schema``)."""
    schema = spec_model().model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "dmx matrix spec"
    return schema


def _key(loc: tuple[Any, ...]) -> str:
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            if i >= 2 and loc[0] == "axes":
                continue  # a level of an axis: the axis is the key
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _plain(expected: str) -> str:
    """pydantic's "'a', 'b' or 'c'" -> "a, b, c"."""
    return ", ".join(re.findall(r"'([^']*)'", expected)) or expected


_TYPE_WORDS = {"int": "an integer", "float": "a number", "string": "a string", "bool": "true or false",
               "list": "a list", "dict": "a mapping", "model": "a mapping"}


def _message(err: dict[str, Any]) -> str:
    kind, ctx, got = err["type"], err.get("ctx") or {}, err.get("input")
    shown = repr(got) if not isinstance(got, (dict, list)) else type(got).__name__
    if len(shown) > 60:
        shown = shown[:57] + "..."
    if kind == "missing":
        return "missing"
    if kind == "string_unicode":
        return "must be UTF-8 text (it holds bytes that are not)"
    if kind == "literal_error":
        return f"got {shown}; allowed: {_plain(str(ctx.get('expected', '')))}"
    if kind.endswith("_type") or kind.endswith("_parsing"):
        want = _TYPE_WORDS.get(kind.split("_")[0], kind.split("_")[0])
        return f"must be {want}, got {shown}"
    if kind == "greater_than_equal":
        bound = ctx.get("ge")
        return (f"must be a positive integer, got {shown}" if bound == 1 and isinstance(got, int)
                else f"must be at least {bound}, got {shown}")
    if kind == "greater_than":
        return f"must be greater than {ctx.get('gt')}, got {shown}"
    if kind in ("less_than_equal", "less_than"):
        return f"must be at most {ctx.get('le', ctx.get('lt'))}, got {shown}"
    if kind in ("too_short", "too_long"):
        lo, hi = ctx.get("min_length"), ctx.get("max_length")
        n = ctx.get("actual_length")
        return f"has {n} items; needs {lo if kind == 'too_short' else hi} at {'least' if kind == 'too_short' else 'most'}"
    if kind == "string_pattern_mismatch":
        what = "function" if err["loc"][-1] == "decoder" else "factory"
        return f"must look like package.module:{what}, got {shown}"
    if kind == "finite_number":
        return f"must be a finite number, got {shown}"
    return err["msg"]


def _hint(key: str) -> str:
    return {"dataset": _DATASET_HINT, "model": _MODEL_HINT,
            "axes": "a mapping axis -> list of levels, axes: " + ", ".join(AXIS_ORDER),
            "dataset.path": "a folder, a glob (** recursive) or a .txt/.csv manifest"}.get(key, "")


def validate_spec_data(raw: Any, base_dir: str = ".") -> Any:
    """Check ``raw`` (parsed YAML; files relative to ``base_dir``) against the schema: the
    validated model, levels canonical; the first problem is raised as a SpecError."""
    if not isinstance(raw, dict):
        raise SpecError("", "a spec must be a YAML mapping with keys "
                            + ", ".join(spec_model().model_fields))
    try:
        return spec_model().model_validate(raw, context={"base_dir": base_dir})
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        loc = tuple(err["loc"])
        ctx = err.get("ctx") or {}
        if err["type"] == "across_keys":
            raise SpecError(ctx["key"], err["msg"]) from None
        if err["type"] == "unknown_key":
            loc = loc + (ctx["key"],)
        elif ctx.get("field"):       # a check across fields, reported at the field it blames
            loc = loc + (ctx["field"],)
        # a cap's reason, where there is one
        message = _message(err)
        key = _key(loc)
        if err["type"] == "missing" and _hint(key):
            message = f"missing; {_hint(key)}"
        raise SpecError(key, message) from None
