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
process during the Ray run, and a cProfile of the actors' code path (``runner.worker.Worker``,
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
"ray_vs_floor", "local_vs_naive", "ray_vs_competent", "local_vs_competent", "peak_rss_mb"}
(seconds; peak_rss_mb is the largest sampled tree RSS). Targets: ray_vs_competent <= 0.8 and
local_vs_competent <= 1.0 at 1,000 images; ray_vs_floor <= 1.3 at 200.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

from machine import wait_for_quiet  # noqa: E402
from photos import build_photo_set, build_tiny_set  # noqa: E402


# ----------------------------------------------------------------------------- memory sampling
class TreeMonitor:
    """Samples, every ``interval_s``, this process and all its descendants: the peak of their
    summed RSS, and their CPU seconds (last value seen per pid, so a process that exits loses
    at most one interval). With the machine's busy CPU seconds (/proc/stat) this also gives the
    CPU seconds used by *other* processes during a phase: load that skews the timings."""

    def __init__(self, interval_s: float = 0.1) -> None:
        import psutil
        self._psutil = psutil
        self.me = psutil.Process()
        self.interval_s = interval_s
        self.names: dict[int, str] = {}
        self.exclude: set[int] = set()   # roots of process trees left out (an idle Ray session)
        self._lock = threading.Lock()
        self.reset()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _busy_s(self) -> float:
        t = self._psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0)

    def sample(self) -> None:
        total, n = 0, 0
        procs = [self.me]
        try:
            procs += self.me.children(recursive=True)
        except self._psutil.Error:
            pass
        if self.exclude:
            skip = set(self.exclude)
            for pid in self.exclude:
                try:
                    skip.update(c.pid for c in self._psutil.Process(pid).children(recursive=True))
                except self._psutil.Error:
                    pass
            procs = [p for p in procs if p.pid not in skip]
        with self._lock:
            for p in procs:
                try:
                    with p.oneshot():
                        total += p.memory_info().rss
                        c = p.cpu_times()
                        self.names[p.pid] = _proc_name(p)  # Ray retitles workers as actors
                    self.cpu[p.pid] = c.user + c.system
                    n += 1
                except self._psutil.Error:
                    pass
            if total > self.peak:
                self.peak, self.peak_procs = total, n

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def children_now(self) -> set[int]:
        return {c.pid for c in self.me.children(recursive=False)}

    def reset(self, exclude: set[int] | None = None) -> None:
        """Start a phase: peak RSS and CPU accounting from now, without the ``exclude`` trees."""
        self.exclude = set(exclude or ())
        with getattr(self, "_lock", threading.Lock()):
            self.peak, self.peak_procs = 0, 0
            self.cpu: dict[int, float] = {}
            self.busy0 = self._busy_s()
        self.sample()
        with self._lock:
            self.cpu0 = dict(self.cpu)

    def phase(self) -> dict[str, float]:
        """Peak tree RSS (MB), our CPU seconds and other processes' CPU seconds since reset."""
        self.sample()
        with self._lock:
            ours = sum(v - self.cpu0.get(pid, 0.0) for pid, v in self.cpu.items())
            busy = self._busy_s() - self.busy0
            by_name: dict[str, float] = {}
            for pid, v in self.cpu.items():
                name = "this process" if pid == self.me.pid else self.names.get(pid, "?")
                by_name[name] = by_name.get(name, 0.0) + v - self.cpu0.get(pid, 0.0)
            return {"peak_rss_mb": mb(self.peak), "procs": self.peak_procs,
                    "cpu_s": round(ours, 1), "foreign_cpu_s": round(max(0.0, busy - ours), 1),
                    "cpu_by_process": by_name}

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _proc_name(p) -> str:
    """A short name: Ray's process titles (ray::_WorkerActor, raylet, gcs_server) or the exe."""
    try:
        cmd = p.cmdline()
    except Exception:  # noqa: BLE001  (psutil raises several kinds for vanished processes)
        cmd = []
    title = cmd[0].split()[0] if cmd else p.name()
    if title.startswith("ray::"):
        return "ray::_WorkerActor" if title.startswith("ray::_WorkerAct") else title
    if cmd and len(cmd) > 1 and cmd[0].endswith(("python", "python3")):
        return "python " + Path(cmd[2] if cmd[1] == "-u" and len(cmd) > 2 else cmd[1]).name
    return p.name()


def keep_freed_memory() -> bool:
    """glibc: serve large allocations from the heap and never trim it (mallopt), so freed
    blocks are reused instead of being unmapped and page-faulted in again on the next use.
    Irreversible for this process. Returns False where there is no glibc mallopt."""
    import ctypes
    import ctypes.util
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(-3, 1 << 30)) and bool(mallopt(-1, 1 << 30))  # M_MMAP_/M_TRIM_THRESHOLD


def mb(n_bytes: float) -> float:
    return round(n_bytes / 2 ** 20, 1)


def maxrss_mb(who: int) -> float:
    return round(resource.getrusage(who).ru_maxrss / 1024, 1)  # Linux: KiB


# ----------------------------------------------------------------------------- the spec
def make_spec(data_dir: Path, a: argparse.Namespace):
    import runner.backends  # noqa: F401 - registers the backends' axes and levels
    from matrix import parse_spec
    axes = {"decoder": a.decoders, "resize": a.resizes, "backend": a.backends,
            "precision": [a.precision]}
    ref = {"decoder": a.decoders[0], "resize": a.resizes[0], "backend": a.backends[0],
           "precision": a.precision}
    return parse_spec({"name": "bench-sweep", "dataset": {"path": str(data_dir)},
                       "model": a.model, "axes": axes, "reference": ref})


def prepare(spec):
    """Model files for every backend (cached conversion, untimed) and the cells."""
    from runner.convert import prepare_artifacts, resolve_model
    from runner.sweep import plan_cells
    cells, ref = plan_cells(spec)
    model = resolve_model(spec.model)
    settings = {(c.get("backend"), c.get("precision"), c["conversion"]) for c in cells}

    def no_calibration():
        raise SystemExit("this benchmark runs float precisions only (int8 needs calibration)")
    return cells, ref, model, prepare_artifacts(model, settings, no_calibration)


# ----------------------------------------------------------------------------- (a) naive loop
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
    ref_out = outputs[ref.cell_id]
    agree = {}
    for cell in cells:
        for i, (y, r) in enumerate(zip(outputs[cell.cell_id], ref_out)):
            d = float(np.max(np.abs(y - r)))
            cos = float(y @ r / (np.linalg.norm(y) * np.linalg.norm(r)))
            agree[(cell.cell_id, i)] = (int(np.argmax(y)), d, cos)
    return time.perf_counter() - t0, agree


def naive_in_child(a: argparse.Namespace) -> tuple[float, dict, float]:
    """(a) in a fresh process, as a user's script runs: (seconds, results, child's peak RSS MB).
    The child imports the libraries before its clock starts."""
    cmd = [sys.executable, __file__, "--naive-child", *_common_args(a)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"naive loop failed:\n{out.stderr}")
    d = json.loads(out.stdout.strip().splitlines()[-1])
    return d["seconds"], {(c, i): tuple(v) for c, i, *v in d["results"]}, d["peak_rss_mb"]


def own_peak_rss_mb() -> float:
    """This process's peak RSS since its exec (VmHWM). Not getrusage: on Linux a child's
    ru_maxrss starts from its parent's RSS at fork time."""
    with open("/proc/self/status", encoding="ascii") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return round(kb / 1024, 1)


def naive_child(a: argparse.Namespace) -> None:
    paths = build_photo_set(Path(a.data) / f"photos-{a.images}", a.images)
    cells, ref, model, artifacts = prepare(make_spec(Path(paths[0]).parent, a))
    import cv2  # noqa: F401  (imports are not part of the timing, as in the other phases)
    import onnxruntime  # noqa: F401
    import openvino  # noqa: F401
    import torch  # noqa: F401
    seconds, results = naive_loop(paths, cells, ref, model, artifacts)
    print(json.dumps({"seconds": seconds, "peak_rss_mb": own_peak_rss_mb(),
                      "results": [[c, i, *v] for (c, i), v in results.items()]}))


def competent_child(a: argparse.Namespace) -> None:
    from competent import competent_loop
    paths = build_photo_set(Path(a.data) / f"photos-{a.images}", a.images)
    cells, ref, model, artifacts = prepare(make_spec(Path(paths[0]).parent, a))
    import cv2  # noqa: F401  (imports are not part of the timing, as in the other phases)
    import onnxruntime  # noqa: F401
    import openvino  # noqa: F401
    import torch  # noqa: F401
    seconds, results = competent_loop(paths, cells, ref, model, artifacts, batch=a.competent_batch)
    print(json.dumps({"seconds": seconds, "peak_rss_mb": own_peak_rss_mb(),
                      "results": [[c, i, *v] for (c, i), v in results.items()]}))


def competent_in_child(a: argparse.Namespace) -> tuple[float, dict, float]:
    """(a') in a fresh process: (seconds, results, the child's peak RSS MB)."""
    cmd = [sys.executable, __file__, "--competent-child", "--competent-batch",
           str(a.competent_batch), *_common_args(a)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"competent script failed:\n{out.stderr}")
    d = json.loads(out.stdout.strip().splitlines()[-1])
    return d["seconds"], {(c, i): tuple(v) for c, i, *v in d["results"]}, d["peak_rss_mb"]


def _common_args(a: argparse.Namespace) -> list[str]:
    """The arguments that define the dataset and the spec, for child processes."""
    return ["--images", str(a.images), "--data", a.data, "--model", a.model,
            "--decoders", ",".join(a.decoders), "--resizes", ",".join(a.resizes),
            "--backends", ",".join(a.backends), "--precision", a.precision,
            "--batch", str(a.batch), "--workers", str(a.workers)]


# ----------------------------------------------------------------------------- (b), (c) dmx
def run_dmx(spec, out: Path, executor: str, workers: int | None, a: argparse.Namespace,
            profile_driver: bool = False):
    """Time ``run_spec``; with ``profile_driver``, also print where the driver's time goes."""
    from runner.sweep import RunOptions, run_spec
    opts = RunOptions(out=str(out), executor=executor, workers=workers, chunk_size=a.chunk_size,
                      batch=a.batch, progress=False)
    if not profile_driver:
        t0 = time.perf_counter()
        s = run_spec(spec, opts)
        return time.perf_counter() - t0, s
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


def dmx_top1(run_dir: Path, paths: list[str]) -> dict:
    import pyarrow.dataset as ds
    t = ds.dataset(str(run_dir / "rows"), format="parquet", partitioning="hive").to_table(
        columns=["cell_id", "image_id", "top1", "status"]).to_pylist()
    index = {Path(p).name: i for i, p in enumerate(paths)}
    return {(r["cell_id"], index[r["image_id"]]): r["top1"] for r in t if r["status"] == "ok"}


# ----------------------------------------------------------------------------- (d) floor
def median_ms(fn, items) -> float:
    ts = []
    for it in items:
        t = time.perf_counter()
        fn(it)
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


def floor_costs(paths: list[str], cells, model, artifacts, a: argparse.Namespace) -> dict:
    """Unit costs (ms, median, 1 thread) and the irreducible operation counts. Measured with
    freed memory kept (``keep_freed_memory``): the page faults glibc's default costs are not
    part of any operation (``fresh_infer_ms`` measures them separately)."""
    keep_freed_memory()
    import torch
    from runner.backends import BACKENDS, InferSetting
    from runner.decoders import DecodeOptions, get_decoder
    from runner.preprocess import model_input_pixels, normalise
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    import cv2
    cv2_threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        decoders = list(dict.fromkeys(c.get("decoder") for c in cells))
        resizes = list(dict.fromkeys(c.get("resize") for c in cells))
        backends = list(dict.fromkeys(c.get("backend") for c in cells))
        opts = DecodeOptions()
        dec = {d: get_decoder(d) for d in decoders}
        dec_ts: dict[str, list[float]] = {d: [] for d in decoders}
        pre_ts: dict[str, list[float]] = {r: [] for r in resizes}
        tensors: dict[str, list[np.ndarray]] = {r: [] for r in resizes}   # inference sample
        digests: list[set[bytes]] = [set() for _ in paths]
        for i, path in enumerate(paths):  # one image at a time: memory stays flat
            data = Path(path).read_bytes()
            for d in decoders:
                t = time.perf_counter()
                img = dec[d].decode(data, opts)
                dec_ts[d].append((time.perf_counter() - t) * 1e3)
                for r in resizes:
                    t = time.perf_counter()
                    x = normalise(model_input_pixels(img, r, model.preprocess), model.preprocess)
                    pre_ts[r].append((time.perf_counter() - t) * 1e3)
                    digests[i].add(hashlib.blake2b(x.tobytes(), digest_size=16).digest())
                    if d == decoders[0] and i < a.floor_sample:
                        tensors[r].append(x)
        decode_ms = {d: statistics.median(v) for d, v in dec_ts.items()}
        pre_ms = {r: statistics.median(v) for r, v in pre_ts.items()}
        distinct = sum(len(s) for s in digests)
        sample = [x for r in resizes for x in tensors[r]]
        infer_ms = {}
        for b in backends:
            runner = BACKENDS[b](artifacts, InferSetting(backend=b, precision=a.precision), threads=1)
            runner.activate()
            batches = [np.stack(sample[i: i + a.batch]) for i in range(0, len(sample) - a.batch + 1, a.batch)]
            infer_ms[b] = median_ms(runner.infer, batches) / a.batch
        n = len(paths)
        total_ms = (n * sum(decode_ms.values())
                    + n * len(decoders) * sum(pre_ms.values())
                    + distinct * sum(infer_ms.values()))
        return {"decode_ms": decode_ms, "preprocess_ms": pre_ms, "infer_ms_per_image": infer_ms,
                "decodes": n * len(decoders), "preprocessings": n * len(decoders) * len(resizes),
                "distinct_tensors": distinct, "inferences": distinct * len(backends),
                "total_s": total_ms / 1e3, "floor_s": total_ms / 1e3 / a.workers}
    finally:
        torch.set_num_threads(torch_threads)
        cv2.setNumThreads(cv2_threads)


# ----------------------------------------------------------------------------- profiling
# (function name suffix in cProfile's keys, bucket); cumulative times, so buckets must not nest.
_BUCKETS = (
    ("imageinfo.py:read_image_info", "image info (header parse + sha256)"),
    ("worker.py:_decode", "decode"),
    ("worker.py:_preprocess", "resize + crop + normalise + tensor hash"),
    ("torch_backend.py:_infer", "infer torch"),
    ("onnxruntime_backend.py:_infer", "infer onnxruntime"),
    ("openvino_backend.py:_infer", "infer openvino"),
    ("torch_backend.py:_activate", "model build torch"),
    ("onnxruntime_backend.py:_activate", "model build onnxruntime"),
    ("openvino_backend.py:_activate", "model build openvino"),
    ("onnxruntime_backend.py:info", "backend info (reads the ONNX file)"),
    ("metrics.py:input_divergence", "metric: input divergence"),
    ("metrics.py:output_divergence", "metric: output divergence"),
    ("metrics.py:classification_divergence", "metric: classification"),
    ("metrics.py:top5_of", "metric: top-5"),
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
    """The actors' code path (runner.worker.Worker, 1 thread) over the whole dataset in this
    process under cProfile: where one worker's CPU time goes, per image."""
    import cProfile
    import pstats

    import cv2
    import torch
    from runner.dataset import list_images
    from runner.plan import Plan, make_chunks
    from runner.worker import Worker
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
    buckets["rows: dicts -> pa.Table, excl. metrics"] = (rows_s - metric_s, rows_n)
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


def fresh_infer_ms(backend: str, a: argparse.Namespace, tuned: bool) -> dict:
    """Inference ms per image at ``--batch``, 1 thread, in a fresh process (as an actor starts),
    with glibc's default allocator or with freed memory kept; also its system-CPU share and
    minor page faults per batch."""
    cmd = [sys.executable, __file__, "--unit-cost", backend, *_common_args(a)]
    out = subprocess.run(cmd + (["--tuned-malloc"] if tuned else []), capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"unit-cost subprocess failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def unit_cost_child(a: argparse.Namespace) -> None:
    """--unit-cost BACKEND: time inference on real inputs, print one JSON line."""
    if a.tuned_malloc:
        keep_freed_memory()
    import torch
    from runner.backends import BACKENDS, InferSetting
    from runner.decoders import DecodeOptions, get_decoder
    from runner.preprocess import model_input_pixels, normalise
    torch.set_num_threads(1)
    paths = build_photo_set(Path(a.data) / f"photos-{a.images}", a.images)
    spec = make_spec(Path(paths[0]).parent, a)
    cells, ref, model, artifacts = prepare(spec)
    dec = get_decoder("pil")
    xs = [normalise(model_input_pixels(dec.decode(Path(p).read_bytes(), DecodeOptions()),
                                       "pil-bilinear", model.preprocess), model.preprocess)
          for p in paths[: 8 * a.batch]]
    runner = BACKENDS[a.unit_cost](artifacts, InferSetting(backend=a.unit_cost, precision=a.precision),
                                   threads=1)
    runner.activate()
    batches = [np.stack(xs[i: i + a.batch]) for i in range(0, len(xs) - a.batch + 1, a.batch)]
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    ms = median_ms(runner.infer, batches) / a.batch
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    print(json.dumps({"backend": a.unit_cost, "ms_per_image": round(ms, 2),
                      "sys_share": round((r1.ru_stime - r0.ru_stime) / max(cpu, 1e-9), 2),
                      "faults_per_batch": round((r1.ru_minflt - r0.ru_minflt) / len(batches))}))


# ----------------------------------------------------------------------------- memory scaling
# `python -m dmx ARGS` that writes its own peak RSS (VmHWM, kB) to the file in argv[1] on exit.
# (getrusage/wait4 would not do: on Linux a child's ru_maxrss starts at its parent's RSS.)
_DMX_WITH_VMHWM = """
import runpy, sys
out = sys.argv[1]
sys.argv = ["dmx", *sys.argv[2:]]
try:
    runpy.run_module("dmx", run_name="__main__", alter_sys=True)
finally:
    with open("/proc/self/status") as f:
        kb = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
    with open(out, "w") as f:
        f.write(kb)
"""


def memory_scaling(a: argparse.Namespace) -> None:
    """dmx run --executor local in a child process on N and 10N tiny JPEGs; peak RSS of each.
    Both runs use the same chunk size: dmx's default grows with the dataset up to 64 images
    (at most 256 preprocessed inputs held, ~300 MB at 224 px), a bounded step this mode is not
    about; what must not grow is everything else."""
    import yaml
    results = {}
    for n in (a.memory_images, 10 * a.memory_images):
        data = build_tiny_set(Path(a.data) / f"tiny-{n}", n)
        with tempfile.TemporaryDirectory(prefix="dmx-bench-mem-") as tmp:
            spec = {"name": "bench-memory", "dataset": {"path": str(Path(data[0]).parent)},
                    "model": a.memory_model,
                    "axes": {"decoder": a.decoders, "resize": a.resizes, "backend": a.backends,
                             "precision": [a.precision]}}
            spec_path = Path(tmp) / "spec.yaml"
            spec_path.write_text(yaml.safe_dump(spec))
            args = ["run", str(spec_path), "--out", str(Path(tmp) / "run"), "--executor", "local",
                    "--quiet", "--chunk-size", str(a.memory_chunk_size)]
            hwm = Path(tmp) / "vmhwm"
            t = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", _DMX_WITH_VMHWM, str(hwm), *args],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            wall = time.perf_counter() - t
            if proc.returncode != 0:
                raise SystemExit(f"dmx run failed on {n} images:\n{proc.stderr}")
            results[n] = (round(int(hwm.read_text()) / 1024, 1), wall)
            print(f"  {n:>7} images ({a.memory_model}, {len(a.decoders) * len(a.resizes) * len(a.backends)} "
                  f"cells, local executor, chunk size {a.memory_chunk_size}): peak RSS {results[n][0]:8.1f} MB, {wall:6.1f} s")
    small, big = results.values()
    print(json.dumps({"images": list(results), "peak_rss_mb": [small[0], big[0]],
                      "wall_s": [round(small[1], 2), round(big[1], 2)],
                      "ratio": round(big[0] / small[0], 3)}))


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
        paths = build_photo_set(Path(a.data) / f"photos-{a.images}", a.images)
        spec = make_spec(Path(paths[0]).parent, a)
        cells, ref, model, artifacts = prepare(spec)
        profile_worker(paths, spec, cells, ref, model, artifacts, a, a.profile_child)
        return
    if a.memory_scaling:
        print("memory scaling: dmx run --executor local in a subprocess, its own peak RSS (VmHWM)")
        memory_scaling(a)
        return

    quiet = wait_for_quiet(a.wait_quiet)
    mon = TreeMonitor()
    paths = build_photo_set(Path(a.data) / f"photos-{a.images}", a.images)
    data_dir = Path(paths[0]).parent
    spec = make_spec(data_dir, a)
    t = time.perf_counter()
    cells, ref, model, artifacts = prepare(spec)
    prep_s = time.perf_counter() - t
    for p in paths:  # page cache warm for everyone
        Path(p).read_bytes()
    import cv2  # noqa: F401  (imports are not part of any timing)
    import onnxruntime  # noqa: F401
    import openvino  # noqa: F401
    import torch  # noqa: F401
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
            from runner.executors import ray_init
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
        seconds, s = run_dmx(spec, out, "ray", a.workers, a, profile_driver=profiling)
        run_end = time.time()
        ph = mon.phase()
        m = json.loads((out / "manifest.json").read_text())
        note("ray", seconds, ph,
             f"(c) dmx ray: {seconds:.2f} s ({a.workers} actors x 1 thread, chunk size "
             f"{m['chunk_size']}, {m['chunks']} chunks, batch {a.batch}; {counts(s.counters)}; "
             f"{s.rows} rows)")
        if r == 0:
            builds = {k: v.get("build_s") for k, v in m.get("backends", {}).items()}
            print(f"    model build + warm-up s, per setting, as first reported by an actor: {builds}")
        if profiling:
            ray_timeline_summary(a.timeline, run_start, run_end)
            cpu = sorted(ph["cpu_by_process"].items(), key=lambda kv: -kv[1])
            print("    CPU seconds per process during the ray run: "
                  + ", ".join(f"{k} {v:.1f}" for k, v in cpu if v >= 0.05))
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
    fmt = lambda d: ", ".join(f"{k} {v:.2f}" for k, v in d.items())  # noqa: E731
    print(f"(d) floor unit costs (ms, median, 1 thread, freed memory kept): decode "
          f"{fmt(fl['decode_ms'])}; resize+crop+normalise {fmt(fl['preprocess_ms'])}; inference "
          f"per image at batch {a.batch}: {fmt(fl['infer_ms_per_image'])}  [foreign "
          f"{ph['foreign_cpu_s']:.1f} CPU s]")
    print(f"(d) floor counts: {fl['decodes']} decodes, {fl['preprocessings']} preprocessings, "
          f"{fl['distinct_tensors']} distinct input tensors x {len(fl['infer_ms_per_image'])} "
          f"backends = {fl['inferences']} inferences; total {fl['total_s']:.2f} s / {a.workers} "
          f"workers = {fl['floor_s']:.2f} s")
    fresh = {b: (fresh_infer_ms(b, a, False), fresh_infer_ms(b, a, True)) for b in fl["infer_ms_per_image"]}
    print(f"(d) inference in a fresh process (as in an actor), batch {a.batch}, 1 thread, glibc's "
          f"default allocator vs freed memory kept (ms/image, system-CPU share, minor page faults "
          f"per batch): " + "; ".join(
              f"{b} {d['ms_per_image']} ({d['sys_share']:.0%} sys, {d['faults_per_batch']} faults) vs "
              f"{t['ms_per_image']} ({t['sys_share']:.0%}, {t['faults_per_batch']})"
              for b, (d, t) in fresh.items()))
    default_total = fl["total_s"] + fl["distinct_tensors"] * sum(
        d["ms_per_image"] - fl["infer_ms_per_image"][b] for b, (d, _) in fresh.items()) / 1e3
    print(f"    with the default allocator's inference costs the floor would be "
          f"{default_total / a.workers:.2f} s")
    mon.stop()
    if a.profile:  # in a fresh process, like an actor (this one has its allocator tuned now)
        cmd = [sys.executable, __file__, "--profile-child", str(m["chunk_size"]), *_common_args(a)]
        child = subprocess.run(cmd, capture_output=True, text=True)
        print(child.stdout.rstrip() if child.returncode == 0 else f"profile failed:\n{child.stderr}")

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
    print(json.dumps({"images": len(paths), "naive_s": r3(naive), "competent_s": r3(competent),
                      "local_s": r3(local),
                      "ray_s": r3(ray_s), "floor_s": r3(floor),
                      "ray_vs_naive": r3(ray_s / naive) if naive else None,
                      "ray_vs_floor": r3(ray_s / floor),
                      "local_vs_naive": r3(local / naive) if naive and local else None,
                      "ray_vs_competent": r3(ray_s / competent) if competent else None,
                      "local_vs_competent": r3(local / competent) if competent and local else None,
                      "peak_rss_mb": max(v[1]["peak_rss_mb"] for v in best.values())}))


if __name__ == "__main__":
    main()
