"""The axes dmx knows: their levels, the pipeline stage they act on, and where they apply.

Adding a pipeline axis is one entry in ``AXES``. Backend-specific axes (an OpenVINO hint, an
ONNX Runtime optimisation level, a conversion route) are not listed here: each backend module
declares its own and registers them with ``register_backend`` when ``dmx.runner.backends`` is
imported (the CLI and the runner import it before parsing a spec). ``matrix`` so imports nothing
above it, and a new backend adds its axes without touching this file. An axis that does not apply
to a cell (an OpenVINO hint on a torch cell) is null in that cell and does not multiply the matrix.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from dataclasses import replace
from typing import Callable, Iterable, Mapping

Factors = Mapping[str, "str | None"]

DECODE, PREPROCESS, INFER = "decode", "preprocess", "infer"


@dataclass(frozen=True)
class Axis:
    """One dimension of the matrix.

    ``levels`` lists the allowed plain levels; ``open_levels`` marks axes whose levels may also be
    mappings (decoder variants such as ``{name: libjpeg, build: 9e}``) or free integers.
    ``applies`` decides from a cell's other factors whether the axis means anything there.
    """

    name: str
    stage: str
    levels: tuple[str, ...]
    doc: str
    applies: Callable[[Factors], bool] = field(default=lambda f: True)
    integer: bool = False
    mapping_levels: bool = False
    #: Position in the canonical axis order (cell ids hash the factors in this order); None:
    #: after every axis known so far.
    rank: float | None = None
    #: The level a pipeline uses when the spec does not sweep the axis (None: no default).
    default: str | None = None


def _decoder_in(*names: str) -> Callable[[Factors], bool]:
    """Applies when the cell's decoder library (``libjpeg:9e`` -> libjpeg) is one of ``names``."""
    return lambda f: re.split(r"[:\[]", str(f.get("decoder") or "pil"))[0] in names


RESIZE_LEVELS = (
    "pil-bilinear", "pil-bicubic", "cv2-linear", "cv2-area", "cv2-cubic",
    "torch-bilinear", "torch-bilinear-aa",
)

FIT_LEVELS = ("letterbox", "letterbox-center", "stretch", "resize-crop")

AXES: dict[str, Axis] = {
    a.name: a
    for a in (
        Axis("decoder", DECODE, ("pil", "opencv", "simplejpeg", "turbojpeg", "libjpeg", "nvjpeg"),
             "image decoding library (a mapping adds a package version or libjpeg build)",
             mapping_levels=True),
        Axis("exif", DECODE, ("apply", "ignore", "native"),
             "EXIF orientation: apply (Pillow exif_transpose / OpenCV default), ignore, or native "
             "(each library's own default: OpenCV applies it, Pillow ignores it)"),
        Axis("color", DECODE, ("rgb", "bgr"),
             "channel order handed to the model (bgr reproduces the classic channel swap)"),
        Axis("reduce", DECODE, ("1", "2", "4", "8"),
             "decode at 1/n size per side with the library's DCT scaling (Pillow draft, OpenCV "
             "IMREAD_REDUCED_COLOR_n, simplejpeg/PyTurboJPEG scaling); jpeglib has none",
             applies=_decoder_in("pil", "opencv", "simplejpeg", "turbojpeg")),
        Axis("dct", DECODE, ("islow", "ifast", "float"),
             "inverse DCT (libjpeg dct_method; simplejpeg/PyTurboJPEG fast DCT, no float); "
             "Pillow and OpenCV have no such choice",
             applies=_decoder_in("libjpeg", "simplejpeg", "turbojpeg")),
        Axis("upsample", DECODE, ("fancy", "fast"),
             "chroma upsampling (libjpeg do_fancy_upsampling, simplejpeg fastupsample, "
             "TJFLAG_FASTUPSAMPLE); Pillow and OpenCV have no such choice",
             applies=_decoder_in("libjpeg", "simplejpeg", "turbojpeg")),
        Axis("resize", PREPROCESS, RESIZE_LEVELS, "resize library and interpolation"),
        Axis("fit", PREPROCESS, FIT_LEVELS,
             "how the image fits the model's square input: letterbox (aspect kept, padded right/"
             "bottom with the model's pad value: YOLOX, DAMO-YOLO), letterbox-center (padded on "
             "both sides: Ultralytics), stretch, or resize-crop (shorter side, center crop); "
             "absent, the model's own fit"),
        Axis("backend", INFER, (), "inference engine (levels: the registered backends)"),
        Axis("precision", INFER, ("fp32", "fp16", "bf16", "int8"), "numeric precision asked for"),
        # ranks 10-12 and 16 are the built-in backends' axes (openvino_hint, ort_opt, conversion,
        # tf32): the canonical order, and so every cell id, is what it was before they moved out
        Axis("threads", INFER, (), "intra-op threads set on every backend", integer=True, rank=13),
        Axis("batch", INFER, (), "inference batch size", integer=True, rank=14),
        Axis("device", INFER, ("cpu", "cuda"), "device the model runs on (cuda:N allowed)",
             rank=15),
    )
}

AXES.update({a.name: replace(a, rank=float(i) if a.rank is None else a.rank)
             for i, a in enumerate(AXES.values())})

#: Axis names in canonical order; a list kept sorted in place, so ``from dmx.matrix.axes import
#: AXIS_ORDER`` sees the axes that backends register later.
AXIS_ORDER: list[str] = list(AXES)

# The level a pipeline uses for an axis the spec does not sweep.
DEFAULT_LEVELS: dict[str, str] = {
    "decoder": "pil", "exif": "apply", "color": "rgb", "reduce": "1", "dct": "islow",
    "upsample": "fancy", "resize": "pil-bilinear",
    "backend": "torch", "precision": "fp32", "device": "cpu",
}

#: Backend-specific axis -> the backends that declared it (it applies to their cells only).
BACKEND_AXES: dict[str, tuple[str, ...]] = {}
_OWN_APPLIES: dict[str, list[Callable[[Factors], bool]]] = {}


def register_backend(name: str, axes: Iterable[Axis] = ()) -> None:
    """Add a backend: ``name`` becomes a level of ``backend``, and each of its ``axes`` applies
    to its cells (and to those of other backends declaring an axis of the same name: their
    levels are merged, e.g. ``conversion``). An axis's own ``applies`` narrows it further
    (``tf32``: CUDA only). Idempotent; called by ``dmx.runner.backends`` for each backend module."""
    backend = AXES["backend"]
    if name not in backend.levels:
        AXES["backend"] = replace(backend, levels=(*backend.levels, name))
    DEFAULT_LEVELS.setdefault("backend", name)
    for axis in axes:
        if axis.stage != INFER:
            raise ValueError(f"backend {name}: axis {axis.name} must act on the infer stage")
        owners = BACKEND_AXES.get(axis.name, ())
        if axis.name in AXES and not owners:
            raise ValueError(f"backend {name}: {axis.name} is a pipeline axis, not a backend's")
        if name not in owners:
            _OWN_APPLIES.setdefault(axis.name, []).append(axis.applies)
        owners = tuple(dict.fromkeys((*owners, name)))
        BACKEND_AXES[axis.name] = owners
        old = AXES.get(axis.name)
        levels = tuple(dict.fromkeys((*(old.levels if old else ()), *axis.levels)))
        checks = dict(zip(owners, _OWN_APPLIES[axis.name]))
        rank = old.rank if old else (axis.rank if axis.rank is not None
                                     else max(a.rank or 0.0 for a in AXES.values()) + 1)
        AXES[axis.name] = replace(
            axis, levels=levels, rank=rank, doc=old.doc if old else axis.doc,
            applies=lambda f, checks=checks: (f.get("backend") in checks
                                              and checks[str(f.get("backend"))](f)))
        if axis.default is not None:
            DEFAULT_LEVELS.setdefault(axis.name, axis.default)
    AXIS_ORDER[:] = sorted(AXES, key=lambda a: AXES[a].rank or 0.0)


def stage_axes(stage: str, present: tuple[str, ...]) -> tuple[str, ...]:
    """Axes of ``present`` that act on ``stage``, in canonical order."""
    return tuple(a for a in AXIS_ORDER if a in present and AXES[a].stage == stage)
