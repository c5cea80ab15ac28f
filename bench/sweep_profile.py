"""``bench/sweep.py --profile``'s breakdowns: where the driver's time goes in ``run_spec``
(cProfile, ``profile_driver``); a per-actor summary of ``ray.timeline`` and the CPU seconds per
process during the Ray run (``report_ray_run``); and a cProfile of the actors' code path
(``dmx.runner.worker.Worker``, 1 thread) bucketed by stage, run in a fresh process like an actor
(``sweep.py --profile-child CHUNK_SIZE``, ``profile_child``)."""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from sweep_common import run_child, setup


# ----------------------------------------------------------------------------- the driver
def profile_driver(run_spec, spec, opts, executor: str):
    """``run_spec(spec, opts)`` under cProfile: (wall seconds, its result); prints the
    cumulative seconds of the driver's main steps."""
    import cProfile
    import pstats
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    s = prof.runcall(run_spec, spec, opts)
    wall = time.perf_counter() - t0
    st = pstats.Stats(prof).stats
    wanted = ("list_images", "resolve_model", "prepare_artifacts", "fingerprint", "_cells_table",
              "write_manifest", "ray_init", "wait", "get", "write_chunk", "merge_images", "kill")
    print(f"driver profile of run_spec ({executor}, {wall:.2f} s wall), cumulative seconds:")
    for (filename, _line, func), (_cc, nc, _tt, ct, _callers) in sorted(st.items(), key=lambda kv: -kv[1][3]):
        if func in wanted and ("runner" in filename or "results" in filename or "ray" in filename):
            print(f"    {func:<20} {ct:7.2f} s  {nc:>4} calls  ({Path(filename).parent.name}/{Path(filename).name})")
    return wall, s


# ----------------------------------------------------------------------------- the Ray run
def report_ray_run(a: argparse.Namespace, run_start: float, run_end: float, ph: dict) -> None:
    """After the profiled Ray run: the timeline per actor, and CPU seconds per process
    (``ph``: the monitor's phase over the run)."""
    ray_timeline_summary(a.timeline, run_start, run_end)
    cpu = sorted(ph["cpu_by_process"].items(), key=lambda kv: -kv[1])
    print("    CPU seconds per process during the ray run: "
          + ", ".join(f"{k} {v:.1f}" for k, v in cpu if v >= 0.05))


def ray_timeline_summary(path: str, run_start: float, run_end: float) -> None:
    """Per actor, from ``ray.timeline``: when its first chunk started, its busy time, the first
    chunk's duration (imports + model builds) vs the others, and when it went idle for good."""
    import ray
    events = ray.timeline(filename=None)
    if path:
        Path(path).write_text(json.dumps(events))
    by_actor: dict[str, list[tuple[float, float]]] = {}
    for e in events:
        if e.get("cat") == "task::_WorkerActor.process" and e.get("ph") == "X":
            start = e["ts"] / 1e6 - run_start
            if start < 0:
                continue  # an earlier run's actors
            by_actor.setdefault(e["tid"], []).append((start, e["dur"] / 1e6))
    wall = run_end - run_start
    print(f"ray timeline (seconds from the start of run_spec; run took {wall:.2f} s; the timeline "
          f"may miss the last chunk of an actor killed at the end):")
    for i, (_tid, tasks) in enumerate(sorted(by_actor.items())):
        tasks.sort()
        busy = sum(d for _, d in tasks)
        later = [d for _, d in tasks[1:]]
        print(f"    actor {i}: {len(tasks)} chunks, first starts {tasks[0][0]:.2f}, busy {busy:.2f} s "
              f"({busy / wall * 100:.0f} % of the run), first chunk {tasks[0][1]:.2f} s vs "
              f"{statistics.mean(later) if later else float('nan'):.2f} s mean of the others, last ends "
              f"{tasks[-1][0] + tasks[-1][1]:.2f}")


# ----------------------------------------------------------------------------- the workers' code
# (function name suffix in cProfile's keys, bucket); cumulative times, so buckets must not nest.
_BUCKETS = (
    ("imageinfo.py:image_info_with_header", "image info (header parse + sha256)"),
    ("worker.py:_decode", "decode"),
    ("worker.py:_preprocess", "resize + crop + normalise + tensor hash"),
    ("torch_backend.py:_infer_all", "infer torch"),
    ("onnxruntime_backend.py:_infer_all", "infer onnxruntime"),
    ("openvino_backend.py:_infer_all", "infer openvino"),
    ("torch_backend.py:_activate", "model build torch"),
    ("onnxruntime_backend.py:_activate", "model build onnxruntime"),
    ("openvino_backend.py:_activate", "model build openvino"),
    ("onnxruntime_backend.py:info", "backend info (reads the ONNX file)"),
    ("metrics.py:input_divergence_rows", "metric: input divergence"),
    ("metrics.py:output_divergence_rows", "metric: output divergence"),
    ("metrics.py:output_divergence", "metric: output divergence"),   # outputs of varying shape
    ("metrics.py:classification_rows", "metric: classification"),
    ("metrics.py:top5_rows", "metric: top-5"),
    ("worker.py:_rows", "rows"),   # reported minus the metric buckets, which it contains
)


def _bucket_times(stats) -> dict[str, tuple[float, int]]:
    """Cumulative seconds and call counts per bucket from a pstats.Stats."""
    out: dict[str, tuple[float, int]] = {}
    for (filename, _line, func), (_cc, nc, _tt, ct, _callers) in stats.stats.items():
        key = f"{filename}:{func}"
        for suffix, bucket in _BUCKETS:
            if key.endswith(suffix):
                t, n = out.get(bucket, (0.0, 0))
                out[bucket] = (t + ct, n + nc)
    return out


def profile_worker(paths: list[str], spec, cells, ref, model, artifacts, a: argparse.Namespace,
                   chunk_size: int) -> None:
    """The actors' code path (dmx.runner.worker.Worker, 1 thread) over the whole dataset in this
    process under cProfile: where one worker's CPU time goes, per image."""
    import cProfile
    import pstats

    import cv2
    import torch

    from dmx.runner.dataset import list_images
    from dmx.runner.plan import Plan, make_chunks
    from dmx.runner.worker import Worker
    threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    plan = Plan(run_id="profile", axes=spec.axis_names, cells=tuple(cells), reference_id=ref.cell_id,
                skipped={}, model=model, artifacts=artifacts, threads=1, batch=a.batch)
    chunks = make_chunks(list_images(spec.dataset), chunk_size)
    worker = Worker(plan)
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    for c in chunks:
        worker.process_chunk(c)
    prof.disable()
    total = time.perf_counter() - t
    torch.set_num_threads(threads[0])
    cv2.setNumThreads(threads[1])
    buckets = _bucket_times(pstats.Stats(prof))
    rows_s, rows_n = buckets.pop("rows", (0.0, 0))
    metric_s = sum(v[0] for k, v in buckets.items() if k.startswith("metric"))
    buckets["rows: Arrow columns, excl. metrics"] = (rows_s - metric_s, rows_n)
    n = len(paths)
    counters = worker.counters
    print(f"profile: one Worker, 1 thread, in a fresh process, {len(chunks)} chunks of {chunk_size}: "
          f"{total:.2f} s = {total / n * 1e3:.1f} ms per image (÷{a.workers} workers = "
          f"{total / a.workers:.2f} s); counters {dict(counters)}")
    for bucket, (sec, calls) in sorted(buckets.items(), key=lambda kv: -kv[1][0]):
        print(f"    {bucket:<40} {sec:7.2f} s {sec / total * 100:5.1f} %  {calls:>6} calls "
              f"{sec / calls * 1e3:8.2f} ms/call")
    rest = total - sum(v[0] for v in buckets.values())
    print(f"    {'everything else':<40} {rest:7.2f} s {rest / total * 100:5.1f} %")
    checks = counters.get("determinism_checks", 0)
    print(f"    (infer includes {int(checks)} determinism re-check batches of {a.batch} and the "
          f"warm-up batch of each model build)")


def profile_child(a: argparse.Namespace) -> None:
    """``sweep.py --profile-child CHUNK_SIZE``: ``profile_worker`` on this run's dataset."""
    paths, spec, cells, ref, model, artifacts = setup(a)
    profile_worker(paths, spec, cells, ref, model, artifacts, a, a.profile_child)


def profile_worker_in_child(a: argparse.Namespace, chunk_size: int) -> None:
    """``profile_worker`` in a fresh process, like an actor; prints its report."""
    child = run_child(["--profile-child", str(chunk_size)], a)
    print(child.stdout.rstrip() if child.returncode == 0 else f"profile failed:\n{child.stderr}")
