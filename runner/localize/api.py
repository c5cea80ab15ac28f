"""The two ways in: a run's contrast (``localize_run``) or two ONNX files (``localize_models``).

Inputs are the model inputs a sweep would make: the reference cell's decoder, EXIF handling,
resize and fit for a run; Pillow, bilinear and the model's (or ImageNet's) normalisation for
two files. Both sides get the same input, so what differs is the model and the backend alone.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from dmx.runner.backends import InferSetting, ModelArtifacts

from .engine import DEFAULT_BUDGET, LocalizeResult, localize
from .graph import LocalizeError, graph_inputs, is_onnx_file, load_onnx
from .sides import SIDES, Side

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def make_side(path: str, setting: InferSetting, artifacts: ModelArtifacts, threads: int) -> Side:
    if setting.backend not in SIDES:
        raise LocalizeError(f"localize has no side for backend {setting.backend!r} "
                            f"(known: {', '.join(SIDES)})")
    if setting.backend != "openvino" and not is_onnx_file(path):
        raise LocalizeError(f"{path}: {setting.backend} side needs an ONNX file")
    return SIDES[setting.backend](path, setting, artifacts, threads)


def image_inputs(paths: list[tuple[str, str]], pre: Any, decoder: str = "pil",
                 factors: dict[str, Any] | None = None, resize: str = "pil-bilinear",
                 fit: str | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(image_id, (1, 3, H, W) float32) for each (image_id, path); images that fail are skipped."""
    from dmx.runner.decoders import decode_options, get_decoder
    from dmx.runner.preprocess import model_input_pixels, normalise
    dec = get_decoder(decoder)
    factors = factors or {}
    for image_id, path in paths:
        try:
            pixels = dec.decode(Path(path).read_bytes(), decode_options(factors))
            if factors.get("color") == "bgr":
                pixels = np.ascontiguousarray(pixels[..., ::-1])
            x = normalise(model_input_pixels(pixels, resize, pre, fit), pre)
        except Exception:  # a bad image is passed over here; the sweep records it as an error row
            continue
        yield image_id, x[None]


def list_image_paths(path: str) -> list[tuple[str, str]]:
    p = Path(path)
    if p.is_file():
        return [(p.name, str(p))]
    if not p.is_dir():
        raise LocalizeError(f"--images {path}: no such file or folder")
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
                   and not any(part.startswith(".") for part in f.relative_to(p).parts))
    if not files:
        raise LocalizeError(f"--images {path}: no image files there")
    return [(str(f.relative_to(p)), str(f)) for f in files]


def _input_size(path: str) -> int:
    m = load_onnx(path)
    name = graph_inputs(m)[0]
    vi = next(i for i in m.graph.input if i.name == name)
    dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    if len(dims) != 4 or dims[1] != 3 or not dims[2] or dims[2] != dims[3]:
        raise LocalizeError(f"{path}: input {name} is {dims}; --models needs a square NCHW RGB "
                            "input with static height and width")
    return int(dims[2])


def localize_models(a: str, b: str, images: str, *, backend: str = "onnxruntime",
                    reference_backend: str | None = None, precision: str = "fp32",
                    openvino_hint: str | None = None, n_images: int = 8, preprocess: str | None = None,
                    threads: int = 1, tolerance: float | None = None,
                    budget_bytes: int = DEFAULT_BUDGET,
                    progress: Callable[[str], None] | None = None) -> LocalizeResult:
    """Model ``b`` on ``backend`` against model ``a`` on ``reference_backend`` (default: the
    same backend), layer by layer, joined by tensor name."""
    from dmx.runner.convert import file_key
    from dmx.runner.models.base import Preprocess
    for p in (a, b):
        if not Path(p).is_file():
            raise LocalizeError(f"--models {p}: no such file")
    if not is_onnx_file(a):
        raise LocalizeError(f"--models {a}: the reference must be an ONNX file (its graph names the layers)")
    if preprocess:
        from dmx.runner.models import get_model
        pre = get_model(preprocess).preprocess
    else:
        size = _input_size(a)
        pre = Preprocess(mode="stretch", resize=size, crop=size, mean=IMAGENET[0], std=IMAGENET[1])
    ref_setting = InferSetting(backend=reference_backend or backend, precision="fp32")
    var_setting = InferSetting(backend=backend, precision=precision, openvino_hint=openvino_hint)

    def artifacts(path: str, s: InferSetting) -> ModelArtifacts:
        return ModelArtifacts(name=Path(path).stem, task="classification", torch_factory=None,
                              weights=None, files={file_key(s.backend, s.precision, None): path},
                              input_shape=(3, pre.crop, pre.crop))

    ref = make_side(a, ref_setting, artifacts(a, ref_setting), threads)
    var = make_side(b, var_setting, artifacts(b, var_setting), threads)
    inputs = []
    for item in image_inputs(list_image_paths(images), pre):
        inputs.append(item)
        if len(inputs) >= n_images:
            break
    if not inputs:
        raise LocalizeError(f"--images {images}: no image decodes")
    return localize(ref, var, inputs, cell_id="models", tolerance=tolerance,
                    budget_bytes=budget_bytes, progress=progress)
