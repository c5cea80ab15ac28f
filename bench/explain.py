"""Benchmark (not a test): ``dmx explain`` on a synthetic run of N rows with the real schema.

What it does:

1. Generates (once per row count and schema; cached under ``bench/.data/explain-<N>``) a run: a
   ``manifest.json`` with the keys analysis reads, ``cells.parquet`` (``dmx.results.schema.cell_schema``),
   ``images.parquet`` (``IMAGE_SCHEMA``) and ``rows/chunk=NNNNN/part-0.parquet`` files written
   with ``dmx.results.store.write_parquet_atomic`` in ``dmx.results.schema.row_schema(axes)``. The
   matrix is realistic - decoder(2) x exif(2) x resize(4) x backend(3) x precision(fp32, fp16,
   int8; torch int8 excluded) = 128 cells - and so is the chunking: images per chunk from dmx's
   own ``default_chunk_size`` for 2 workers, i.e. one part file per 16 images (2,048 rows).
   Values follow the effects we measured: resize moves outputs most (cosine distance ~1e-3),
   int8 ~1e-3, fp16 ~1e-6, backends at fp32 ~1e-11, the decoder only on the few files where
   Pillow and OpenCV differ (CMYK), EXIF=ignore only on EXIF-rotated files (shape mismatch,
   large divergence); a per-image sensitivity (log-normal) scales them; top-1 flips with a
   probability growing with the distance; 0.2 % of images fail to decode (error rows).
   Generation is vectorised with numpy/pyarrow one chunk at a time, so memory stays bounded.
2. Times ``dmx.analysis.explain.explain_run(dir)`` + ``dmx.analysis.render.render_text`` in-process
   (best of ``--repeat``), and ``dmx explain DIR`` as a subprocess (wall clock, includes
   interpreter start and imports).
3. With ``--profile``: times every SQL statement explain issues (a timing proxy around the
   DuckDB connection) and prints ``EXPLAIN ANALYZE`` for the slowest ones.
4. Side by side in the same run: the same rows compacted by dmx (``dmx.results.compact`` and
   ``dmx.analysis.summary``, as every run ends and ``dmx compact`` does) - few files sorted by cell
   plus explain's aggregates stored beside them - and explain timed on the part files, on the
   compacted rows without the aggregates, and with them.

Run::

    . .venv/bin/activate
    python bench/explain.py                    # 10,000,000 rows; last line is JSON
    python bench/explain.py --rows 1000000 --profile

The last line is one JSON object: {"rows": N, "explain_s": <dmx explain subprocess wall s>,
"explain_inprocess_s": <explain_run + render_text s>, "explain_compacted_s": ...,
"explain_compacted_inprocess_s": ..., "explain_compacted_nosummary_s": ..., "compact_s": ...,
"summary_s": ..., "files": ..., "files_compacted": ..., "duckdb_threads": T} (``*_s`` wall
seconds; the plain ones are for the part files; "compacted" is what every run ends as: compacted
rows plus explain's stored aggregates, ``analysis/summary.py``; "nosummary" the same rows with
the aggregates removed, so explain scans the rows).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from machine import wait_for_quiet  # noqa: E402
import dmx.runner.backends  # noqa: E402,F401 - registers the backends' axes and levels
from dmx.matrix import parse_spec  # noqa: E402
from dmx.results.schema import IMAGE_SCHEMA, cell_schema, row_schema  # noqa: E402
from dmx.results.store import RunDir, write_parquet_atomic  # noqa: E402
from dmx.runner.plan import default_chunk_size  # noqa: E402

_GEN_VERSION = 1
AXES = {"decoder": ["pil", "opencv"], "exif": ["apply", "ignore"],
        "resize": ["pil-bilinear", "cv2-linear", "cv2-area", "torch-bilinear-aa"],
        "backend": ["torch", "onnxruntime", "openvino"], "precision": ["fp32", "fp16", "int8"]}
REFERENCE = {"decoder": "pil", "exif": "apply", "resize": "pil-bilinear", "backend": "torch",
             "precision": "fp32"}
EXCLUDE = [{"backend": "torch", "precision": "int8"}]
# Mean cosine distance each non-reference level adds (measured orders of magnitude).
RESIZE_EFFECT = {"pil-bilinear": 0.0, "cv2-linear": 2e-3, "cv2-area": 1.2e-3, "torch-bilinear-aa": 2e-4}
PRECISION_EFFECT = {"fp32": 0.0, "fp16": 1e-6, "int8": 3e-3}
BACKEND_EFFECT = {"torch": 0.0, "onnxruntime": 1e-11, "openvino": 2e-11}
LATENCY_MS = {"torch": 20.0, "onnxruntime": 5.0, "openvino": 4.6}
EFFECTIVE = {("openvino", "int8"): "int8+fp32"}


def make_spec(n_images: int):
    return parse_spec({"name": "bench-explain", "dataset": {"path": "images/", "limit": n_images},
                       "model": "mobilenet_v2", "axes": AXES, "exclude": EXCLUDE,
                       "reference": REFERENCE})


class Matrix:
    """The cells, as per-cell numpy arrays the generator indexes by cell number."""

    def __init__(self, spec) -> None:
        from dmx.runner.sweep import plan_cells
        self.cells, self.ref = plan_cells(spec)
        self.axes = spec.axis_names
        f = [dict(c.factors) for c in self.cells]
        self.n = len(self.cells)
        self.ref_index = next(i for i, c in enumerate(self.cells) if c.cell_id == self.ref.cell_id)
        self.resize = np.array([RESIZE_EFFECT[x["resize"]] for x in f])
        self.model = np.array([PRECISION_EFFECT[x["precision"]] + BACKEND_EFFECT[x["backend"]]
                               for x in f])
        self.opencv = np.array([x["decoder"] == "opencv" for x in f])
        self.exif_ignore = np.array([x["exif"] == "ignore" for x in f])
        self.input_changes = np.array([x["resize"] != REFERENCE["resize"] for x in f])
        self.latency = np.array([LATENCY_MS[x["backend"]] * (0.7 if x["precision"] == "int8" else 1)
                                 for x in f])
        self.precision_effective = [EFFECTIVE.get((x["backend"], x["precision"]), x["precision"])
                                    for x in f]
        self.factor_columns = {a: [x[a] for x in f] for a in self.axes}
        self.decoder_version = [{"pil": "pillow 13.0.0", "opencv": "opencv 5.0.0"}[x["decoder"]] for x in f]

    def cells_table(self) -> pa.Table:
        rows = [{"cell_id": c.cell_id, **dict(c.factors), "is_reference": c.cell_id == self.ref.cell_id,
                 "status": "ok", "skip_reason": None, "label": c.label()} for c in self.cells]
        return pa.Table.from_pylist(rows, schema=cell_schema(self.axes))


class Images:
    """Per-image properties drawn once for the whole dataset (vectorised)."""

    def __init__(self, n: int, rng: np.random.Generator) -> None:
        self.n = n
        self.ids = np.array([f"photos/{i // 1000:03d}/img{i:07d}.jpg" for i in range(n)], dtype=object)
        self.sensitivity = rng.lognormal(0.0, 1.0, n)
        u = rng.random(n)
        self.bad = u < 0.002
        self.rotated = (u >= 0.002) & (u < 0.042)          # EXIF orientation 6 or 8
        self.cmyk = (u >= 0.042) & (u < 0.062)              # Pillow and OpenCV differ by 1 px level
        self.grey = (u >= 0.062) & (u < 0.09)
        long = rng.integers(320, 1025, n)
        short = (long * rng.uniform(0.56, 1.0, n)).astype(np.int32)
        landscape = rng.random(n) < 0.7
        self.w = np.where(landscape, long, short).astype(np.int32)
        self.h = np.where(landscape, short, long).astype(np.int32)
        self.top1_ref = rng.integers(0, 1000, n).astype(np.int32)
        self.subsampling = rng.choice(np.array(["4:2:0", "4:2:2", "4:4:4"], dtype=object), n,
                                      p=[0.8, 0.1, 0.1])
        self.progressive = rng.random(n) < 0.15
        self.bytes = (self.w.astype(np.int64) * self.h * rng.uniform(0.15, 0.5, n)).astype(np.int64)

    def table(self) -> pa.Table:
        orient = np.where(self.rotated, 6, 1).astype(np.int32)
        mode = np.where(self.cmyk, "CMYK", np.where(self.grey, "L", "RGB")).astype(object)
        comps = np.where(self.cmyk, 4, np.where(self.grey, 1, 3)).astype(np.int32)
        ok = ~self.bad
        sha = np.array([uuid.UUID(int=int(i) * 7919 + 1).hex * 2 for i in range(self.n)], dtype=object)
        cols = {
            "image_id": self.ids, "path": np.array(["/data/" + s for s in self.ids], dtype=object),
            "format": np.where(ok, "JPEG", None), "width": self.w, "height": self.h,
            "subsampling": np.where(self.grey | self.bad, None, self.subsampling),
            "progressive": self.progressive, "arithmetic": np.zeros(self.n, bool),
            "exif_orientation": orient, "components": comps, "color_mode": mode,
            "icc": np.zeros(self.n, bool), "bytes": self.bytes, "sha256": sha,
            "error": np.where(self.bad, "cannot identify image file", None),
        }
        arrays = [pa.array(cols[f.name], type=f.type) for f in IMAGE_SCHEMA]
        return pa.Table.from_arrays(arrays, schema=IMAGE_SCHEMA)


def _strings(values: list[str], index: np.ndarray) -> pa.Array:
    """``values[index]`` as a plain string array (built through a dictionary, vectorised)."""
    return pa.DictionaryArray.from_arrays(pa.array(index.astype(np.int32)),
                                          pa.array(values, pa.string())).cast(pa.string())


def _list_column(values: np.ndarray, typ: pa.DataType, valid: np.ndarray) -> pa.Array:
    """(rows, 5) values -> list<typ> with nulls where not ``valid``."""
    rows, k = values.shape
    offsets = pa.array(np.arange(0, rows * k + 1, k, dtype=np.int32))
    arr = pa.ListArray.from_arrays(offsets, pa.array(values.ravel(), typ.value_type))
    if valid.all():
        return arr
    return pa.ListArray.from_arrays(offsets, arr.values, mask=pa.array(~valid))


def chunk_rows(m: Matrix, im: Images, lo: int, hi: int, run_id: str,
               rng: np.random.Generator, schema: pa.Schema) -> pa.Table:
    """All rows of images [lo, hi): cells outer, images inner, as the worker writes them."""
    k = hi - lo
    c = np.repeat(np.arange(m.n), k)              # cell number per row
    i = np.tile(np.arange(lo, hi), m.n)           # image number per row
    n = len(c)
    bad = im.bad[i]
    ok = ~bad
    rot_diverges = m.exif_ignore[c] & im.rotated[i]
    dec_diverges = m.opencv[c] & im.cmyk[i]
    is_ref = c == m.ref_index
    s = im.sensitivity[i]
    noise = rng.lognormal(0.0, 0.5, n)
    cos_dist = s * noise * (m.resize[c] + m.model[c] + np.where(dec_diverges, 1e-4, 0.0))
    cos_dist = np.where(rot_diverges, rng.uniform(0.05, 0.6, n), cos_dist)
    cos_dist = np.where(is_ref, 0.0, np.minimum(cos_dist, 1.5))
    input_diff = (m.input_changes[c] | dec_diverges | rot_diverges) & ~is_ref
    rel_l2 = np.sqrt(2 * cos_dist)
    max_abs = rel_l2 * rng.uniform(20, 40, n)
    flip = rng.random(n) < np.minimum(0.6, 25 * cos_dist)
    top1 = np.where(flip, (im.top1_ref[i] + rng.integers(1, 999, n)) % 1000, im.top1_ref[i]).astype(np.int32)
    top5 = (top1[:, None] + np.arange(5, dtype=np.int32)[None, :] * 7) % 1000
    p = np.sort(rng.dirichlet(np.ones(6), n)[:, :5].astype(np.float32), axis=1)[:, ::-1]
    h = np.where(rot_diverges, im.w[i], im.h[i]).astype(np.int32)
    w = np.where(rot_diverges, im.h[i], im.w[i]).astype(np.int32)
    px_mean = np.where(input_diff, rng.uniform(0.5, 6.0, n), 0.0)
    px_mean = np.where(rot_diverges, rng.uniform(30, 70, n), px_mean)
    metric_valid = ok
    with np.errstate(divide="ignore"):
        sqnr = np.where(rel_l2 > 0, -20 * np.log10(np.maximum(rel_l2, 1e-300)), np.inf)
        psnr = np.where(px_mean > 0, 20 * np.log10(255.0 / np.maximum(px_mean * 1.3, 1e-9)), np.inf)

    def f64(x: np.ndarray) -> pa.Array:
        return pa.array(x, pa.float64(), mask=~metric_valid)

    def opt(x: np.ndarray, typ: pa.DataType) -> pa.Array:
        return pa.array(x, typ, mask=~metric_valid)

    cols: dict[str, pa.Array] = {
        "run_id": pa.array(np.full(n, run_id, dtype=object), pa.string()),
        "cell_id": _strings([x.cell_id for x in m.cells], c),
        "image_id": pa.array(im.ids[i], pa.string()),
        "status": _strings(["ok", "error"], bad.astype(np.int8)),
        "error_stage": pa.array(np.where(bad, "decode", None), pa.string()),
        "error": pa.array(np.where(bad, "Pillow: cannot identify image file", None), pa.string()),
        "is_reference": pa.array(is_ref),
        "decoded_h": opt(h, pa.int32()), "decoded_w": opt(w, pa.int32()),
        "shape_match": opt(~rot_diverges, pa.bool_()), "px_equal": opt(~input_diff, pa.bool_()),
        "px_max_abs": f64(np.where(input_diff, np.minimum(255, px_mean * rng.uniform(8, 25, n)), 0.0)),
        "px_mean_abs": f64(px_mean),
        "px_frac_diff": f64(np.where(input_diff, rng.uniform(0.2, 0.9, n), 0.0)),
        "px_psnr": f64(psnr),
        "out_max_abs": f64(max_abs), "out_mean_abs": f64(max_abs / 6),
        "out_rel_l2": f64(rel_l2), "out_cosine": f64(1 - cos_dist), "out_sqnr_db": f64(sqnr),
        "out_kl": f64(cos_dist * 1.7),
        "top1": opt(top1, pa.int32()), "top1_ref": opt(im.top1_ref[i], pa.int32()),
        "top1_agree": opt(~flip, pa.bool_()),
        "top5_overlap": f64(np.where(flip, rng.integers(0, 5, n) / 5.0, 1.0)),
        "top5": _list_column(top5, pa.list_(pa.int32()), ok),
        "top5_prob": _list_column(np.ascontiguousarray(p), pa.list_(pa.float32()), ok),
        "precision_effective": _strings(m.precision_effective, c),
        "decoder_version": _strings(m.decoder_version, c),
        "decoder_libjpeg": _strings(["libjpeg-turbo 3.1.0"], np.zeros(n, np.int32)),
        "decode_note": pa.array(np.where(im.cmyk[i], "CMYK->RGB", np.where(im.grey[i], "L->RGB", None)),
                                pa.string(), mask=~metric_valid),
        "reused": opt(m.opencv[c] & ~dec_diverges, pa.bool_()),
        "decode_ms": f64(rng.gamma(4.0, 0.5, n) * (im.w[i] * im.h[i] / 3e5)),
        "preprocess_ms": f64(rng.gamma(4.0, 0.4, n)),
        "latency_ms": f64(m.latency[c] * rng.uniform(0.9, 1.2, n)),
    }
    for a in m.axes:
        cols[a] = _strings(m.factor_columns[a], c)
    # Columns added to the schema after this generator was written stay null (see generate).
    return pa.Table.from_arrays([cols[f.name] if f.name in cols else pa.nulls(n, f.type)
                                 for f in schema], schema=schema)


GENERATED = ("run_id", "cell_id", "image_id", "status", "error_stage", "error", "is_reference",
             "decoded_h", "decoded_w", "shape_match", "px_equal", "px_max_abs", "px_mean_abs",
             "px_frac_diff", "px_psnr", "out_max_abs", "out_mean_abs", "out_rel_l2", "out_cosine",
             "out_sqnr_db", "out_kl", "top1", "top1_ref", "top1_agree", "top5_overlap", "top5",
             "top5_prob", "precision_effective", "reused", "decode_ms", "preprocess_ms", "latency_ms",
             "decoder_version", "decoder_libjpeg", "decode_note")


def generate(dest: Path, rows: int, seed: int, chunk_images: int | None) -> dict:
    """Write the synthetic run into ``dest`` unless an identical one is already there."""
    probe = Matrix(make_spec(1))
    n_images = -(-rows // probe.n)
    spec = make_spec(n_images)
    m = Matrix(spec)
    n_pre = len({c.key("preprocess") for c in m.cells})
    chunk = chunk_images or default_chunk_size(n_images, n_pre, 2)
    schema = row_schema(m.axes)
    key = {"v": _GEN_VERSION, "rows": rows, "seed": seed, "chunk_images": chunk,
           "schema": hashlib.sha256(str(schema).encode()).hexdigest()[:16]}
    run = RunDir(dest)
    if run.exists():
        old = run.read_manifest()
        if old.get("bench_key") == key and old.get("status") == "complete":
            return old
        import shutil
        shutil.rmtree(dest)
    rng = np.random.default_rng(seed)
    im = Images(n_images, rng)
    run_id = uuid.UUID(int=seed).hex[:12]
    nulls = [f.name for f in schema if f.name not in GENERATED and f.name not in m.axes]
    if nulls:
        print(f"  note: columns left null (detection-only, or not modelled here): {', '.join(nulls)}",
              file=sys.stderr)
    dest.mkdir(parents=True)
    write_parquet_atomic(m.cells_table(), dest / "cells.parquet")
    write_parquet_atomic(im.table(), dest / "images.parquet")
    t0 = time.perf_counter()
    total = 0
    n_chunks = -(-n_images // chunk)
    for ci in range(n_chunks):
        lo, hi = ci * chunk, min(n_images, (ci + 1) * chunk)
        table = chunk_rows(m, im, lo, hi, run_id, rng, schema)
        write_parquet_atomic(table, run.part_path(ci))
        total += table.num_rows
        if ci % 500 == 0 or ci == n_chunks - 1:
            print(f"  generated {total:,} rows in {ci + 1} part files ({time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr)
    manifest = {
        "run_id": run_id, "dmx_format": 1, "status": "complete", "bench_key": key,
        "started": "2026-01-01T00:00:00+00:00", "finished": "2026-01-01T01:00:00+00:00",
        "spec_digest": spec.digest, "spec": spec.raw,
        "model": {"name": "mobilenet_v2", "task": "classification"},
        "reference_cell": m.ref.cell_id, "reference": m.ref.label(), "cells": m.n,
        "skipped_cells": {}, "images": n_images, "chunk_size": chunk, "chunks": n_chunks,
        "executor": {"name": "ray", "workers": 2, "threads": 1}, "batch": 8,
        "counters": {"images": n_images, "determinism_checks": n_chunks // 4 * 5,
                     "determinism_mismatches": 0, "determinism_max_abs": 0.0},
        "backends": {}, "rows": total, "generation_s": round(time.perf_counter() - t0, 1),
    }
    run.write_manifest(manifest)
    return manifest


class TimedConnection:
    """Wraps a DuckDB connection: records the wall time of each statement (execute + fetch)."""

    def __init__(self, con, log: list) -> None:
        self._con, self._log = con, log

    def execute(self, sql: str, params=None):
        t = time.perf_counter()
        res = self._con.execute(sql, params) if params is not None else self._con.execute(sql)
        return _TimedResult(res, self._log, sql, params, t)

    def __getattr__(self, name):
        return getattr(self._con, name)


class _TimedResult:
    def __init__(self, res, log, sql, params, t) -> None:
        self._res, self._log, self._sql, self._params, self._t = res, log, sql, params, t

    def _done(self, value):
        self._log.append((time.perf_counter() - self._t, self._sql, self._params))
        return value

    def fetchall(self):
        return self._done(self._res.fetchall())

    def fetchone(self):
        return self._done(self._res.fetchone())

    def __getattr__(self, name):
        return getattr(self._res, name)


def profile(dest: Path, top: int) -> None:
    """Time every statement explain_run issues; EXPLAIN ANALYZE the slowest ``top``."""
    import dmx.analysis.explain as ex
    log: list = []
    real_open = ex.open_run
    cons = []

    def timed_open(path, con=None):
        c = real_open(path, con)
        cons.append(c)
        return TimedConnection(c, log)

    ex.open_run = timed_open
    try:
        t = time.perf_counter()
        ex.explain_run(dest)
        total = time.perf_counter() - t
    finally:
        ex.open_run = real_open
    print(f"profile: explain_run {total:.2f} s, {len(log)} statements, "
          f"{sum(x[0] for x in log):.2f} s in SQL")
    for s, sql, _ in sorted(log, key=lambda x: -x[0])[:12]:
        print(f"  {s:7.3f} s  {' '.join(sql.split())[:150]}")
    con = cons[0]
    for s, sql, params in sorted(log, key=lambda x: -x[0])[:top]:
        body = "\n".join(ln for ln in sql.splitlines() if not ln.lstrip().startswith("--"))
        print(f"\nEXPLAIN ANALYZE ({s:.2f} s): {' '.join(body.split())[:120]} ...")
        for line in explain_analyze(con, body, params):
            print("  " + line)


def explain_analyze(con, sql: str, params) -> list[str]:
    """DuckDB's profile of one statement (JSON profiling output), as one line per operator,
    the costliest first: time, rows out, operator, and what it reads or computes."""
    import tempfile
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        con.execute("PRAGMA enable_profiling = 'json'")
        con.execute(f"PRAGMA profiling_output = '{f.name}'")
        t = time.perf_counter()
        con.execute(sql, params or {}).fetchall()
        wall = time.perf_counter() - t
        con.execute("PRAGMA disable_profiling")
        prof = json.loads(Path(f.name).read_text())
    ops = []

    def walk(node, depth):
        info = node.get("extra_info") or {}
        what = "; ".join(f"{k}: {v}" for k, v in info.items()
                         if k in ("Function", "Projections", "Groups", "Aggregates", "Join Type",
                                  "Conditions", "Total Files Read", "Filters", "Order By"))
        ops.append((node.get("timing", 0.0), node.get("intermediate_rows", node.get("rows_scanned", 0)),
                    depth, node.get("name", "?"), " ".join(what.split())))
        for ch in node.get("children", []):
            walk(ch, depth + 1)

    for root in prof.get("operator", []):
        walk(root, 0)
    io = prof.get("io", {})
    lines = [f"wall {wall:.3f} s; {len(ops)} operators, operator time {sum(o[0] for o in ops):.3f} s "
             f"(summed over threads); read {io.get('total_bytes_read', 0) / 2**20:.0f} MB"]
    for timing, rows, depth, name, what in sorted(ops, key=lambda o: -o[0])[:8]:
        lines.append(f"{timing:8.3f} s {rows:>12,} rows  {name:<18} {what[:110]}")
    return lines


def compacted_copy(src: Path, dest: Path) -> tuple[float, float]:
    """The same run compacted by dmx itself (``dmx.results.compact.compact_run`` and
    ``dmx.analysis.aggregates.write_summary``, what every run does at its end and ``dmx compact`` does
    for older runs): the part files are hard-linked into ``dest`` and merged there into few
    files sorted by cell, then explain's aggregates are stored beside them. Cached; returns the
    seconds the compaction and the summary took (0 when cached)."""
    import shutil

    from dmx.analysis.db import open_run
    from dmx.analysis.aggregates import write_summary
    from dmx.analysis.summary import Summary
    from dmx.results.compact import compact_run
    key = repr(RunDir(src).read_manifest().get("bench_key", {}))
    done = dest / ".compacted-from"
    if done.is_file() and done.read_text() == key:
        if Summary(open_run(dest), RunDir(dest)).valid:
            return 0.0, 0.0
        t = time.perf_counter()
        write_summary(dest)
        return 0.0, time.perf_counter() - t
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for name in ("manifest.json", "cells.parquet", "images.parquet"):
        shutil.copy(src / name, dest / name)
    for part in (src / "rows").glob("chunk=*/part-0.parquet"):
        target = dest / "rows" / part.parent.name / part.name
        target.parent.mkdir(parents=True)
        os.link(part, target)          # compaction unlinks these, the originals stay
    t = time.perf_counter()
    c = compact_run(dest)
    seconds = time.perf_counter() - t
    print(f"  compacted {c.files_before:,} part files into {c.files_after} ({c.rows:,} rows) "
          f"in {seconds:.1f} s", file=sys.stderr)
    done.write_text(key)
    t = time.perf_counter()
    write_summary(dest)
    return seconds, time.perf_counter() - t


def without_summary(compacted: Path) -> Path:
    """The compacted run as it would be without explain's stored aggregates (hard links)."""
    import shutil
    bare = compacted.with_name(compacted.name + "-nosummary")
    shutil.rmtree(bare, ignore_errors=True)
    shutil.copytree(compacted, bare, copy_function=os.link,
                    ignore=shutil.ignore_patterns("summary"))
    return bare


def time_explain(dest: Path, repeat: int) -> tuple[float, float, str, str]:
    """(best in-process explain_run + render_text s, subprocess `dmx explain` s, text, stdout)."""
    from dmx.analysis.explain import explain_run
    from dmx.analysis.render import render_text
    best = None
    for _ in range(repeat):
        t = time.perf_counter()
        text = render_text(explain_run(dest))
        s = time.perf_counter() - t
        best = s if best is None else min(best, s)
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dmx", "explain", str(dest)],
                          capture_output=True, text=True)
    sub_s = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"dmx explain {dest} failed ({proc.returncode}):\n{proc.stderr}")
    return best, sub_s, text, proc.stdout


def _vm_hwm_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def time_command(args: list[str]) -> tuple[float, float, int]:
    """(wall s, peak RSS MB, exit code) of ``dmx ARGS`` in a fresh process. The peak is the
    child's VmHWM read from /proc while it runs: its rusage would also count this process's
    own peak, which a child inherits at fork and keeps through exec."""
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "dmx", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, _vm_hwm_mb(proc.pid) or 0.0)
        time.sleep(0.02)
    wall = time.perf_counter() - t
    err = proc.stderr.read().decode(errors="replace")
    if proc.returncode not in (0, 1):     # check and diff answer 1 for "broken" / "moved"
        raise SystemExit(f"dmx {' '.join(args)} failed ({proc.returncode}):\n{err}")
    return wall, peak, proc.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000_000, help="rows to generate (default 10,000,000)")
    ap.add_argument("--out", default=None, help="run directory (default bench/.data/explain-<rows>)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk-images", type=int, default=None,
                    help="images per part file (default: dmx's default_chunk_size for 2 workers)")
    ap.add_argument("--repeat", type=int, default=1, help="in-process timings (best is reported)")
    ap.add_argument("--profile", action="store_true", help="time each SQL statement, EXPLAIN ANALYZE the slowest")
    ap.add_argument("--top", type=int, default=2, help="statements to EXPLAIN ANALYZE with --profile")
    ap.add_argument("--commands", action="store_true",
                    help="also time dmx check, dmx diff (the run against itself) and dmx report on "
                         "the compacted run, with each one's peak RSS")
    ap.add_argument("--skip-parts", action="store_true",
                    help="do not time explain on the uncompacted part files (a run ends compacted; "
                         "beyond 4 M rows explain reads part files once per pass of cells)")
    ap.add_argument("--wait-quiet", type=float, default=300, metavar="S",
                    help="before timing, wait up to S seconds for other processes to leave the CPUs idle")
    a = ap.parse_args()

    dest = Path(a.out or BENCH / ".data" / f"explain-{a.rows}")
    t = time.perf_counter()
    manifest = generate(dest, a.rows, a.seed, a.chunk_images)
    gen_s = time.perf_counter() - t
    parts = list(dest.glob("rows/chunk=*/part-0.parquet"))
    size = sum(p.stat().st_size for p in parts)
    print(f"run: {dest}: {manifest['rows']:,} rows = {manifest['images']:,} images x "
          f"{manifest['cells']} cells in {len(parts):,} part files ({size / 2**20:.0f} MB); "
          f"ready in {gen_s:.1f} s (generated in {manifest['generation_s']} s when first made)")

    import duckdb
    compact = dest.with_name(dest.name + "-compacted")
    merge_s, summary_s = compacted_copy(dest, compact)   # before waiting for quiet: CPU work
    bare = without_summary(compact)
    files_after = len(list(compact.glob("rows/*/*.parquet")))
    threads = duckdb.connect().execute("SELECT current_setting('threads')").fetchone()[0]
    quiet = wait_for_quiet(a.wait_quiet)
    print(f"machine: {os.cpu_count()} CPUs, {quiet:.2f} cores busy before timing; duckdb "
          f"{duckdb.__version__}, threads={threads}")
    best_c, sub_c, text_c, stdout = time_explain(compact, a.repeat)
    best, sub_s, text, stdout = (time_explain(dest, a.repeat) if not a.skip_parts else
                                 (float("nan"), float("nan"), text_c, stdout))
    best_b, sub_b, text_b, _ = time_explain(bare, a.repeat)
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if stdout.strip() != text.strip():
        print("warning: subprocess output differs from the in-process rendering", file=sys.stderr)
    print("--- dmx explain output (first 25 lines) ---")
    print("\n".join(stdout.splitlines()[:25]))
    print("---")
    print(f"{'':34} {'part files':>12} {'compacted':>12} {'+ summary':>12} {'ratio':>7}")
    print(f"{'files':34} {len(parts):>12,} {files_after:>12,} {files_after:>12,}")
    print(f"{'explain_run + render_text (s)':34} {best:>12.2f} {best_b:>12.2f} {best_c:>12.2f} "
          f"{best / best_c:>6.1f}x")
    print(f"{'`dmx explain` subprocess wall (s)':34} {sub_s:>12.2f} {sub_b:>12.2f} {sub_c:>12.2f} "
          f"{sub_s / sub_c:>6.1f}x")
    print(f"compaction took {merge_s:.1f} s and the summary {summary_s:.1f} s (0 = cached); "
          f"same explain text: {text_c == text == text_b}; "
          f"peak RSS {r1.ru_maxrss / 1024:.0f} MB (largest child)")
    if a.profile:
        profile(dest, a.top)
    commands: dict[str, float] = {}
    if a.commands:
        report = compact.with_name(compact.name + "-report.html")
        for name, args in (("check", ["check", str(compact)]),
                           ("diff", ["diff", str(compact), str(compact)]),
                           ("report", ["report", str(compact), "-o", str(report)])):
            wall, rss, code = time_command(args)
            commands[f"{name}_s"], commands[f"{name}_rss_mb"] = round(wall, 2), round(rss)
            print(f"dmx {name} on the compacted run: {wall:.2f} s, peak RSS {rss:.0f} MB, exit {code}")
    print(json.dumps({"rows": manifest["rows"], **commands, "explain_s": round(sub_s, 3),
                      "explain_inprocess_s": round(best, 3),
                      "explain_compacted_s": round(sub_c, 3),
                      "explain_compacted_inprocess_s": round(best_c, 3),
                      "explain_compacted_nosummary_s": round(sub_b, 3),
                      "compact_s": round(merge_s, 1), "summary_s": round(summary_s, 1), "files": len(parts),
                      "files_compacted": files_after, "duckdb_threads": int(threads)}))


if __name__ == "__main__":
    main()
