"""A run from spec to run directory: plan, convert models, sweep chunks, stream Parquet, manifest."""
from __future__ import annotations

import dataclasses
import os
import datetime as dt
import shutil
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from dmx.matrix import Cell, Spec, expand, reference_cell
from dmx.matrix.axes import DECODE, INFER, PREPROCESS
from dmx.results import RunDir, RunDirError, cell_schema
from dmx.results.compact import compact_run
from dmx.results.planning import (ChunkIndex, ChunkReader, PlanError, first_images, plan_chunks,
                              scratch_dir)

from .backends import InferSetting
from .convert import ResolvedModel, conversion_root_known, prepare_artifacts, resolve_model
from .models import check_model_name
from .dataset import ImageRef, NotRead, check_dataset, collect
from .labels import labels_for_run
from .decoders import DecodeError, decode_options, ensure_decoder_envs, get_decoder
from .artifacts import manifest_record, publish
from .executors import LocalExecutor, RayExecutor
from .plan import Chunk, Plan, default_chunk_size
from .sources import read_image
from .preprocess import PreprocessError, model_input_pixels, normalise
from .progress import Progress
from .runtime_env import describe as describe_runtime_env
from .runtime_env import mismatches as version_mismatches
from .worker import ChunkSummary, merge_counters, node_environment


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
    threads_per_worker: int = 1  # intra-op threads per Ray worker (fewer actors, more threads)
    runtime_env: str = "auto"   # the actors' Ray runtime_env (``dmx.runner.runtime_env``)
    chunk_deadline_s: float | None = None   # a fixed deadline per chunk (default: derived)
    node_wait_s: float | None = None   # no node can host a worker: wait this long for one to join
    compact: bool = True        # merge part files into few sorted files when the run ends
    # called once every chunk's rows are written (none failed to be), before the image facts
    # are merged: ``dmx run`` tells its compaction child to start on the rows meanwhile
    rows_written: Callable[[], None] | None = None


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
    not_read: tuple[NotRead, ...] = ()  # the first entries under the dataset that have no row
    start_s: float = 0.0   # until the workers answered the probe (Ray: process start + imports)
    not_read_count: int = 0             # all of them (listed in RUN/not_read.parquet)
    unwritten: tuple[int, ...] = ()     # chunks whose part file could not be written


def plan_cells(spec: Spec) -> tuple[list[Cell], Cell]:
    cells = expand(spec)
    return cells, reference_cell(spec, cells)


def _cuda_devices(cells: list[Cell]) -> int:
    """How many CUDA devices one worker needs: 1 + the highest N of the cells' cuda:N."""
    ids = [int(d.partition(":")[2] or 0) for c in cells
           if str(d := c.get("device", "cpu") or "cpu").startswith("cuda")]
    return max(ids) + 1 if ids else 0


def _calibration(spec: Spec, image_list, ref: Cell,
                 model: ResolvedModel) -> tuple[np.ndarray, list[str]]:
    """Inputs for int8 calibration: the first ``calibration.limit`` images (of the sorted
    image list ``image_list``, a Parquet file) through the reference cell's decoder and
    preprocessing; images that fail to decode are passed over (up to 4x the limit is read)."""
    tensors, ids = [], []
    decoder = get_decoder(ref.get("decoder", "pil"))
    head = first_images(image_list, 4 * spec.calibration_limit)
    for image_id, path in zip(head["image_id"].to_pylist(), head["path"].to_pylist()):
        img = ImageRef(image_id, path)
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
    scratch = scratch_dir()   # the plan's working files: the listing, the chunk list
    try:
        return _run_spec(spec, opts, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _chunks_to_run(index: ChunkIndex, reader: ChunkReader):
    """The chunks not finished before, built one at a time from the chunk list as the executor
    asks for them (the driver never holds every image of the run)."""
    for pos in np.flatnonzero(~index.kept):
        rows = reader.rows(index.start[pos], index.count[pos])
        yield Chunk(int(index.ids[pos]), tuple(ImageRef(i, p, n, lab) for i, n, p, lab in rows),
                    int(pos))


def _timed_collect(ds, scratch) -> tuple[Any, float]:
    t = time.perf_counter()
    return collect(ds, scratch), time.perf_counter() - t


def _in_background(fn, *args):
    """Start ``fn(*args)`` in a daemon thread; the returned function waits for it and returns
    its result or raises its exception (a daemon: an interrupted run does not wait for it)."""
    import threading
    out: list = []

    def work() -> None:
        try:
            out.append((True, fn(*args)))
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread as it is
            out.append((False, e))

    thread = threading.Thread(target=work, name=f"dmx-{getattr(fn, '__name__', 'task')}", daemon=True)
    thread.start()

    def result():
        thread.join()
        ok, value = out[0]
        if not ok:
            raise value
        return value
    return result


def _import_meanwhile(module: str) -> None:
    """Import ``module`` in a background thread while this one starts Ray: the driver needs
    torch to digest a torch model's weights (~1.5-2 s to import), ``ray.init`` mostly waits on
    the processes it starts. A failure is left to the import that needs it (nobody waits on
    this one's result)."""
    import importlib
    if module not in sys.modules:
        _in_background(importlib.import_module, module)


def _run_spec(spec: Spec, opts: RunOptions, scratch) -> RunSummary:
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    run = RunDir(opts.out)
    cells, ref = plan_cells(spec)
    check_dataset(spec.dataset)   # a dataset path that is not there: one line before Ray starts
    old = _check_out_dir(run, spec, opts.resume)
    if spec.model.name:
        check_model_name(spec.model.name)   # an unknown name is one line before Ray starts
    executor = (RayExecutor(opts.workers, opts.address, opts.gpus_per_worker, opts.threads_per_worker,
                            runtime_env=opts.runtime_env, chunk_deadline_s=opts.chunk_deadline_s,
                            node_wait_s=opts.node_wait_s)
                if opts.executor == "ray" else LocalExecutor(opts.workers))
    if opts.executor == "ray":   # first, alone: ray imported beside torch took 1.7 s, not 0.55
        import ray  # noqa: F401
    # While Ray starts its processes (~4.5 s, mostly waiting): the listing (1.3 s at 100,000
    # manifest entries; an object store's listing is mostly waiting too), and torch.
    listed = _in_background(_timed_collect, spec.dataset, scratch)
    model = resolve_model(spec.model)
    if (spec.model.name or spec.model.torch) and not conversion_root_known(model):
        _import_meanwhile("torch")
    executor.start(_cuda_devices(cells))
    listing, timings["list_s"] = listed()
    on_cluster = getattr(executor, "cluster", False)
    if not on_cluster:   # pinned decoder envs, built before any image; on a cluster each node
        ensure_decoder_envs(c.get("decoder") for c in cells)   # builds its own (cell probe)
    if on_cluster:   # every node must read a local dataset at this path: the probe checks
        executor.dataset_root = _local_dataset_dir(listing.images)
    # Every setting is converted here (conversions are device-independent and cached); which
    # cells can run is asked where they will run: each Ray worker, started by the probe on its
    # node, or this process (local).
    settings = {InferSetting.from_factors(dict(c.factors)) for c in cells}
    t_conv = time.perf_counter()
    artifacts = prepare_artifacts(model, settings,
                                  lambda: _calibration(spec, listing.images, ref, model),
                                  threads=executor.threads)
    made = [k for k, v in artifacts.conversion_notes.items()
            if isinstance(v, dict) and v.get("cached") is False]
    if made and opts.progress:
        print(f"dmx: converted the model once ({', '.join(made)}) in "
              f"{time.perf_counter() - t_conv:.1f} s; cached for later runs", file=sys.stderr)
    if on_cluster:
        # Nodes share nothing with this machine but the run directory: each product goes
        # there once, and workers fetch it into their node's cache (runner/artifacts.py).
        artifacts = dataclasses.replace(artifacts, published=publish(artifacts, run.uri))
    run_id = old["run_id"] if old else uuid.uuid4().hex[:12]
    plan = Plan(run_id=run_id, axes=spec.axis_names, cells=tuple(cells), reference_id=ref.cell_id,
                skipped={}, model=model, artifacts=artifacts, threads=executor.threads,
                batch=opts.batch, out=run.uri)
    t_start = time.perf_counter()
    skipped, nodes = executor.probe(plan)  # on Ray: the workers' process start and imports
    start_s = time.perf_counter() - t_start
    plan = dataclasses.replace(plan, skipped=skipped)
    if old:
        _check_same_model_and_environment(run, old, artifacts, nodes)
    driver_env = node_environment()
    mismatches = version_mismatches(driver_env, nodes)
    for line in mismatches:
        print(f"dmx: warning: {line}", file=sys.stderr)
    if ref.cell_id in skipped:
        raise RunDirError(f"the reference cell cannot run here: {skipped[ref.cell_id]}")

    active = [c for c in cells if c.cell_id not in skipped]
    n_dec = len({c.key(DECODE) for c in active})
    n_pre = len({c.key(PREPROCESS) for c in active})
    n_inf = len({c.key(INFER) for c in active})
    n_images = listing.n_images
    chunk_size = (opts.chunk_size or (old or {}).get("chunk_size")  # resume keeps its chunks
                  or default_chunk_size(n_images, n_pre, executor.workers,
                                        (model.preprocess.crop, model.preprocess.crop)))
    # Chunks are named by their image ids: a resume reuses finished chunks that still hold and
    # computes the rest, whatever was added; unreadable part files do not count as finished.
    t_plan = time.perf_counter()
    if old and run.drop_damaged_compaction() and opts.progress:
        print("dmx: a compacted row file is damaged; its chunks are computed again", file=sys.stderr)
    previous = run.fetch_chunk_list(scratch / "previous-chunks.parquet") if old else None
    labels, label_coverage = labels_for_run(spec, listing.images, scratch)
    for name in (label_coverage or {}).get("files", ()):   # a detector's boxes: analysis reads them here
        run.upload(name, scratch / name)
    try:
        index = plan_chunks(listing.images, chunk_size, scratch / "chunks.parquet", previous,
                            run.done_chunks() if old else set(), run.uri, labels=labels)
    except PlanError as e:
        raise RunDirError(str(e)) from None
    n_done = int(index.kept.sum())
    if index.note and opts.progress:
        print(f"dmx: {index.note}", file=sys.stderr)

    not_read = {"count": listing.not_read_count, "file": "not_read.parquet",
                "first": [{"path": p, "reason": r} for p, r in listing.not_read_sample]}
    manifest: dict[str, Any] = {
        "run_id": run_id, "dmx_format": 3, "status": "running",
        "started": old["started"] if old else dt.datetime.now(dt.timezone.utc).isoformat(),
        "spec_digest": spec.digest, "spec": spec.raw,
        "model": {"name": model.name, "task": model.task, "digest": artifacts.digest,
                  "labels": list(model.labels) if model.labels else None,
                  "preprocess": model.preprocess.__dict__,
                  "torch_factory": model.torch_factory, "weights": model.weights,
                  "files": dict(artifacts.files), "conversion": artifacts.conversion_notes,
                  "artifacts": manifest_record(artifacts.published),
                  "detection": dataclasses.asdict(model.detection) if model.detection else None},
        "reference_cell": ref.cell_id, "reference": ref.label(),
        "cells": len(cells), "skipped_cells": {k: v for k, v in skipped.items()},
        "images": n_images,
        "not_read": not_read["first"],
        "chunk_size": chunk_size, "chunks": len(index),
        "dataset": {"images": n_images, "not_read": not_read, "digest": index.digest,
                    "bytes": listing.total_bytes, "chunk_list": "chunks.parquet",
                    "labels": label_coverage},
        "executor": {"name": executor.name, "workers": executor.workers, "threads": executor.threads,
                     "gpus_per_worker": executor.gpus_per_worker, "start_s": round(start_s, 2),
                     "worker_memory_mb": round(getattr(executor, "memory", 0) / 2 ** 20)},
        "batch": opts.batch,
        "plan": {"decode_variants": n_dec, "preprocess_variants": n_pre, "infer_settings": n_inf},
        # The work the spec asks for: every image decoded once per decode variant and
        # preprocessed once per preprocessing variant, every model built once per worker.
        # Counters equal these when every image decodes; a decode equal to an earlier variant's
        # shares its preprocessed inputs (``shared_resizes``: resizes + shared_resizes = the
        # minimum), and reused outputs cut inferences below images x preprocessing variants x
        # settings.
        "minimum": {"decodes": n_images * n_dec, "resizes": n_images * n_pre,
                    "inferences_without_reuse": n_images * n_pre * n_inf,
                    "model_builds": executor.workers * n_inf},
        "environment": driver_env,   # the driver's; the workers' are under "nodes"
        "runtime_env": describe_runtime_env(getattr(executor, "runtime_env", None)),
        "version_mismatches": mismatches,
        # every machine that computed rows (the ``node`` column), kept across resumes
        "nodes": {**(old.get("nodes", {}) if old else {}), **nodes},
        "counters": old.get("counters", {}) if old else {},
        "backends": old.get("backends", {}) if old else {},
    }
    run.write_parquet("cells.parquet", _cells_table(spec, cells, ref, skipped))
    run.upload("not_read.parquet", listing.not_read)
    run.upload("chunks.parquet", scratch / "chunks.parquet")  # before any chunk: what a resume checks
    timings["plan_s"] = time.perf_counter() - t_plan + timings["list_s"]
    driver_rss = {"planned": _peak_rss_mb()}   # the driver's peak RSS by the end of each phase
    manifest["timings"] = _rounded(timings)
    run.write_manifest(manifest)

    progress = Progress(n_images, len(index), len(cells), enabled=opts.progress)
    progress.skip(int(index.count[index.kept].sum()), n_done)
    counters: Counter[str] = Counter(manifest["counters"])
    totals = {"rows": 0, "errors": 0}
    unwritten: list[int] = []           # chunks whose part file could not be written

    def on_summary(res: ChunkSummary) -> None:
        timings.setdefault("first_chunk_s", time.perf_counter() - t0)
        merge_counters(counters, res.counters)  # a maximum stays a maximum across workers
        for k, v in res.backends.items():
            manifest["backends"].setdefault(k, v)
        if res.environment is not None:
            manifest["nodes"].setdefault(res.node, res.environment)
        if res.write_error:
            unwritten.append(res.chunk)
        peak = manifest.setdefault("peak_worker_rss_mb", {})
        peak[res.node] = round(max(peak.get(res.node, 0.0), res.peak_rss_mb), 1)
        totals["rows"] += res.rows
        totals["errors"] += res.errors
        progress.update(res.images, res.errors)

    n_todo = len(index) - n_done
    if n_todo:
        progress.note(f"sweeping {len(cells)} cells ({len(skipped)} skipped) x {n_images} images "
                      f"in {n_todo} chunks of {chunk_size} on {executor.name} "
                      f"({executor.workers} worker{'s' if executor.workers > 1 else ''}"
                      + (f", up in {start_s:.1f} s" if executor.name == "ray" else "") + ")")
    t_sweep = time.perf_counter()
    executor.run(plan, _chunks_to_run(index, ChunkReader(scratch / "chunks.parquet")), on_summary)
    timings["sweep_s"] = time.perf_counter() - t_sweep
    driver_rss["swept"] = _peak_rss_mb()
    if opts.rows_written is not None and not unwritten:
        opts.rows_written()
    t_merge = time.perf_counter()
    n_merged = run.merge_images(set(index.ids.tolist()), scratch)
    timings["merge_images_s"] = time.perf_counter() - t_merge
    driver_rss["merged"] = _peak_rss_mb()
    manifest["driver_peak_rss_mb"] = driver_rss
    wall = time.perf_counter() - t0
    if unwritten:
        print(f"dmx: {len(unwritten)} chunk(s) could not be written ({', '.join(map(str, unwritten[:5]))}"
              f"{' ...' if len(unwritten) > 5 else ''}): the run is incomplete; run the same "
              "command with --resume to compute them", file=sys.stderr)
    manifest["unwritten_chunks"] = sorted(unwritten)
    manifest.update(status="incomplete" if unwritten else "complete", finished=dt.datetime.now(dt.timezone.utc).isoformat(),
                    wall_s=round(wall, 2), counters=dict(counters), ray=getattr(executor, "where", None),
                    timings=_rounded(timings))
    run.write_manifest(manifest)
    if opts.compact:  # few large files sorted by cell: what DuckDB reads fastest
        t_compact = time.perf_counter()
        c = compact_run(run.uri)
        timings["compact_s"] = time.perf_counter() - t_compact
        driver_rss["compacted"] = _peak_rss_mb()
        run.write_manifest({**manifest, "timings": _rounded(timings)})
        if opts.progress and c.files_before > c.files_after:
            print(f"dmx: compacted {c.files_before} part files into {c.files_after} "
                  f"({c.rows} rows, sorted by cell)", file=sys.stderr)
    return RunSummary(out=run.uri, run_id=run_id, images=n_merged, cells=len(cells),
                      skipped_cells=len(skipped), rows=totals["rows"], errors=totals["errors"],
                      chunks_run=n_todo, chunks_resumed=n_done, wall_s=wall,
                      counters=dict(counters), minimum=manifest["minimum"],
                      not_read=tuple(NotRead(p, r) for p, r in listing.not_read_sample),
                      start_s=start_s, not_read_count=listing.not_read_count,
                      unwritten=tuple(sorted(unwritten)))


def _check_same_model_and_environment(run: RunDir, old: dict[str, Any], artifacts,
                                      nodes: dict[str, dict[str, Any]]) -> None:
    """A resume appends rows to rows already written: refuse when they would come from another
    model (its weights, code, input shape or conversion libraries: the conversion digest) or
    another environment (a package version any worker runs differs from the run's)."""
    changes = []
    before = (old.get("model") or {}).get("digest")
    if before and artifacts.digest and before != artifacts.digest:
        changes.append(f"the model (weights, code, input size or converters: digest "
                       f"{before[:12]} -> {artifacts.digest[:12]})")
    seen: dict[str, set] = {}
    for env in (old.get("nodes") or {}).values():
        for name, version in ((env or {}).get("packages") or {}).items():
            seen.setdefault(name, set()).add(version)
    for node, env in sorted(nodes.items()):
        for name, version in sorted(((env or {}).get("packages") or {}).items()):
            if name in seen and version not in seen[name]:
                was = ", ".join(sorted(str(v) for v in seen[name]))
                changes.append(f"{name} {was} -> {version} (node {node})")
    if changes:
        raise RunDirError(f"{run.uri} was computed with another model or environment: "
                          f"{'; '.join(changes[:4])}{' ...' if len(changes) > 4 else ''}; "
                          "resuming would mix rows of both: choose another --out")


def _local_dataset_dir(image_list) -> str | None:
    """The folder of the dataset's first image when it is on a local path (a node of a cluster
    must read it at the same path), None for object storage."""
    from dmx.results.fs import is_remote
    head = first_images(image_list, 1)
    paths = head["path"].to_pylist() if head.num_rows else []
    if not paths or is_remote(paths[0]):
        return None
    return os.path.dirname(os.path.abspath(paths[0]))


def _rounded(timings: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 2) for k, v in timings.items()}


def _peak_rss_mb() -> float:
    """This process's peak resident memory so far (MB)."""
    import resource
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _cells_table(spec: Spec, cells: list[Cell], ref: Cell, skipped: dict[str, str]) -> pa.Table:
    rows = [{"cell_id": c.cell_id, **dict(c.factors), "is_reference": c.cell_id == ref.cell_id,
             "status": "skipped" if c.cell_id in skipped else "ok",
             "skip_reason": skipped.get(c.cell_id), "label": c.label()} for c in cells]
    return pa.Table.from_pylist(rows, schema=cell_schema(spec.axis_names))
