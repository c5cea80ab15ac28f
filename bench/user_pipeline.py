"""The pipeline as a user writes it - decode, preprocess, a session per backend, and the
comparison with the reference cell - shared by the naive loop (``sweep_naive.py``) and the
competent script (``competent.py``), so the two differ only in how they schedule the work."""
from __future__ import annotations

import numpy as np


def naive_decode(decoder: str, path: str) -> np.ndarray:
    """RGB uint8 (H, W, 3), EXIF orientation applied, as a user writes it."""
    if decoder == "pil":
        from PIL import Image, ImageOps
        with Image.open(path) as im:
            return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    if decoder == "opencv":
        import cv2
        bgr = cv2.imread(path, cv2.IMREAD_COLOR)  # applies EXIF orientation
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    raise SystemExit(f"the naive loop knows decoders pil and opencv, not {decoder!r}")


def naive_preprocess(img: np.ndarray, resize: str, pre) -> np.ndarray:
    """Shorter side to ``pre.resize``, centre crop ``pre.crop``, /255, mean/std, NCHW (1, ...)."""
    h, w = img.shape[:2]
    if pre.mode == "stretch":
        nh = nw = pre.crop
    elif h <= w:
        nh, nw = pre.resize, int(pre.resize * w / h)
    else:
        nh, nw = int(pre.resize * h / w), pre.resize
    if resize == "pil-bilinear":
        from PIL import Image
        out = np.asarray(Image.fromarray(img).resize((nw, nh), Image.Resampling.BILINEAR))
    elif resize == "cv2-linear":
        import cv2
        out = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
    elif resize == "cv2-area":
        import cv2
        out = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
    else:
        raise SystemExit(f"the naive loop knows resizes pil-bilinear, cv2-linear, cv2-area, not {resize!r}")
    top, left = int(round((nh - pre.crop) / 2.0)), int(round((nw - pre.crop) / 2.0))
    x = out[top: top + pre.crop, left: left + pre.crop].astype(np.float32) / 255.0
    x = (x - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def naive_session(backend: str, artifacts, precision: str):
    """A callable (1, 3, H, W) -> logits, built the way each library's quick-start shows, from
    the same model file dmx's backend of that name uses."""
    from dmx.runner.backends import InferSetting
    onnx_path = artifacts.file_for(InferSetting(backend=backend, precision=precision))
    if backend == "torch":
        import torch

        from dmx.runner.models.loading import build_torch_model
        model = build_torch_model(artifacts.torch_factory, artifacts.weights)

        def run(x):
            with torch.inference_mode():
                return model(torch.from_numpy(x)).numpy()
        return run
    if backend == "onnxruntime":
        import onnxruntime as ort
        sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        return lambda x: sess.run(None, {name: x})[0]
    if backend == "openvino":
        import openvino as ov
        compiled = ov.Core().compile_model(onnx_path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        return lambda x: compiled(x)[0]
    raise SystemExit(f"unknown backend {backend!r}")


def agreement(outputs: dict[str, list[np.ndarray]], cells, ref) -> dict:
    """{(cell_id, image index): (top1, max abs vs reference, cosine)} of every cell's outputs."""
    ref_out = outputs[ref.cell_id]
    agree = {}
    for cell in cells:
        for i, (y, r) in enumerate(zip(outputs[cell.cell_id], ref_out)):
            d = float(np.max(np.abs(y - r)))
            cos = float(y @ r / (np.linalg.norm(y) * np.linalg.norm(r)))
            agree[(cell.cell_id, i)] = (int(np.argmax(y)), d, cos)
    return agree
