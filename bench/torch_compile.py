"""Benchmark (not a test): the torch-compile backend next to torch eager, side by side in one run.

What it does, on MobileNetV2 (or ``--model``) over the demo photos decoded by Pillow and resized
with Pillow bilinear as the model's own preprocessing:

1. ``prepare_artifacts`` makes the torch-compile product exactly as ``dmx run`` does: the
   driver's compile, its seconds recorded like a conversion (``cached`` says whether Inductor's
   cache under ``--cache`` already held it; use a fresh folder for a cold compile).
2. A worker-side runner activates from that cache (``compile_s``, ``inductor_cache_hit``).
3. Eager and compiled run the same batches alternately ``--repeat`` times (so both see the same
   machine load); best-of per image, the per-run speed ratio, and the divergence: max abs
   difference of the logits and top-1 agreement.

Run::

    python bench/torch_compile.py --cache /tmp/dmx-bench-cache --threads 1   # last line is JSON
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", required=True, help="dmx cache folder (fresh = cold compile)")
    ap.add_argument("--model", default="mobilenet_v2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=7)
    a = ap.parse_args()
    os.environ["DMX_CACHE"] = a.cache

    import numpy as np
    import torch

    from dmx.demo_data import build_demo_images
    from dmx.matrix import ModelSpec
    from dmx.runner.backends import BACKENDS, InferSetting
    from dmx.runner.convert import prepare_artifacts, resolve_model
    from dmx.runner.decoders import DecodeError, decode_options, get_decoder
    from dmx.runner.preprocess import model_input_pixels, normalise

    torch.set_num_threads(a.threads)
    model = resolve_model(ModelSpec(name=a.model))
    decoder, xs = get_decoder("pil"), []
    for p in build_demo_images(str(Path(a.cache) / "demo")):
        try:
            px = decoder.decode(Path(p).read_bytes(), decode_options({}))
        except DecodeError:
            continue
        xs.append(normalise(model_input_pixels(px, "pil-bilinear", model.preprocess), model.preprocess))
    x = np.stack(xs).astype(np.float32)

    eager_s = InferSetting(backend="torch", threads=a.threads)
    comp_s = InferSetting(backend="torch-compile", threads=a.threads, batch=a.batch)
    art = prepare_artifacts(model, {eager_s, comp_s}, calibration=lambda: None, threads=a.threads)
    key = BACKENDS["torch-compile"].model_key(comp_s)
    note = art.conversion_notes[key]
    if isinstance(note, str):
        raise SystemExit(f"torch-compile could not compile here: {note}")
    eager = BACKENDS["torch"](art, eager_s, threads=a.threads)
    compiled = BACKENDS["torch-compile"](art, comp_s, threads=a.threads)
    eager.activate()
    compiled.activate()

    def run(r) -> tuple[np.ndarray, float]:
        t = time.perf_counter()
        y = np.concatenate([r.infer(x[i: i + a.batch]) for i in range(0, len(x), a.batch)])
        return y, time.perf_counter() - t

    te, tc = [], []
    for _ in range(a.repeat):
        ye, s1 = run(eager)
        yc, s2 = run(compiled)
        te.append(s1)
        tc.append(s2)
    print(f"eager/compiled time per run: {[round(e / c, 2) for e, c in zip(te, tc)]}")
    print(json.dumps({
        "model": a.model, "images": len(x), "threads": a.threads, "batch": a.batch,
        "driver_compile_s": note["seconds"], "driver_compile_cached": note["cached"],
        "worker_compile_s": compiled.info()["properties"]["compile_s"],
        "worker_cache_hit": compiled.info()["properties"]["inductor_cache_hit"],
        "eager_ms_per_image": round(min(te) / len(x) * 1e3, 2),
        "compiled_ms_per_image": round(min(tc) / len(x) * 1e3, 2),
        "speedup": round(min(te) / min(tc), 2),
        "max_abs_vs_eager": float(np.abs(ye - yc).max()),
        "top1_agree": float((ye.argmax(1) == yc.argmax(1)).mean()),
        "load_average": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
