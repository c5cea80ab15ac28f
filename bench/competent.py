"""The benchmark's competent peer: the sweep script a good engineer writes in an hour.

Unlike the naive loop (per cell: build a session, decode, resize and infer every image at batch
1), it does each piece of work once and keeps every core busy:

- every image is decoded once per decoder and preprocessed once per (decoder, resize) variant,
  in a thread pool of one thread per CPU (Pillow and OpenCV release the GIL while they work);
- each backend's session is built once (torch module, ONNX Runtime session, OpenVINO compiled
  model with INFERENCE_PRECISION_HINT=f32 for fp32), with the libraries' default threads (all
  cores), and fed batches of ``batch`` images;
- images go through in blocks (``block`` images), so memory stays bounded at 1,000+ images;
- at the end every cell is compared with the reference cell (top-1, max abs, cosine), as in
  the naive loop, so its answers can be checked against dmx's rows.

What it does not do (what dmx adds): reuse an output when two cells feed the model the very
same tensor, and spread the work over machines.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from user_pipeline import agreement, naive_decode, naive_preprocess, naive_session


def competent_loop(paths: list[str], cells, ref, model, artifacts, batch: int = 32,
                   block: int = 128, threads: int | None = None) -> tuple[float, dict]:
    """Returns (seconds, {(cell_id, image index): (top1, max abs vs reference, cosine)})."""
    t0 = time.perf_counter()
    decoders = list(dict.fromkeys(c.get("decoder") for c in cells))
    variants = list(dict.fromkeys((c.get("decoder"), c.get("resize")) for c in cells))
    backends = list(dict.fromkeys((c.get("backend"), c.get("precision")) for c in cells))
    sessions = {b: naive_session(b[0], artifacts, b[1]) for b in backends}

    def prepare(path: str) -> dict[tuple[str, str], np.ndarray]:
        decoded = {d: naive_decode(d, path) for d in decoders}
        return {(d, r): naive_preprocess(decoded[d], r, model.preprocess)[0] for d, r in variants}

    outputs: dict[str, list[np.ndarray]] = {c.cell_id: [] for c in cells}
    with ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 1) as pool:
        for start in range(0, len(paths), block):
            tensors = list(pool.map(prepare, paths[start: start + block]))
            stacked = {v: np.stack([t[v] for t in tensors]) for v in variants}
            for cell in cells:
                x = stacked[(cell.get("decoder"), cell.get("resize"))]
                run = sessions[(cell.get("backend"), cell.get("precision"))]
                for i in range(0, len(x), batch):
                    outputs[cell.cell_id].extend(np.asarray(run(np.ascontiguousarray(x[i: i + batch]))))
    return time.perf_counter() - t0, agreement(outputs, cells, ref)
