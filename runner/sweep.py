"""A run from spec to run directory: plan, convert models, sweep chunks, stream Parquet, manifest."""
from __future__ import annotations

import dataclasses
import datetime as dt
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from matrix import Cell, Spec, expand, reference_cell
from matrix.axes import DECODE, INFER, PREPROCESS
from results import RunDir, RunDirError, cell_schema
from results.compact import compact_run
from results.environment import fingerprint

from .backends import InferSetting
from .convert import ResolvedModel, prepare_artifacts, resolve_model
from .dataset import ImageRef, NotRead, scan_dataset
from .decoders import DecodeError, decode_options, ensure_decoder_envs, get_decoder
from .executors import LocalExecutor, RayExecutor
from .plan import Plan, default_chunk_size
from .resume import chunk_list, plan_chunks
from .resume import digest as resume_digest
from .sources import read_image, with_sizes
from .preprocess import PreprocessError, model_input_pixels, normalise
from .progress import Progress
from .worker import ChunkSummary, merge_counters


@dataclass(frozen=True)
class RunOptions:
    out: str
    executor: str = "ray"
    workers: int | None = None
    address: str | None = None
    chunk_size: int | None = None
    batch: int = 8
    resume: bool = False
    progress: bool = True
    gpus_per_worker: float | None = None
    compact: bool = True        # merge part files into few sorted files when the run ends


@dataclass(frozen=True)
class RunSummary:
    out: str
    run_id: str
    images: int
    cells: int
    skipped_cells: int
    rows: int
    errors: int
    chunks_run: int
    chunks_resumed: int
    wall_s: float
    counters: dict[str, float]
    minimum: dict[str, int]
    not_read: tuple[NotRead, ...] = ()  # entries under the dataset that have no row, and why
    start_s: float = 0.0   # until the workers answered the probe (Ray: process start + imports)


def plan_cells(spec: Spec) -> tuple[list[Cell], Cell]:
    cells = expand(spec)
    return cells, reference_cell(spec, cells)


def _cuda_devices(cells: list[Cell]) -> int:
    """How many CUDA devices one worker needs: 1 + the highest N of the cells' cuda:N."""
    ids = [int(d.partition(":")[2] or 0) for c in cells
           if str(d := c.get("device", "cpu") or "cpu").startswith("cuda")]
    return max(ids) + 1 if ids else 0


def _calibration(spec: Spec, images: list[ImageRef], ref: Cell,
                 model: ResolvedModel) -> tuple[np.ndarray, list[str]]:
    """Inputs for int8 calibration: the first ``calibration.limit`` images through the
    reference cell's decoder and preprocessing; images that fail to decode are passed over."""
    tensors, ids = [], []
    decoder = get_decoder(ref.get("decoder", "pil"))
    for img in images:
        if len(ids) >= spec.calibration_limit:
            break
        try:
            pixels = decoder.decode(read_image(img), decode_options(dict(ref.factors)))
            if ref.get("color") == "bgr":
                pixels = np.ascontiguousarray(pixels[..., ::-1])
            x = model_input_pixels(pixels, ref.get("resize", "pil-bilinear"), model.preprocess,
                                   ref.get("fit"))
        except (OSError, DecodeError, PreprocessError):
            continue
        tensors.append(normalise(x, model.preprocess))
        ids.append(img.image_id)
    if not tensors:
        raise RunDirError("no image of the dataset decodes: nothing to calibrate int8 on")
    return np.stack(tensors), ids


def _check_out_dir(run: RunDir, spec: Spec, resume: bool) -> dict[str, Any] | None:
    if not run.exists():
        if run.has_other_files():
            raise RunDirError(f"{run.uri} exists, is not empty and holds no dmx run; "
                              "choose another --out")
        return None
    old = run.read_manifest()
    if old.get("spec_digest") != spec.digest:
        raise RunDirError(f"{run.uri} holds a run of a different spec ({old.get('spec', {}).get('name')!r}, "
                          f"digest {old.get('spec_digest')}, this spec {spec.digest}); "
                          "choose another --out")
    if not resume:
        raise RunDirError(f"{run.uri} already holds a run of this spec; add --resume to finish "
                          "it, or choose another --out")
    return old


def run_spec(spec: Spec, opts: RunOptions) -> RunSummary:
    """Sweep every cell of ``spec`` over its dataset into ``opts.out``."""
    t0 = time.perf_counter()
    run = RunDir(opts.out)
    cells, ref = plan_cells(spec)
    listing = scan_dataset(spec.dataset)
    images = with_sizes(listing.images)
    ensure_decoder_envs(c.get("decoder") for c in cells)  # pinned decoder envs, before any image
    old = _check_out_dir(run, spec, opts.resume)
    model = resolve_model(spec.model)
    executor = (RayExecutor(opts.workers, opts.address, opts.gpus_per_worker)
                if opts.executor == "ray" else LocalExecutor(opts.workers))
    executor.start(_cuda_devices(cells))
    # Every setting is converted here (conversions are device-independent and cached); which
    # cells can run is asked where they will run: each Ray worker, started by the probe on its
    # node, or this process (local).
    settings = {InferSetting.from_factors(dict(c.factors)) for c in cells}
    t_conv = time.perf_counter()
    artifacts = prepare_artifacts(model, settings, lambda: _calibration(spec, images, ref, model),
                                  threads=executor.threads)
    made = [k for k, v in artifacts.conversion_notes.items()
            if isinstance(v, dict) and v.get("cached") is False]
    if made and opts.progress:
        print(f"dmx: converted the model once ({', '.join(made)}) in "
              f"{time.perf_counter() - t_conv:.1f} s; cached for later runs", file=sys.stderr)
    run_id = old["run_id"] if old else uuid.uuid4().hex[:12]
    plan = Plan(run_id=run_id, axes=spec.axis_names, cells=tuple(cells), reference_id=ref.cell_id,
                skipped={}, model=model, artifacts=artifacts, threads=executor.threads,
                batch=opts.batch, out=run.uri)
    t_start = time.perf_counter()
    skipped, nodes = executor.probe(plan)  # on Ray: the workers' process start and imports
    start_s = time.perf_counter() - t_start
    plan = dataclasses.replace(plan, skipped=skipped)
    if ref.cell_id in skipped:
        raise RunDirError(f"the reference cell cannot run here: {skipped[ref.cell_id]}")

    active = [c for c in cells if c.cell_id not in skipped]
    n_dec = len({c.key(DECODE) for c in active})
    n_pre = len({c.key(PREPROCESS) for c in active})
    n_inf = len({c.key(INFER) for c in active})
    chunk_size = (opts.chunk_size or (old or {}).get("chunk_size")  # resume keeps its chunks
                  or default_chunk_size(len(images), n_pre, executor.workers,
                                        (model.preprocess.crop, model.preprocess.crop)))
    # Chunks are named by their image ids: a resume reuses finished chunks that still hold and
    # computes the rest, whatever was added; unreadable part files do not count as finished.
    if old and run.drop_damaged_compaction() and opts.progress:
        print("dmx: a compacted row file is damaged; its chunks are computed again", file=sys.stderr)
    chunking = plan_chunks(images, chunk_size, run.read_chunk_list() if old else None,
                           run.done_chunks() if old else set(), run.uri)
    chunks = chunking.chunks
    done = chunking.kept
    todo = [c for c in chunks if c.index not in done]
    if chunking.note and opts.progress:
        print(f"dmx: {chunking.note}", file=sys.stderr)

    manifest: dict[str, Any] = {
        "run_id": run_id, "dmx_format": 2, "status": "running",
        "started": old["started"] if old else dt.datetime.now(dt.timezone.utc).isoformat(),
        "spec_digest": spec.digest, "spec": spec.raw,
        "model": {"name": model.name, "task": model.task, "preprocess": model.preprocess.__dict__,
                  "torch_factory": model.torch_factory, "weights": model.weights,
                  "files": dict(artifacts.files), "conversion": artifacts.conversion_notes,
                  "detection": dataclasses.asdict(model.detection) if model.detection else None},
        "reference_cell": ref.cell_id, "reference": ref.label(),
        "cells": len(cells), "skipped_cells": {k: v for k, v in skipped.items()},
        "images": len(images),
        "not_read": [{"path": n.path, "reason": n.reason} for n in listing.not_read],
        "chunk_size": chunk_size, "chunks": len(chunks),
        "dataset": {"images": len(images),
        "not_read": [{"path": n.path, "reason": n.reason} for n in listing.not_read],
        "digest": resume_digest(images),
                    "bytes": sum(r.size or 0 for r in images), "chunk_list": "chunks.parquet"},
        "executor": {"name": executor.name, "workers": executor.workers, "threads": executor.threads,
                     "gpus_per_worker": executor.gpus_per_worker, "start_s": round(start_s, 2)},
        "batch": opts.batch,
        "plan": {"decode_variants": n_dec, "preprocess_variants": n_pre, "infer_settings": n_inf},
        # The least work the spec needs: every image decoded once per decode variant and
        # preprocessed once per preprocessing variant, every model built once per worker.
        # Counters equal these when every image decodes; reused outputs cut inferences below
        # images x preprocessing variants x settings.
        "minimum": {"decodes": len(images) * n_dec, "resizes": len(images) * n_pre,
                    "inferences_without_reuse": len(images) * n_pre * n_inf,
                    "model_builds": executor.workers * n_inf},
        "environment": fingerprint(),   # the driver's; the workers' are under "nodes"
        # every machine that computed rows (the ``node`` column), kept across resumes
        "nodes": {**(old.get("nodes", {}) if old else {}), **nodes},
        "counters": old.get("counters", {}) if old else {},
        "backends": old.get("backends", {}) if old else {},
    }
    run.write_parquet("cells.parquet", _cells_table(spec, cells, ref, skipped))
    run.write_chunk_list(chunk_list(chunks))   # before any chunk: what a resume checks against
    run.write_manifest(manifest)

    progress = Progress(len(images), len(chunks), len(cells), enabled=opts.progress)
    progress.skip(sum(len(c.images) for c in chunks if c.index in done), len(done))
    counters: Counter[str] = Counter(manifest["counters"])
    totals = {"rows": 0, "errors": 0}

    def on_summary(res: ChunkSummary) -> None:
        merge_counters(counters, res.counters)  # a maximum stays a maximum across workers
        for k, v in res.backends.items():
            manifest["backends"].setdefault(k, v)
        if res.environment is not None:
            manifest["nodes"].setdefault(res.node, res.environment)
        peak = manifest.setdefault("peak_worker_rss_mb", {})
        peak[res.node] = round(max(peak.get(res.node, 0.0), res.peak_rss_mb), 1)
        totals["rows"] += res.rows
        totals["errors"] += res.errors
        progress.update(res.images, res.errors)

    if todo:
        progress.note(f"sweeping {len(cells)} cells ({len(skipped)} skipped) x {len(images)} images "
                      f"in {len(todo)} chunks of {chunk_size} on {executor.name} "
                      f"({executor.workers} worker{'s' if executor.workers > 1 else ''}"
                      + (f", up in {start_s:.1f} s" if executor.name == "ray" else "") + ")")
    executor.run(plan, todo, on_summary)
    n_images = run.merge_images(c.index for c in chunks)
    wall = time.perf_counter() - t0
    manifest.update(status="complete", finished=dt.datetime.now(dt.timezone.utc).isoformat(),
                    wall_s=round(wall, 2), counters=dict(counters), ray=getattr(executor, "where", None))
    run.write_manifest(manifest)
    if opts.compact:  # few large files sorted by cell: what DuckDB reads fastest
        c = compact_run(run.uri)
        if opts.progress and c.files_before > c.files_after:
            print(f"dmx: compacted {c.files_before} part files into {c.files_after} "
                  f"({c.rows} rows, sorted by cell)", file=sys.stderr)
    return RunSummary(out=run.uri, run_id=run_id, images=n_images, cells=len(cells),
                      skipped_cells=len(skipped), rows=totals["rows"], errors=totals["errors"],
                      chunks_run=len(todo), chunks_resumed=len(done), wall_s=wall,
                      counters=dict(counters), minimum=manifest["minimum"],
                      not_read=tuple(listing.not_read), start_s=start_s)


def _cells_table(spec: Spec, cells: list[Cell], ref: Cell, skipped: dict[str, str]) -> pa.Table:
    rows = [{"cell_id": c.cell_id, **dict(c.factors), "is_reference": c.cell_id == ref.cell_id,
             "status": "skipped" if c.cell_id in skipped else "ok",
             "skip_reason": skipped.get(c.cell_id), "label": c.label()} for c in cells]
    return pa.Table.from_pylist(rows, schema=cell_schema(spec.axis_names))
