"""Benchmark (not a test): one sweep of real photos through the real model, four ways.

What it measures, in one process, on one spec (default: decoder pil,opencv x resize
pil-bilinear,cv2-linear x backend torch,onnxruntime,openvino at fp32 = 12 cells, model
mobilenet_v2) over the same distinct real-photo JPEGs (``--images``, default 200, built once,
offline, by ``bench/photos.py`` into ``bench/.data/``):

(a) naive: the loop users write, run as a fresh process (imports done before its clock
    starts). For each cell: build that cell's backend session (torch model
    with weights / onnxruntime InferenceSession / OpenVINO compiled model, from the same cached
    ONNX file dmx uses), then for each image: read, decode, resize + centre-crop + normalise,
    infer at batch 1, keep the output; at the end compare every cell with the reference cell.
    Library-default thread settings (printed). OpenVINO gets INFERENCE_PRECISION_HINT=f32
    because the spec asks fp32 (without it the CPU plugin runs bf16 on avx512_bf16 CPUs).
    Its top-1 labels are checked against dmx's rows.
(a') competent: ``bench/competent.py``, the script a good engineer writes in an hour, in a
    fresh process like (a): decode once per decoder, preprocess once per variant (a thread per
    CPU), sessions built once with all-core threads, batches of ``--competent-batch``. Its top-1
    labels are checked against dmx's rows too.
(b) dmx, local executor: ``run_spec(spec, RunOptions(executor="local"))``, progress off.
(c) dmx on Ray with ``--workers`` actors. Ray is started once before timing (a cluster is up
    in real audits; ``ray.init`` time is printed separately); the timed run includes actor
    start, imports, model builds, the sweep and the Parquet writes.
(d) floor: the unit costs of the irreducible operations, summed, divided by the workers:
    images x decoders decodes, images x decoders x resizes preprocessings (resize, crop,
    normalise) and distinct-input-tensors x backends inferences. Each unit cost is the median
    over the dataset, measured in-process with 1 thread with dmx's own decoders, resizers and
    backend runners (inference at ``--batch``), after ``keep_freed_memory()``: glibc's default
    allocator unmaps every block over 32 MiB on free, so torch page-faults its batch-8
    activations in again on every batch - a cost of the allocator, not of the operation. The
    same inference costs in a fresh process with and without that setting are printed too,
    with the floor they would give. Distinct tensors are counted by hashing every
    (image, decoder, resize) tensor.

Conversion (torch -> ONNX) is cached by dmx and done before any timing; no timing includes it.
Timings on a shared machine are only as good as its quiet: the script first waits for idle
CPUs (``--wait-quiet``), prints for every phase the CPU seconds other processes used meanwhile
("foreign"), and with ``--repeat N`` runs (a), (b), (c) N times, interleaved, keeping the
fastest. Peak RSS: the sum of RSS over this process and its descendants, sampled every 0.1 s
(psutil; with Ray this covers the driver, GCS, raylet, agents and actors; an idle Ray session
is left out of (a) and (b); shared pages count once per process, so it is an upper bound),
plus ``getrusage`` maxrss of this process and the naive process's own peak (VmHWM).

``--profile`` adds: where the driver's time goes in ``run_spec`` (cProfile), a per-actor
summary of ``ray.timeline`` (start, busy time, first chunk vs the others, end), CPU seconds per
process during the Ray run, and a cProfile of the actors' code path (``dmx.runner.worker.Worker``,
1 thread, in a fresh process like an actor) bucketed by stage.

``--memory-scaling`` instead runs ``dmx run --executor local`` in a subprocess on N and 10N
tiny (64x64) JPEGs, both at the same chunk size, and prints each child's own peak RSS
(VmHWM) and their ratio.

Run::

    . .venv/bin/activate
    python bench/sweep.py                           # 200 images; the last line is JSON
    python bench/sweep.py --repeat 3 --profile      # best of 3, with the breakdowns
    python bench/sweep.py --images 1000 --skip-naive
    python bench/sweep.py --memory-scaling --memory-images 200
    python bench/sweep.py --memory-scaling --memory-images 100 --memory-model mobilenet_v2

Last line: {"images", "naive_s", "competent_s", "local_s", "ray_s", "floor_s", "ray_vs_naive",
"ray_vs_floor", "local_vs_naive", "ray_vs_competent", "local_vs_competent", "ray_start_s",
"bare_actor_start_s", "ray_after_start_vs_floor", "floor_concurrent_s", "ray_vs_floor_concurrent",
"peak_rss_mb"} (seconds; peak_rss_mb is the largest sampled tree RSS). Targets: ray_vs_competent
<= 0.8 and local_vs_competent <= 1.0 at 1,000 images; ray_vs_floor <= 1.3 at 200.

What the floor leaves out, measured beside it: ``ray_start_s``, the time (c)'s workers took to
answer dmx's probe (process start and library imports; the manifest's ``executor.start_s``), and
``bare_actor_start_s``, the same for actors that only import the libraries, in the same Ray
session; ``ray_after_start_vs_floor`` is (c) without its start. ``floor_concurrent_s`` is the
floor with each backend's inference cost measured in ``--workers`` fresh processes running at
once, as the actors do, instead of one alone (workers on one machine share its caches and memory
bandwidth).

Where each mode lives: this file is the entry point (arguments, dataset and spec, the timed
phases (b) and (c), the table and the JSON line); (a), and the fresh process (a') runs in, in
``bench/sweep_naive.py`` (the competent script itself is ``bench/competent.py``); (d) in
``bench/sweep_floor.py``; the ``--profile`` breakdowns in ``bench/sweep_profile.py``;
``--memory-scaling`` in ``bench/sweep_memory.py``; what they share (spec, model files, child
processes, the RSS/CPU sampler) in ``bench/sweep_common.py``, and waiting for a quiet machine in
``bench/machine.py``. Child processes run this file with a hidden flag (``--naive-child``,
``--competent-child``, ``--unit-cost``, ``--profile-child``) that hands over to those modules.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

from machine import wait_for_quiet  # noqa: E402
from sweep_common import (  # noqa: E402
    TreeMonitor,
    import_libraries,
    make_spec,
    maxrss_mb,
    photo_set,
    prepare,
)
from sweep_floor import floor_costs, report_floor, unit_cost_child  # noqa: E402
from sweep_memory import memory_scaling  # noqa: E402
from sweep_naive import (  # noqa: E402
    competent_child,
    competent_in_child,
    naive_child,
    naive_in_child,
    naive_threads,
)
from sweep_profile import (  # noqa: E402
    profile_child,
    profile_driver,
    profile_worker_in_child,
    report_ray_run,
)


# ----------------------------------------------------------------------------- (b), (c) dmx
def run_dmx(spec, out: Path, executor: str, workers: int | None, a: argparse.Namespace,
            profile: bool = False):
    """Time ``run_spec``; with ``profile``, also print where the driver's time goes."""
    from dmx.runner.sweep import RunOptions, run_spec
    opts = RunOptions(out=str(out), executor=executor, workers=workers, chunk_size=a.chunk_size,
                      batch=a.batch, progress=False)
    if profile:
        return profile_driver(run_spec, spec, opts, executor)
    t0 = time.perf_counter()
    s = run_spec(spec, opts)
    return time.perf_counter() - t0, s


def dmx_top1(run_dir: Path, paths: list[str]) -> dict:
    import pyarrow.dataset as ds
    t = ds.dataset(str(run_dir / "rows"), format="parquet", partitioning="hive").to_table(
        columns=["cell_id", "image_id", "top1", "status"]).to_pylist()
    index = {Path(p).name: i for i, p in enumerate(paths)}
    return {(r["cell_id"], index[r["image_id"]]): r["top1"] for r in t if r["status"] == "ok"}


class _BareActor:
    """The least a fresh Ray worker does before it can compute: import what dmx's actors
    import. Defined in this script, so Ray ships it by value."""

    def __init__(self) -> None:
        import cv2  # noqa: F401
        import numpy  # noqa: F401
        import onnxruntime  # noqa: F401
        import openvino  # noqa: F401
        import pyarrow  # noqa: F401
        import torch  # noqa: F401
        from PIL import Image  # noqa: F401

    def ping(self) -> int:
        return os.getpid()


def bare_actor_start_s(workers: int) -> float:
    """Seconds until ``workers`` fresh actors that only import the libraries answer: the part
    of (c)'s worker start that no runner can avoid without keeping processes from an earlier
    run."""
    import ray
    cls = ray.remote(num_cpus=1)(_BareActor)
    t = time.perf_counter()
    actors = [cls.remote() for _ in range(workers)]
    ray.get([x.ping.remote() for x in actors])
    seconds = time.perf_counter() - t
    for x in actors:
        ray.kill(x)
    return seconds


# ----------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=200, help="distinct real-photo JPEGs (default 200)")
    ap.add_argument("--data", default=str(BENCH / ".data"), help="dataset cache folder (default bench/.data)")
    ap.add_argument("--model", default="mobilenet_v2", help="built-in model (default mobilenet_v2)")
    ap.add_argument("--decoders", type=lambda s: s.split(","), default=["pil", "opencv"],
                    help="decoder levels, comma-separated; the first is the reference's")
    ap.add_argument("--resizes", type=lambda s: s.split(","), default=["pil-bilinear", "cv2-linear"],
                    help="resize levels (naive loop: pil-bilinear, cv2-linear, cv2-area)")
    ap.add_argument("--backends", type=lambda s: s.split(","), default=["torch", "onnxruntime", "openvino"],
                    help="backend levels; the first is the reference's")
    ap.add_argument("--precision", default="fp32", help="one float precision for every cell")
    ap.add_argument("--workers", type=int, default=2, help="Ray actors, and the floor's divisor")
    ap.add_argument("--batch", type=int, default=8, help="dmx inference batch (and the floor's)")
    ap.add_argument("--chunk-size", type=int, default=None, help="dmx chunk size (default: dmx's)")
    ap.add_argument("--floor-sample", type=int, default=64,
                    help="images per resize used to time inference for the floor (default 64)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run (a), (b), (c) this many times, interleaved; report the fastest")
    ap.add_argument("--skip-naive", action="store_true", help="skip (a) (slowest part)")
    ap.add_argument("--skip-local", action="store_true", help="skip (b)")
    ap.add_argument("--skip-competent", action="store_true", help="skip (a')")
    ap.add_argument("--competent-batch", type=int, default=32, help="the competent script's batch")
    ap.add_argument("--competent-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--profile", action="store_true",
                    help="also: profile the Ray driver, summarise ray.timeline per actor, CPU per "
                         "process, and cProfile the worker code path (1 thread, fresh process)")
    ap.add_argument("--timeline", default=None, metavar="FILE",
                    help="with --profile: save the Ray timeline (chrome://tracing JSON) here")
    ap.add_argument("--wait-quiet", type=float, default=300, metavar="S",
                    help="first wait up to S seconds for other processes to leave the CPUs idle")
    ap.add_argument("--keep", default=None, help="keep the dmx run directories under this folder")
    ap.add_argument("--memory-scaling", action="store_true",
                    help="instead: peak RSS of dmx local on N and 10N tiny images")
    ap.add_argument("--memory-images", type=int, default=200, help="N for --memory-scaling")
    ap.add_argument("--memory-model", default="tiny", help="model for --memory-scaling (default tiny)")
    ap.add_argument("--memory-chunk-size", type=int, default=64,
                    help="chunk size of both --memory-scaling runs (default 64, dmx's largest)")
    ap.add_argument("--unit-cost", default=None, help=argparse.SUPPRESS)   # child mode
    ap.add_argument("--tuned-malloc", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--profile-child", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--naive-child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.unit_cost:
        unit_cost_child(a)
        return
    if a.naive_child:
        naive_child(a)
        return
    if a.competent_child:
        competent_child(a)
        return
    if a.profile_child:
        profile_child(a)
        return
    if a.memory_scaling:
        memory_scaling(a)
        return

    quiet = wait_for_quiet(a.wait_quiet)
    mon = TreeMonitor()
    paths = photo_set(a)
    data_dir = Path(paths[0]).parent
    spec = make_spec(data_dir, a)
    t = time.perf_counter()
    cells, ref, model, artifacts = prepare(spec)
    prep_s = time.perf_counter() - t
    for p in paths:  # page cache warm for everyone
        Path(p).read_bytes()
    import_libraries()  # imports are not part of any timing
    cpus = os.cpu_count()
    print(f"dataset: {len(paths)} distinct JPEGs in {data_dir} "
          f"({sum(Path(p).stat().st_size for p in paths) / 2**20:.1f} MB)")
    print(f"spec: {len(cells)} cells = decoder {a.decoders} x resize {a.resizes} x backend "
          f"{a.backends} x precision {a.precision}; model {a.model}; reference {ref.label()}")
    print(f"machine: {cpus} CPUs, {quiet:.2f} cores busy before start; model files ready in "
          f"{prep_s:.1f} s (cached conversion, untimed); each timed phase runs {a.repeat}x, "
          f"interleaved, and its fastest run is reported")
    tmp = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="dmx-bench-"))
    tmp.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[tuple[float, dict]]] = {}     # phase -> [(seconds, monitor phase)]

    def counts(c: dict) -> str:
        return (f"{int(c.get('decodes', 0))} decodes, {int(c.get('resizes', 0))} resizes, "
                f"{int(c.get('inferences', 0))} inferences, {int(c.get('reuses', 0))} reuses, "
                f"{int(c.get('model_builds', 0))} model builds, "
                f"{int(c.get('determinism_checks', 0))} determinism checks")

    def note(name: str, seconds: float, ph: dict, text: str) -> None:
        runs.setdefault(name, []).append((seconds, ph))
        print(f"{text}  [{ph['cpu_s']:.1f} CPU s; foreign {ph['foreign_cpu_s']:.1f} CPU s]")

    naive_top1 = competent_top1 = None
    if not a.skip_naive:
        print(f"(a) naive: threads: {naive_threads()}")
    ray_init_s = where = None
    ray_procs: set[int] = set()      # the idle Ray session's processes, left out of (a) and (b)
    ray_start: dict[float, float] = {}  # (c)'s seconds -> its workers' start (probe answered)
    for r in range(a.repeat):
        if not a.skip_naive:
            mon.reset(exclude=ray_procs)
            seconds, naive_top1, child_rss = naive_in_child(a)
            note("naive", seconds, mon.phase(),
                 f"(a) naive loop: {seconds:.2f} s in a fresh process ({len(cells)} session builds, "
                 f"{len(cells) * len(paths)} decodes/resizes/inferences at batch 1; its peak RSS "
                 f"{child_rss:.0f} MB)")
        if not a.skip_competent:
            mon.reset(exclude=ray_procs)
            seconds, competent_top1, child_rss = competent_in_child(a)
            note("competent", seconds, mon.phase(),
                 f"(a') competent script: {seconds:.2f} s in a fresh process ({len(a.backends)} "
                 f"session builds, {len(a.decoders)} decodes and {len(a.decoders) * len(a.resizes)} "
                 f"preprocessings per image on {cpus} threads, {len(cells) * len(paths)} inferences "
                 f"at batch {a.competent_batch}, library-default threads; its peak RSS {child_rss:.0f} MB)")
        if not a.skip_local:
            out = tmp / f"local-{r}"
            mon.reset(exclude=ray_procs)
            seconds, s = run_dmx(spec, out, "local", None, a)
            m = json.loads((out / "manifest.json").read_text())
            note("local", seconds, mon.phase(),
                 f"(b) dmx local: {seconds:.2f} s (1 worker x {cpus} threads, chunk size "
                 f"{m['chunk_size']}, {m['chunks']} chunks, batch {a.batch}; {counts(s.counters)}; "
                 f"{s.rows} rows)")
        if ray_init_s is None:
            from dmx.runner.executors import ray_init
            before = mon.children_now()
            mon.reset()
            t = time.perf_counter()
            where = ray_init(None, a.workers)
            ray_init_s = time.perf_counter() - t
            ph = mon.phase()
            ray_procs = mon.children_now() - before
            runs["ray.init"] = [(ray_init_s, ph)]
            print(f"(c) ray.init ({where}, num_cpus={a.workers}): {ray_init_s:.2f} s, once, not in "
                  f"any timing; {ph['procs']} processes, {ph['peak_rss_mb']:.0f} MB")
        out = tmp / f"ray-{r}"
        profiling = a.profile and r == a.repeat - 1
        mon.reset()
        run_start = time.time()
        seconds, s = run_dmx(spec, out, "ray", a.workers, a, profile=profiling)
        run_end = time.time()
        ph = mon.phase()
        m = json.loads((out / "manifest.json").read_text())
        ray_start[seconds] = s.start_s
        note("ray", seconds, ph,
             f"(c) dmx ray: {seconds:.2f} s ({a.workers} actors x 1 thread, up in {s.start_s:.2f} s; "
             f"chunk size {m['chunk_size']}, {m['chunks']} chunks, batch {a.batch}; "
             f"{counts(s.counters)}; {s.rows} rows)")
        if r == 0:
            builds = {k: v.get("build_s") for k, v in m.get("backends", {}).items()}
            print(f"    model build + warm-up s, per setting, as first reported by an actor: {builds}")
        if profiling:
            report_ray_run(a, run_start, run_end, ph)
    bare_s = bare_actor_start_s(a.workers)
    print(f"    {a.workers} bare actors that only import torch, onnxruntime, openvino, cv2, PIL and "
          f"pyarrow answer after {bare_s:.2f} s (measured after (c), in the same Ray session)")
    import ray
    ray.shutdown()

    for name, top1s in (("naive", naive_top1), ("competent", competent_top1)):
        if top1s is None:
            continue
        dmx = dmx_top1(tmp / "ray-0", paths)
        same = sum(1 for k, (top1, _, _) in top1s.items() if dmx.get(k) == top1)
        worst = max(d for _, d, _ in top1s.values())
        print(f"    check: {name} top-1 == dmx top-1 on {same} of {len(top1s)} (cell, image) "
              f"pairs; {name} max |logit - reference logit| over all cells {worst:.3g}")

    mon.reset()
    fl = floor_costs(paths, cells, model, artifacts, a)
    ph = mon.phase()
    runs["floor"] = [(fl["floor_s"], ph)]
    report_floor(fl, ph, a)
    mon.stop()
    if a.profile:  # in a fresh process, like an actor (this one has its allocator tuned now)
        profile_worker_in_child(a, m["chunk_size"])

    best = {k: min(v, key=lambda x: x[0]) for k, v in runs.items()}
    print("per phase (fastest run): peak RSS = sampled sum of RSS over this process and its "
          "descendants (Ray: driver + GCS + raylet + agents + workers); CPU = their CPU seconds; "
          "foreign = CPU seconds of other processes meanwhile (0 on a quiet machine)")
    for k, (_, v) in best.items():
        print(f"    {k:<9} peak RSS {v['peak_rss_mb']:8.1f} MB over {v['procs']:>2} processes, "
              f"CPU {v['cpu_s']:6.1f} s, foreign CPU {v['foreign_cpu_s']:6.1f} s")
    print(f"    getrusage maxrss of this process (driver of (b), (c)): {maxrss_mb(resource.RUSAGE_SELF)} "
          f"MB; the naive process's own peak (VmHWM) is printed with (a). RUSAGE_CHILDREN is not "
          f"used: Ray's processes are not waited-for children until shutdown, and on Linux a "
          f"child's ru_maxrss starts at its parent's RSS at fork time")
    print()
    res = {k: v[0] for k, v in best.items()}
    print(f"{'':24}{'seconds':>10}{'x naive':>10}{'x floor':>10}{'CPU s':>8}  all runs (s)")
    for name, label in (("naive", "(a) naive loop"), ("competent", "(a') competent script"),
                        ("local", "(b) dmx local"),
                        ("ray", f"(c) dmx ray x{a.workers}"), ("floor", "(d) floor")):
        if name not in res:
            continue
        v = res[name]
        xn = f"{v / res['naive']:.3f}" if "naive" in res else "-"
        cpu_s = fl["total_s"] if name == "floor" else best[name][1]["cpu_s"]
        print(f"{label:<24}{v:>10.2f}{xn:>10}{v / res['floor']:>10.3f}{cpu_s:>8.1f}  "
              + " ".join(f"{x:.2f}" for x, _ in runs[name]))
    if not a.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    r3 = lambda v: None if v is None else round(v, 3)  # noqa: E731
    naive, local, ray_s, floor = res.get("naive"), res.get("local"), res["ray"], res["floor"]
    competent = res.get("competent")
    start_s = ray_start[ray_s]
    print(f"(c)'s workers were up after {start_s:.2f} s ({start_s / floor:.2f} x the floor; bare "
          f"imports {bare_s:.2f} s); the rest of the run took {ray_s - start_s:.2f} s = "
          f"{(ray_s - start_s) / floor:.3f} x the floor. The floor counts no process start: with "
          f"fresh worker processes ray_vs_floor cannot be below {1 + bare_s / floor:.2f} here.")
    print(json.dumps({"images": len(paths), "naive_s": r3(naive), "competent_s": r3(competent),
                      "local_s": r3(local),
                      "ray_s": r3(ray_s), "floor_s": r3(floor),
                      "ray_vs_naive": r3(ray_s / naive) if naive else None,
                      "ray_vs_floor": r3(ray_s / floor),
                      "local_vs_naive": r3(local / naive) if naive and local else None,
                      "ray_vs_competent": r3(ray_s / competent) if competent else None,
                      "local_vs_competent": r3(local / competent) if competent and local else None,
                      "ray_start_s": r3(start_s), "bare_actor_start_s": r3(bare_s),
                      "ray_after_start_vs_floor": r3((ray_s - start_s) / floor),
                      "floor_concurrent_s": r3(fl.get("floor_concurrent_s")),
                      "ray_vs_floor_concurrent": r3(ray_s / fl["floor_concurrent_s"])
                      if fl.get("floor_concurrent_s") else None,
                      "peak_rss_mb": max(v[1]["peak_rss_mb"] for v in best.values())}))


if __name__ == "__main__":
    main()
