"""The spec's schema: pydantic models built from the axis registry, and their JSON Schema.

The models check structure and types (every key known, every value of the right kind and within
its bounds); the level of every axis is checked by ``normalise_level`` itself, so the registry in
``axes.AXES`` stays the one list of axes and levels - an axis added there (or declared by a
backend) is in the schema, the error messages and the JSON Schema with no edit here.
``validate_spec_data`` turns pydantic's first error into a ``SpecError`` naming the key (dotted,
``include[0].decoder``) and what is allowed.
"""
from __future__ import annotations

import functools
import re
from typing import Any, Callable, ClassVar, Literal, Optional

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, ValidationError,
                      WithJsonSchema, create_model, model_validator)
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
LABEL_FORMATS = ("auto", "csv", "pairs", "imagenet-solution", "imagenet-index", "imagefolder")
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


def _level_validator(axis: Axis, many: bool) -> Callable[[Any], Any]:
    """Check one level (or a list of levels) of ``axis`` with the spec's own normalisation."""

    def check(v: Any) -> Any:
        items = v if many and isinstance(v, list) else [v]
        if many and not items:
            raise _fail("empty", "needs at least one level")
        if len(items) > MAX_LEVELS:
            raise _fail("too_many", f"{len(items)} levels; at most {MAX_LEVELS}")
        for item in items:
            try:
                normalise_level(axis.name, item, "")
            except SpecError as e:
                raise _fail("level", str(e).lstrip(": ")) from None
        return v
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
    fields: dict[str, Any] = {a: (Optional[_level_type(AXES[a], many)], None) for a in AXIS_ORDER}
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
    """Ground truth for a classifier: a labels file and how to read it (docs/accuracy.md)."""

    path: Optional[Annotated[str, Field(min_length=1)]] = Field(
        None, description="the labels file, relative to the spec (none for format imagefolder)")
    format: Optional[Literal[LABEL_FORMATS]] = Field(  # type: ignore[valid-type]
        None, description="auto (default: from the file's name and first line), csv (path,label), "
                          "pairs (name label per line: ImageNet's synset lists, Caffe's val.txt), "
                          "imagenet-solution (LOC_val_solution.csv), imagenet-index (the devkit's "
                          "ILSVRC2012_validation_ground_truth.txt), imagefolder (the parent folder)")
    by: Optional[Literal[LABEL_BY]] = Field(  # type: ignore[valid-type]
        None, description="how a label names a class: auto (default: integers are indices, else "
                          "a name or a WordNet synset), index, name, synset")
    index_base: Optional[Literal[0, 1]] = Field(
        None, description="the class index the file uses for the model's first class (0 default)")
    meta_mat: Optional[Annotated[str, Field(min_length=1)]] = Field(
        None, description="the ImageNet devkit's data/meta.mat, for format imagenet-index")
    match: Optional[Literal[LABEL_MATCHES]] = Field(  # type: ignore[valid-type]
        None, description="how a label's image name meets an image id: auto (default), id (the "
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
        if self.meta_mat is not None and self.format not in (None, "auto", "imagenet-index"):
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
    mode: Optional[Literal[INPUT_MODES]] = None  # type: ignore[valid-type]
    size: Optional[Annotated[int, Field(ge=1, le=MAX_INPUT_SIZE)]] = Field(
        None, description="model input side in pixels")
    resize: Optional[Annotated[int, Field(ge=1, le=2 * MAX_INPUT_SIZE)]] = Field(
        None, description="shorter side before the center crop (resize-crop), pixels")
    mean: Optional[Annotated[list[float], Field(min_length=3, max_length=3)]] = None
    std: Optional[Annotated[list[Annotated[float, Field(gt=0)]], Field(min_length=3, max_length=3)]] = None
    pad: Optional[Annotated[float, Field(ge=0, le=255)]] = Field(
        None, description="letterbox pad value on the 0-255 scale")
    scale: Optional[Annotated[float, Field(gt=0)]] = Field(
        None, description="pixels are divided by scale (255 for 0-1 inputs, 1 for raw 0-255)")
    channels: Optional[Literal["rgb", "bgr"]] = Field(None, description="the order the model expects")

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
    task: Optional[Literal[TASKS]] = None  # type: ignore[valid-type]
    opset: Optional[Annotated[int, Field(ge=7, le=23)]] = Field(None, description="ONNX opset 7-23")
    labels: Optional[str] = Field(None, description="a text file, one class name per line")
    detection: Optional[Detection] = None


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
    limit: Optional[Annotated[int, Field(ge=1, le=100_000)]] = Field(
        None, description="images for int8 calibration (default 16)")


@functools.lru_cache(maxsize=8)
def _spec_model(axes_key: tuple[str, ...], _registry: tuple = ()) -> type[_Strict]:
    """The top-level model for the axes registered now: backends register their axes and
    levels when imported, so the cache is keyed by the registry's content."""
    axes = _axes_model("Axes", True, "axis")
    partial = _axes_model("Cell", False, "axis")
    fields: dict[str, Any] = {
        "name": (Optional[Annotated[str, Field(min_length=1, max_length=200)]],
                 Field(None, description="the run's name")),
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
    return create_model("Spec", __base__=_Strict, **fields)  # type: ignore[call-overload]


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


def validate_spec_data(raw: Any) -> None:
    """Check ``raw`` (parsed YAML) against the schema; raise the first problem as a SpecError."""
    if not isinstance(raw, dict):
        raise SpecError("", "a spec must be a YAML mapping with keys "
                            + ", ".join(spec_model().model_fields))
    try:
        spec_model().model_validate(raw)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        loc = tuple(err["loc"])
        ctx = err.get("ctx") or {}
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
