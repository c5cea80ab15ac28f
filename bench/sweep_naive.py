"""``bench/sweep.py``'s (a): the naive loop, the one users write, and the fresh process it runs
in (``sweep.py --naive-child``). (a'), ``bench/competent.py``'s script, runs in the same kind of
process (``sweep.py --competent-child``); both build on ``user_pipeline.py``'s decode,
preprocess and session code. Both children import the libraries before their clock starts and print one JSON line:
seconds, their own peak RSS (VmHWM) and every (cell, image)'s top-1, max abs and cosine vs the
reference cell."""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
from sweep_common import child_json, import_libraries, own_peak_rss_mb, setup
from user_pipeline import agreement, naive_decode, naive_preprocess, naive_session


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
