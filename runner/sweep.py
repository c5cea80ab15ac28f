"""A run from spec to run directory: plan, convert models, sweep chunks, stream Parquet, manifest."""
from __future__ import annotations

import dataclasses
import datetime as dt
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from matrix import Cell, Spec, expand, reference_cell
from matrix.axes import DECODE, INFER, PREPROCESS
from results import RunDir, RunDirError, cell_schema, write_parquet_atomic
from results.environment import fingerprint

from .backends import BACKENDS, InferSetting
from .convert import ResolvedModel, prepare_artifacts, resolve_model
from .dataset import ImageRef, NotRead, scan_dataset
from .decoders import (DecodeError, decode_options, ensure_decoder_envs, get_decoder,
                       unavailable_reason)
from .executors import LocalExecutor, RayExecutor
from .plan import Plan, default_chunk_size, make_chunks
from .preprocess import PreprocessError, model_input_pixels, normalise
from .progress import Progress
from .worker import ChunkResult


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


def plan_cells(spec: Spec) -> tuple[list[Cell], Cell]:
    cells = expand(spec)
    return cells, reference_cell(spec, cells)


def _static_skip_reason(cell: Cell) -> str | None:
    """Reasons known before any model file exists: a decoder (or a decode option it lacks)
    that cannot run here."""
    return unavailable_reason(dict(cell.factors))


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
            pixels = decoder.decode(Path(img.path).read_bytes(), decode_options(dict(ref.factors)))
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
        if run.root.exists() and any(run.root.iterdir()):
            raise RunDirError(f"{run.root} exists, is not empty and holds no dmx run; "
                              "choose another --out")
        return None
    old = run.read_manifest()
    if old.get("spec_digest") != spec.digest:
        raise RunDirError(f"{run.root} holds a run of a different spec ({old.get('spec', {}).get('name')!r}, "
                          f"digest {old.get('spec_digest')}, this spec {spec.digest}); "
                          "choose another --out")
    if not resume:
        raise RunDirError(f"{run.root} already holds a run of this spec; add --resume to finish "
                          "it, or choose another --out")
    return old


def run_spec(spec: Spec, opts: RunOptions) -> RunSummary:
    """Sweep every cell of ``spec`` over its dataset into ``opts.out``."""
    t0 = time.perf_counter()
    run = RunDir(opts.out)
    cells, ref = plan_cells(spec)
    listing = scan_dataset(spec.dataset)
    images = listing.images
    ensure_decoder_envs(c.get("decoder") for c in cells)  # pinned decoder envs, before any image
    old = _check_out_dir(run, spec, opts.resume)
    model = resolve_model(spec.model)
    executor = (RayExecutor(opts.workers, opts.address) if opts.executor == "ray"
                else LocalExecutor(opts.workers))
    skipped = {c.cell_id: r for c in cells if (r := _static_skip_reason(c))}
    if ref.cell_id in skipped:
        raise RunDirError(f"the reference cell cannot run here: {skipped[ref.cell_id]}")
    settings = {(c.get("backend", "torch"), c.get("precision", "fp32"), c["conversion"])
                for c in cells if c.cell_id not in skipped}
    t_conv = time.perf_counter()
    artifacts = prepare_artifacts(model, settings, lambda: _calibration(spec, images, ref, model))
    made = [k for k, v in artifacts.conversion_notes.items()
            if isinstance(v, dict) and v.get("cached") is False]
    if made and opts.progress:
        print(f"dmx: converted the model once ({', '.join(made)}) in "
              f"{time.perf_counter() - t_conv:.1f} s; cached for later runs", file=sys.stderr)
    for c in cells:
        if c.cell_id not in skipped:
            setting = InferSetting.from_factors(dict(c.factors))
            reason = BACKENDS[setting.backend].unsupported(artifacts, setting)
            if reason:
                skipped[c.cell_id] = reason
    if ref.cell_id in skipped:
        raise RunDirError(f"the reference cell cannot run here: {skipped[ref.cell_id]}")

    active = [c for c in cells if c.cell_id not in skipped]
    n_dec = len({c.key(DECODE) for c in active})
    n_pre = len({c.key(PREPROCESS) for c in active})
    n_inf = len({c.key(INFER) for c in active})
    chunk_size = (opts.chunk_size or (old or {}).get("chunk_size")  # resume keeps its chunks
                  or default_chunk_size(len(images), n_pre, executor.workers))
    run_id = old["run_id"] if old else uuid.uuid4().hex[:12]
    plan = Plan(run_id=run_id, axes=spec.axis_names, cells=tuple(cells), reference_id=ref.cell_id,
                skipped=skipped, model=model, artifacts=artifacts, threads=executor.threads,
                batch=opts.batch)
    chunks = make_chunks(images, chunk_size)
    if old and old.get("chunk_size") != chunk_size:
        raise RunDirError(f"{run.root} was run with --chunk-size {old.get('chunk_size')}; "
                          "resume with the same chunk size")
    done = run.done_chunks()
    todo = [c for c in chunks if c.index not in done]

    manifest: dict[str, Any] = {
        "run_id": run_id, "dmx_format": 1, "status": "running",
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
        "executor": {"name": executor.name, "workers": executor.workers, "threads": executor.threads},
        "batch": opts.batch,
        "plan": {"decode_variants": n_dec, "preprocess_variants": n_pre, "infer_settings": n_inf},
        # The least work the spec needs: every image decoded once per decode variant and
        # preprocessed once per preprocessing variant, every model built once per worker.
        # Counters equal these when every image decodes; reused outputs cut inferences below
        # images x preprocessing variants x settings.
        "minimum": {"decodes": len(images) * n_dec, "resizes": len(images) * n_pre,
                    "inferences_without_reuse": len(images) * n_pre * n_inf,
                    "model_builds": executor.workers * n_inf},
        "environment": fingerprint(),
        "counters": old.get("counters", {}) if old else {},
        "backends": old.get("backends", {}) if old else {},
    }
    run.root.mkdir(parents=True, exist_ok=True)
    write_parquet_atomic(_cells_table(spec, cells, ref, skipped), run.root / "cells.parquet")
    run.write_manifest(manifest)

    progress = Progress(len(images), len(chunks), len(cells), enabled=opts.progress)
    progress.skip(sum(len(c.images) for c in chunks if c.index in done), len(done))
    counters: Counter[str] = Counter(manifest["counters"])
    totals = {"rows": 0, "errors": 0}

    def on_result(res: ChunkResult) -> None:
        run.write_chunk(res.chunk, res.rows, res.images)
        counters.update(res.counters)
        for k, v in res.backends.items():
            manifest["backends"].setdefault(k, v)
        errors = pc.sum(pc.equal(res.rows["status"], "error")).as_py() or 0
        totals["rows"] += res.rows.num_rows
        totals["errors"] += errors
        progress.update(len(res.rows) // max(1, len(cells)), errors)

    if todo:
        progress.note(f"sweeping {len(cells)} cells ({len(skipped)} skipped) x {len(images)} images "
                      f"in {len(todo)} chunks of {chunk_size} on {executor.name} "
                      f"({executor.workers} worker{'s' if executor.workers > 1 else ''})")
    executor.run(plan, todo, on_result)
    n_images = run.merge_images()
    wall = time.perf_counter() - t0
    manifest.update(status="complete", finished=dt.datetime.now(dt.timezone.utc).isoformat(),
                    wall_s=round(wall, 2), counters=dict(counters), ray=getattr(executor, "where", None))
    run.write_manifest(manifest)
    return RunSummary(out=str(run.root), run_id=run_id, images=n_images, cells=len(cells),
                      skipped_cells=len(skipped), rows=totals["rows"], errors=totals["errors"],
                      chunks_run=len(todo), chunks_resumed=len(done), wall_s=wall,
                      counters=dict(counters), minimum=manifest["minimum"],
                      not_read=tuple(listing.not_read))


def _cells_table(spec: Spec, cells: list[Cell], ref: Cell, skipped: dict[str, str]) -> pa.Table:
    rows = [{"cell_id": c.cell_id, **dict(c.factors), "is_reference": c.cell_id == ref.cell_id,
             "status": "skipped" if c.cell_id in skipped else "ok",
             "skip_reason": skipped.get(c.cell_id), "label": c.label()} for c in cells]
    return pa.Table.from_pylist(rows, schema=cell_schema(spec.axis_names))
