"""dmx on a simulated 3-node Ray cluster on this machine (``ray.cluster_utils.Cluster``).

Measures, on real re-encoded photos (bench/photos.py, cached under bench/.data):

- images/s and the driver's CPU seconds per 1,000 rows for a 12-cell matrix (decoder x resize x
  backend) over ``--images`` photos, with dmx's own actor scheduling;
- the same sweep through Ray Data (``from_items`` -> ``map_batches`` on an actor pool ->
  ``write_parquet``), side by side (``--no-ray-data`` leaves it out);
- peak RSS per worker on 12-megapixel photos with 4 decode variants x 4 resizes;
- result files and ``dmx explain`` time on the result.

The last line is one JSON object: workers, images_per_s, driver_cpu_s_per_1k_rows,
peak_worker_rss_mb_12mp, result_files, explain_s (plus the Ray Data figures).

    python bench/cluster.py --quick          # ~200 photos, 4 twelve-megapixel ones
    python bench/cluster.py --images 2000    # the full benchmark (long on 2 cores)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.photos import _build, _sources, build_photo_set  # noqa: E402

DATA = ROOT / "bench" / ".data"
CELLS_12 = "{decoder: [pil, opencv], resize: [pil-bilinear, cv2-linear, cv2-area], backend: [torch, onnxruntime]}"
MEMORY_16 = ("{decoder: [pil, opencv], exif: [apply, ignore], "
             "resize: [pil-bilinear, cv2-linear, cv2-area, torch-bilinear-aa], backend: [torch]}")


def build_12mp_set(dest: Path, n: int) -> list[str]:
    """``n`` 12-megapixel JPEGs (4000 x 3000): demo photos upscaled (bicubic) and re-encoded by
    Pillow at quality 90, 4:2:0 - the size phone cameras write."""
    import io

    import PIL
    from PIL import Image
    key = {"v": 1, "kind": "12mp", "n": n, "pillow": PIL.__version__}

    def make():
        sources = _sources()
        names = sorted(sources)
        for i in range(n):
            img = sources[names[i % len(names)]]
            w, h = img.size
            cw, ch = (w, w * 3 // 4) if w * 3 // 4 <= h else (h * 4 // 3, h)
            big = img.crop((0, 0, cw, ch)).resize((4000, 3000), Image.Resampling.BICUBIC)
            buf = io.BytesIO()
            big.save(buf, format="JPEG", quality=90, subsampling=2)
            yield f"mp12-{i:04d}-{names[i % len(names)]}.jpg", buf.getvalue()

    return _build(dest, n, key, make)


def write_spec(path: Path, images: Path, axes: str, model: str, limit: int | None = None) -> Path:
    lim = f", limit: {limit}" if limit else ""
    path.write_text(f"name: {path.stem}\ndataset: {{path: {images}{lim}}}\nmodel: {model}\naxes: {axes}\n")
    return path


def timed_child(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Wall seconds, the child's CPU seconds (user + sys: the driver alone - Ray's processes
    belong to the cluster, not to it), its stderr."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, r.stderr


def dmx_run(spec: Path, out: Path, address: str, env: dict[str, str], *extra: str):
    cmd = [sys.executable, "-m", "dmx", "run", str(spec), "--out", str(out), "--address", address,
           "--quiet", *extra]
    wall, cpu, _ = timed_child(cmd, env)
    return wall, cpu, json.loads((out / "manifest.json").read_text())


def ray_data_child(spec_path: str, out: str, address: str, workers: int, chunk: int) -> None:
    """The same sweep through Ray Data: the plan built as dmx builds it, then map_batches on an
    actor pool of ``workers`` Workers, ``chunk`` images per batch, and write_parquet."""
    import pyarrow as pa
    import ray

    import dmx.runner.backends  # noqa: F401 - registers the backends' axes and levels
    from dmx.matrix import load_spec
    from dmx.runner.capabilities import node_name, skip_reasons
    from dmx.runner.convert import prepare_artifacts, resolve_model
    from dmx.runner.dataset import ImageRef, list_images
    from dmx.runner.plan import Chunk, Plan
    from dmx.runner.sweep import plan_cells
    from dmx.runner.worker import Worker

    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    import ray.data
    ray.data.DataContext.get_current().enable_progress_bars = False
    spec = load_spec(spec_path, [])
    cells, ref = plan_cells(spec)
    images = list_images(spec.dataset)
    model = resolve_model(spec.model)
    settings = {(c.get("backend", "torch"), c.get("precision", "fp32"), c["conversion"]) for c in cells}
    artifacts = prepare_artifacts(model, settings, lambda: (_ for _ in ()).throw(RuntimeError("no int8")))
    plan = Plan(run_id="raydata", axes=spec.axis_names, cells=tuple(cells), reference_id=ref.cell_id,
                skipped=skip_reasons(cells, artifacts), model=model, artifacts=artifacts, out=out)

    class Sweep:
        def __init__(self, plan: Plan) -> None:
            self.worker = Worker(plan, node_name(ray.get_runtime_context().get_node_id()))
            self.n = 0

        def __call__(self, batch: pa.Table) -> pa.Table:
            refs = tuple(ImageRef(i, p) for i, p in zip(batch["image_id"].to_pylist(),
                                                         batch["path"].to_pylist()))
            self.n += 1
            return self.worker.process_chunk(Chunk(self.n, refs)).rows

    ds = ray.data.from_items([{"image_id": i.image_id, "path": i.path} for i in images])
    ds.map_batches(Sweep, fn_constructor_args=(plan,), batch_size=chunk, batch_format="pyarrow",
                   concurrency=workers, num_cpus=1).write_parquet(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000, help="photos for the 12-cell sweep")
    ap.add_argument("--mp-images", type=int, default=16, help="12-megapixel photos for the memory run")
    ap.add_argument("--quick", action="store_true", help="200 photos, 4 twelve-megapixel ones")
    ap.add_argument("--model", default="tiny", help="built-in model (default tiny)")
    ap.add_argument("--chunk-size", type=int, default=32)
    ap.add_argument("--no-ray-data", action="store_true", help="skip the Ray Data comparison")
    ap.add_argument("--_ray-data", nargs=5, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._ray_data:
        s, o, addr, w, c = a._ray_data
        ray_data_child(s, o, addr, int(w), int(c))
        return
    if a.quick:
        a.images, a.mp_images = 200, 4

    photos = DATA / "photos"
    build_photo_set(photos, a.images)
    mp12 = DATA / "mp12"
    build_12mp_set(mp12, a.mp_images)
    work = DATA / f"cluster-run-{os.getpid()}"
    work.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}

    from ray.cluster_utils import Cluster
    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 1, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    try:
        spec = write_spec(work / "cells12.yaml", photos, CELLS_12, a.model)
        # a small run first: the model conversions are made and cached outside the timing
        warm = write_spec(work / "warm.yaml", photos, CELLS_12, a.model, limit=8)
        warm_wall, _, _ = dmx_run(warm, work / "warm", cluster.address, env, "--chunk-size", "64")
        wall, cpu, m = dmx_run(spec, work / "dmx", cluster.address, env, "--chunk-size", str(a.chunk_size))
        rows = a.images * 12
        # the rows' part files are merged at the end; each chunk's image file stays, written by
        # the worker just before that chunk's rows
        files = sorted(p.stat().st_mtime for p in (work / "dmx").glob("_images/chunk=*.parquet"))
        print(f"dmx actors: first run of 8 images (starts the workers, converts the models unless cached) {warm_wall:.1f} s; "
              f"first to last chunk file {files[-1] - files[0]:.1f} s of {len(files)} (files stream "
              "as chunks end)", file=sys.stderr)
        result = {"workers": m["executor"]["workers"], "images_per_s": round(a.images / wall, 1),
                  "driver_cpu_s_per_1k_rows": round(cpu / rows * 1000, 3)}
        print(f"dmx actors: {a.images} images x 12 cells on {result['workers']} workers in "
              f"{wall:.1f} s: {result['images_per_s']} images/s, driver {cpu:.1f} CPU s "
              f"({result['driver_cpu_s_per_1k_rows']} per 1,000 rows)", file=sys.stderr)
        if not a.no_ray_data:
            rd_wall, rd_cpu, _ = timed_child(
                [sys.executable, str(Path(__file__).resolve()), "--_ray-data", str(spec),
                 str(work / "raydata"), cluster.address, str(result["workers"]), str(a.chunk_size)], env)
            result["ray_data_images_per_s"] = round(a.images / rd_wall, 1)
            rd_files = sorted(p.stat().st_mtime for p in (work / "raydata").glob("*.parquet"))
            print(f"Ray Data:   first to last part file {rd_files[-1] - rd_files[0]:.1f} s",
                  file=sys.stderr)
            result["ray_data_driver_cpu_s_per_1k_rows"] = round(rd_cpu / rows * 1000, 3)
            print(f"Ray Data:   same sweep in {rd_wall:.1f} s: {result['ray_data_images_per_s']} "
                  f"images/s, driver {rd_cpu:.1f} CPU s "
                  f"({result['ray_data_driver_cpu_s_per_1k_rows']} per 1,000 rows)", file=sys.stderr)
        # the files holding the rows once the run ended (compacted); explain reads these
        result["result_files"] = sum(1 for _ in (work / "dmx").glob("rows/*/*.parquet"))
        sys.path.insert(0, str(ROOT))
        from dmx.analysis.explain import explain_run
        t = time.perf_counter()
        explain_run(work / "dmx")
        result["explain_s"] = round(time.perf_counter() - t, 2)

        mem = write_spec(work / "mem16.yaml", mp12, MEMORY_16, a.model)
        _, _, m12 = dmx_run(mem, work / "mp12", cluster.address, env)
        result["peak_worker_rss_mb_12mp"] = max(m12.get("peak_worker_rss_mb", {0: 0}).values())
        print(f"12-MP photos x 4 decode variants x 4 resizes ({a.mp_images} images, chunk "
              f"{m12['chunk_size']}): peak worker RSS {result['peak_worker_rss_mb_12mp']} MB "
              f"per node {m12.get('peak_worker_rss_mb')}", file=sys.stderr)
    finally:
        cluster.shutdown()
    keys = ("workers", "images_per_s", "driver_cpu_s_per_1k_rows", "peak_worker_rss_mb_12mp",
            "result_files", "explain_s")
    print(json.dumps({**{k: result[k] for k in keys}, **result}))


if __name__ == "__main__":
    main()
