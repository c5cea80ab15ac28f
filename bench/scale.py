"""A large audit end to end: planning, sweep, driver cost and analysis against the plain floor.

    .venv/bin/python bench/scale.py --images 100000 [--data ~/.cache/dmx-bench] [--workers 2]

1. Builds ``--images`` distinct small JPEGs (crops of the photos that ship with matplotlib,
   scikit-image and scikit-learn, 40-128 px, Pillow encoder, quality 70-95, 4:2:0/4:4:4), 1,000
   per folder, listed in a ``.txt`` manifest (cached under ``--data``; a set of N is a prefix
   of a set of M > N).
2. Runs ``dmx run`` on the 4-cell matrix (decoder pil/opencv x resize pil-bilinear/cv2-linear,
   onnxruntime fp32, the ``tiny`` model) over that manifest in a fresh process, embedded Ray,
   ``--workers`` workers; the driver's peak RSS (VmHWM) and CPU seconds are read from /proc
   while it runs. Plan time and first-chunk time come from the run's manifest (``timings``).
3. The floor, bracketing the run (before and after it; the mean counts): the irreducible work
   done plainly - read the file, 2 decodes (``Image.open(...).convert("RGB")`` and
   ``cv2.imdecode`` + ``cvtColor``), 4 resizes + normalise, inference of the distinct input
   tensors in batches of 64 - by ``--workers`` plain processes at once, one thread each, on
   their shares of ``--floor-sample`` images, scaled to ``--images``. Every file is read once
   before (the page cache is warm for the floor and the run alike). ``floor_shared_s``: the
   same floor skipping the resizes of a second decode equal to the first, as dmx does.
4. Times ``dmx explain`` and ``dmx report`` on the run.

The last line is JSON: images, plan_s, first_chunk_s, images_per_s, floor_s, ratio_vs_floor,
driver_peak_rss_mb, driver_cpu_s, explain_s, report_s (and a few more keys).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PER_FOLDER = 1000
_BUILD_VERSION = 1


# ----------------------------------------------------------------------------- the dataset
def _sources() -> list[np.ndarray]:
    """The installed demo photos, downscaled once to a long side of 400 px (RGB uint8)."""
    from PIL import Image, ImageOps

    from dmx.demo_data import demo_sources
    out = []
    for _, path in sorted(demo_sources().items()):
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
            im.thumbnail((400, 400), Image.Resampling.LANCZOS)
            out.append(np.asarray(im))
    if len(out) < 4:
        raise SystemExit("need at least 4 demo source photos (matplotlib, scikit-image, scikit-learn)")
    return out


def _make_block(args: tuple[str, int, int]) -> int:
    """Write images ``start .. stop-1`` (one folder of ``PER_FOLDER``) into ``dest``."""
    from PIL import Image
    dest, start, stop = args
    sources = _sources()
    folder = Path(dest) / f"d{start // PER_FOLDER:05d}"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, stop):
        rng = random.Random(i)
        src = sources[i % len(sources)]
        h, w = src.shape[:2]
        side = rng.randint(40, 128)
        ch, cw = min(h, int(side * rng.uniform(0.6, 1.0))), min(w, side)
        y, x = rng.randint(0, h - ch), rng.randint(0, w - cw)
        buf = io.BytesIO()
        Image.fromarray(src[y: y + ch, x: x + cw]).save(
            buf, format="JPEG", quality=rng.randint(70, 95), subsampling=rng.choice((0, 2)))
        (folder / f"s{i:07d}.jpg").write_bytes(buf.getvalue())
    return stop - start


def build_small_set(dest: Path, n: int, jobs: int) -> Path:
    """``n`` distinct small JPEGs under ``dest`` and their manifest; returns the manifest path."""
    dest.mkdir(parents=True, exist_ok=True)
    build = dest / "BUILD.json"
    manifest = dest / f"list-{n}.txt"
    try:
        have = json.loads(build.read_text())["n"] if build.is_file() else 0
    except (OSError, ValueError, KeyError):
        have = 0
    if have < n:
        start = (have // PER_FOLDER) * PER_FOLDER   # redo a partial last folder
        blocks = [(str(dest), s, min(n, s + PER_FOLDER)) for s in range(start, n, PER_FOLDER)]
        t = time.perf_counter()
        with ProcessPoolExecutor(jobs) as pool:
            for _ in pool.map(_make_block, blocks, chunksize=4):
                pass
        build.write_text(json.dumps({"v": _BUILD_VERSION, "n": n}))
        print(f"built {n - start} images in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    if not manifest.is_file():
        tmp = manifest.with_suffix(".tmp")
        with open(tmp, "w") as f:
            for i in range(n):
                f.write(f"d{i // PER_FOLDER:05d}/s{i:07d}.jpg\n")
        os.replace(tmp, manifest)
    return manifest


# ----------------------------------------------------------------------------- the run
SPEC = """name: scale-audit
dataset: {{path: {manifest}}}
model: tiny
axes:
  decoder: [pil, opencv]
  resize: [pil-bilinear, cv2-linear]
  backend: [onnxruntime]
  precision: [fp32]
reference: {{decoder: pil, resize: pil-bilinear, backend: onnxruntime, precision: fp32}}
"""


def _proc_stats(pid: int) -> tuple[float, float]:
    """(peak RSS MB, CPU seconds) of a live process, from /proc."""
    with open(f"/proc/{pid}/status") as f:
        hwm = next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:")) / 1024
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return hwm, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_dmx(spec: Path, out: Path, workers: int, extra: list[str]) -> dict:
    """``dmx run`` in a fresh process; its wall time and the driver's peak RSS and CPU."""
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "dmx", "run", str(spec), "--out", str(out), "--workers",
           str(workers), *extra]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    peak, cpu = 0.0, 0.0
    while proc.poll() is None:
        try:
            peak, cpu = _proc_stats(proc.pid)
        except (OSError, StopIteration, IndexError):
            pass
        time.sleep(0.2)
    wall = time.perf_counter() - t
    err = proc.stderr.read()
    if proc.returncode != 0:
        raise SystemExit(f"dmx run failed ({proc.returncode}):\n{err}")
    print(err, file=sys.stderr, end="")
    return {"wall_s": wall, "driver_peak_rss_mb": peak, "driver_cpu_s": cpu}


def timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode not in (0, 1):   # check-like exit 1 is an answer, not a failure
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr}")
    return time.perf_counter() - t


# ----------------------------------------------------------------------------- the floor
def _floor_slice(manifest: str, start: int, stop: int, share: bool = False, batch: int = 64) -> dict:
    """One thread, per image: read + 2 decodes (Pillow's and OpenCV's own calls, as a user
    writes them) + 4 resizes/normalise + inference of the distinct tensors (batches of
    ``batch``), on images ``start .. stop-1`` of the manifest. ``share``: the second decode's
    resizes are skipped when it equals the first pixel for pixel (what dmx does). Everything
    before the timed loop (imports, the model) happens before the barrier, so the slices of one
    floor are timed at the same moment (``_FLOOR_BARRIER``)."""
    import cv2
    import torch
    from PIL import Image
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    import dmx.runner.backends  # noqa: F401 - registers the backends' axes
    from dmx.matrix import parse_spec
    from dmx.runner.backends import BACKENDS, InferSetting
    from dmx.runner.convert import prepare_artifacts, resolve_model
    from dmx.runner.preprocess import model_input_pixels, normalise
    manifest = Path(manifest)
    spec = parse_spec({"name": "floor", "dataset": {"path": str(manifest)}, "model": "tiny",
                       "axes": {"backend": ["onnxruntime"], "precision": ["fp32"]},
                       "reference": {"backend": "onnxruntime", "precision": "fp32"}})
    model = resolve_model(spec.model)
    artifacts = prepare_artifacts(model, {InferSetting(backend="onnxruntime", precision="fp32")},
                                  lambda: None, threads=1)
    ort = BACKENDS["onnxruntime"](artifacts, InferSetting(backend="onnxruntime", precision="fp32"),
                                  threads=1)
    ort.activate()
    with open(manifest) as f:
        names = [ln.strip() for _, ln in zip(range(stop), f)][start:]
    paths = [manifest.parent / n for n in names]
    decoders = [lambda data: np.asarray(Image.open(io.BytesIO(data)).convert("RGB")),
                lambda data: cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8),
                                                       cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)]
    if _FLOOR_BARRIER is not None:
        _FLOOR_BARRIER.wait()
    t = time.perf_counter()
    tensors = []
    for p in paths:
        data = p.read_bytes()
        seen = set()
        first = None
        for dec in decoders:
            img = dec(data)
            if first is None:
                first = img
            elif share and np.array_equal(first, img):
                continue
            for resize in ("pil-bilinear", "cv2-linear"):
                x = normalise(model_input_pixels(img, resize, model.preprocess), model.preprocess)
                key = hashlib.sha256(x.tobytes()).digest()
                if key not in seen:
                    seen.add(key)
                    tensors.append(x)
    prep_s = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(0, len(tensors), batch):
        ort.infer(np.stack(tensors[i: i + batch]))
    return {"images": len(paths), "prepare_s": prep_s, "infer_s": time.perf_counter() - t,
            "tensors": len(tensors)}


_FLOOR_BARRIER = None


def _floor_init(barrier) -> None:
    global _FLOOR_BARRIER
    _FLOOR_BARRIER = barrier


def warm_page_cache(manifest: Path, n: int) -> float:
    """Read the first ``n`` files of the manifest once, so that neither the floor nor the run
    pays (or is spared) reading them cold; returns the seconds it took."""
    t = time.perf_counter()
    with open(manifest) as f:
        for _, ln in zip(range(n), f):
            (manifest.parent / ln.strip()).read_bytes()
    return time.perf_counter() - t


def measure_floor(manifest: Path, sample: int, workers: int, share: bool = False) -> dict:
    """The floor as ``workers`` plain processes at once, each one thread on its share of the
    first ``sample`` images, started together: what 2 plain workers on these cores achieve,
    with whatever they cost each other (shared cache, memory bandwidth, the machine's other
    jobs), not one thread's time divided by the workers. ``ms_per_image``: the slowest slice's
    seconds per image of the whole sample, times the workers (one worker's cost per image)."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    bounds = [(sample * i // workers, sample * (i + 1) // workers) for i in range(workers)]
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_floor_init,
                             initargs=(ctx.Barrier(workers),)) as pool:
        parts = list(pool.map(_floor_slice, [str(manifest)] * workers, *zip(*bounds),
                              [share] * workers))
    slowest = max(p["prepare_s"] + p["infer_s"] for p in parts)
    n = sum(p["images"] for p in parts)
    return {"ms_per_image": slowest * 1e3 * workers / n,
            "prepare_ms_per_image": sum(p["prepare_s"] for p in parts) * 1e3 / n,
            "infer_ms_per_image": sum(p["infer_s"] for p in parts) * 1e3 / n,
            "distinct_tensors_per_image": sum(p["tensors"] for p in parts) / n}


# ----------------------------------------------------------------------------- planning only
def plan_seconds(path: str, limit: int | None = None) -> tuple[float, int, int]:
    """(seconds, images, chunks) to list and chunk the dataset at ``path`` as ``dmx run`` does."""
    import shutil as _sh

    from dmx.matrix import DatasetSpec
    from dmx.results.planning import plan_chunks, scratch_dir
    from dmx.runner.dataset import collect
    scratch = scratch_dir()
    try:
        t = time.perf_counter()
        listing = collect(DatasetSpec(path, limit, "."), scratch)
        index = plan_chunks(listing.images, 64, scratch / "chunks.parquet")
        return time.perf_counter() - t, listing.n_images, len(index)
    finally:
        _sh.rmtree(scratch, ignore_errors=True)


def s3_prefix(n: int, latency_ms: float = 0.0) -> tuple[str, object]:
    """moto's S3 server (``bench/moto_indexed.py``: filled in its own process, listing by
    bisection) holding ``n`` small objects under ``s3://scale/p/dNNNNN/``, the AWS variables
    pointing at it; returns (URI, the server process)."""
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("moto_indexed.py")),
                             str(n), str(port), "--per-folder", str(PER_FOLDER),
                             "--latency-ms", str(latency_ms)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    if proc.stdout.readline().strip() != "ready":
        raise SystemExit("bench/moto_indexed.py did not start")
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="x",
                      AWS_SECRET_ACCESS_KEY="x", AWS_REGION="us-east-1")
    return "s3://scale/p", proc


def plan_only(a: argparse.Namespace, data: Path, manifest: Path) -> None:
    """``--plan-only``: planning time of a manifest, a folder tree and (``--s3``) an S3 prefix."""
    res: dict = {"images": a.images}
    for kind, path in (("manifest", str(manifest)), ("folder", str(data))):
        if kind == "folder" and a.images != _built(data):
            continue        # the folder holds the whole built set, not --images of it
        s, n, chunks = plan_seconds(path, a.limit)
        res[f"{kind}_plan_s"], res[f"{kind}_images"] = round(s, 2), n
    if a.s3:
        uri, proc = s3_prefix(a.s3, a.s3_latency_ms)
        try:
            s, n, _ = plan_seconds(uri, a.limit)
            res["s3_plan_s"], res["s3_images"] = round(s, 2), n
            res["s3_latency_ms"] = a.s3_latency_ms
        finally:
            proc.stdin.close()
            proc.wait(timeout=60)
    import resource     # this process only plans (the S3 server is its own process)
    res["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(res))


def _built(data: Path) -> int:
    try:
        return json.loads((data / "BUILD.json").read_text())["n"]
    except (OSError, ValueError, KeyError):
        return 0


def _print_floor(what: str, f: dict, a: argparse.Namespace) -> None:
    print(f"{what}: {f['ms_per_image']:.3f} ms/image per worker, {a.workers} plain workers at once "
          f"(prepare {f['prepare_ms_per_image']:.3f}, infer {f['infer_ms_per_image']:.3f}, "
          f"{f['distinct_tensors_per_image']:.2f} distinct tensors/image) -> "
          f"{f['ms_per_image'] * a.images / 1e3 / a.workers:.1f} s for {a.images} images",
          file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--data", default=str(Path.home() / ".cache" / "dmx-bench" / "small"))
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--floor-sample", type=int, default=10_000)
    ap.add_argument("--out", default=None, help="run directory (default: under --data)")
    ap.add_argument("--no-analysis", action="store_true", help="skip timing explain and report")
    ap.add_argument("--dmx-arg", action="append", default=[], help="extra argument for dmx run")
    ap.add_argument("--plan-only", action="store_true",
                    help="only time planning: the manifest, the folder tree (when it holds exactly "
                         "--images) and, with --s3 N, a moto S3 prefix of N objects")
    ap.add_argument("--s3", type=int, default=0, metavar="N")
    ap.add_argument("--limit", type=int, default=None,
                    help="with --plan-only: plan with dataset.limit")
    ap.add_argument("--s3-latency-ms", type=float, default=0.0,
                    help="with --s3: delay each listing answer (S3's round trip per page)")
    a = ap.parse_args()
    data = Path(a.data).expanduser()
    manifest = build_small_set(data, a.images, a.workers)
    if a.plan_only:
        return plan_only(a, data, manifest)
    spec = data / f"spec-{a.images}.yaml"
    spec.write_text(SPEC.format(manifest=manifest))
    out = Path(a.out) if a.out else data / f"run-{a.images}"

    warm_s = warm_page_cache(manifest, a.images)
    sample = min(a.floor_sample, a.images)
    floors: dict[str, list[dict]] = {"plain": [], "shared": []}

    def bracket(when: str) -> None:
        for kind in floors:
            floors[kind].append(measure_floor(manifest, sample, a.workers, kind == "shared"))
            _print_floor(f"floor ({kind}) {when} the run", floors[kind][-1], a)

    bracket("before")
    run = run_dmx(spec, out, a.workers, a.dmx_arg)
    bracket("after")
    # the machine's other jobs move the floor between minutes: the mean of the two brackets
    floor_s, shared_s = (sum(f["ms_per_image"] for f in floors[k]) / 2 * a.images / 1e3 / a.workers
                         for k in ("plain", "shared"))
    m = json.loads((out / "manifest.json").read_text())
    timings = m.get("timings", {})
    sweep_s = timings.get("sweep_s")
    res = {"images": a.images, "plan_s": timings.get("plan_s"),
           "first_chunk_s": timings.get("first_chunk_s"),
           "images_per_s": round(a.images / run["wall_s"], 1),
           "floor_s": round(floor_s, 2), "ratio_vs_floor": round(run["wall_s"] / floor_s, 3),
           "floor_shared_s": round(shared_s, 2),
           "ratio_vs_floor_shared": round(run["wall_s"] / shared_s, 3),
           "driver_peak_rss_mb": round(run["driver_peak_rss_mb"], 1),
           "driver_cpu_s": round(run["driver_cpu_s"], 2), "wall_s": round(run["wall_s"], 2),
           "sweep_s": sweep_s,
           "sweep_vs_floor": round(sweep_s / floor_s, 3) if sweep_s else None,
           "workers": a.workers, "timings": timings, "page_cache_warm_s": round(warm_s, 2),
           "floor_ms_per_image": [round(f["ms_per_image"], 3) for f in floors["plain"]],
           "floor_shared_ms_per_image": [round(f["ms_per_image"], 3) for f in floors["shared"]],
           "driver_rss_by_phase": m.get("driver_peak_rss_mb")}
    if not a.no_analysis:
        dmx = [sys.executable, "-m", "dmx"]
        res["explain_s"] = round(timed([*dmx, "explain", str(out)]), 2)
        res["report_s"] = round(timed([*dmx, "report", str(out), "-o", str(out / "report.html")]), 2)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
