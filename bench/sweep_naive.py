"""``bench/sweep.py``'s (a): the naive loop, the one users write, and the fresh process it runs
in (``sweep.py --naive-child``). (a'), ``bench/competent.py``'s script, runs in the same kind of
process (``sweep.py --competent-child``) and reuses this loop's decode, preprocess and session
code. Both children import the libraries before their clock starts and print one JSON line:
seconds, their own peak RSS (VmHWM) and every (cell, image)'s top-1, max abs and cosine vs the
reference cell."""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
from sweep_common import child_json, import_libraries, own_peak_rss_mb, setup


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
    from runner.backends import InferSetting
    onnx_path = artifacts.file_for(InferSetting(backend=backend, precision=precision))
    if backend == "torch":
        import torch

        from runner.models.loading import build_torch_model
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


def naive_threads() -> str:
    import onnxruntime as ort
    import openvino as ov
    import torch
    ov_threads = ov.Core().get_property("CPU", "INFERENCE_NUM_THREADS")
    return (f"torch.get_num_threads()={torch.get_num_threads()}; onnxruntime SessionOptions "
            f"intra_op_num_threads=0 (default: one per physical core, ort {ort.__version__}); "
            f"openvino CPU INFERENCE_NUM_THREADS={ov_threads} (0 = all cores), "
            "PERFORMANCE_HINT default (LATENCY)")


def naive_loop(paths: list[str], cells, ref, model, artifacts) -> tuple[float, dict]:
    """Returns (seconds, {(cell_id, image index): (top1, max abs vs reference, cosine)})."""
    t0 = time.perf_counter()
    outputs: dict[str, list[np.ndarray]] = {}
    for cell in cells:
        run = naive_session(cell.get("backend"), artifacts, cell.get("precision"))
        outs = []
        for path in paths:
            img = naive_decode(cell.get("decoder"), path)
            x = naive_preprocess(img, cell.get("resize"), model.preprocess)
            outs.append(np.asarray(run(x))[0])
        outputs[cell.cell_id] = outs
    return time.perf_counter() - t0, agreement(outputs, cells, ref)


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


# ----------------------------------------------------------------------------- the fresh processes
def _loop_child(a: argparse.Namespace, loop) -> None:
    """Run ``loop(paths, cells, ref, model, artifacts)`` on this run's dataset and spec, with
    the libraries imported first; print its seconds, results and this process's peak RSS."""
    paths, _spec, cells, ref, model, artifacts = setup(a)
    import_libraries()  # imports are not part of the timing, as in the other phases
    seconds, results = loop(paths, cells, ref, model, artifacts)
    print(json.dumps({"seconds": seconds, "peak_rss_mb": own_peak_rss_mb(),
                      "results": [[c, i, *v] for (c, i), v in results.items()]}))


def _in_child(flags: list[str], a: argparse.Namespace, what: str) -> tuple[float, dict, float]:
    d = child_json(flags, a, what)
    return d["seconds"], {(c, i): tuple(v) for c, i, *v in d["results"]}, d["peak_rss_mb"]


def naive_child(a: argparse.Namespace) -> None:
    """``sweep.py --naive-child``."""
    _loop_child(a, naive_loop)


def naive_in_child(a: argparse.Namespace) -> tuple[float, dict, float]:
    """(a) in a fresh process, as a user's script runs: (seconds, results, child's peak RSS MB).
    The child imports the libraries before its clock starts."""
    return _in_child(["--naive-child"], a, "naive loop")


def competent_child(a: argparse.Namespace) -> None:
    """``sweep.py --competent-child``."""
    from competent import competent_loop
    _loop_child(a, lambda *args: competent_loop(*args, batch=a.competent_batch))


def competent_in_child(a: argparse.Namespace) -> tuple[float, dict, float]:
    """(a') in a fresh process: (seconds, results, the child's peak RSS MB)."""
    return _in_child(["--competent-child", "--competent-batch", str(a.competent_batch)], a,
                     "competent script")
