"""One worker's job: all cells of the matrix over one chunk of images.

Work is shared wherever the factors allow: each image is decoded once per decode variant,
preprocessed once per preprocessing variant, and each distinct input tensor is inferred once per
backend setting (key: setting + hash of the tensor bytes); the other cells reuse that output.
The reference cell's results stay at hand, so divergence is computed right here. A detector's
raw outputs are decoded and NMS'd here too, by the one numpy implementation in ``detection``.
"""
from __future__ import annotations

import errno
import hashlib
import math
import platform
import resource
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dmx.matrix import Cell
from dmx.matrix.axes import AXES, DECODE, INFER, PREPROCESS
from dmx.results import RunDir
from dmx.results.environment import fingerprint
from dmx.results.fs import StorageError
from dmx.results.schema import DET_BOX, IMAGE_COLUMNS, IMAGE_SCHEMA, OUTPUT_DIV, row_schema

from . import metrics
from .artifacts import ArtifactError
from .backends import BACKENDS, BackendRunner, InferSetting
from .decoders import DecodeError, DecoderUnavailable, decode_options, get_decoder
from .decoders.base import forget_headers, remember_header
from .detection import (Candidates, DetectionConfig, DetectionDecodeError, Detections, detect,
                        to_image)
from .imageinfo import image_info_for_decoders
from .memory import keep_freed_memory
from .plan import Chunk, Plan
from .sources import TransientReadError, read_image
from .preprocess import Placement, PreprocessError, model_input, normalise


@dataclass
class _Failure:
    stage: str
    message: str


@dataclass
class _Decoded:
    pixels: np.ndarray | None   # (H, W, 3) uint8, RGB (BGR for color=bgr); None once preprocessed
    ms: float
    note: str | None            # what the decoder converted (e.g. "CMYK->RGB (Pillow convert)")
    shape: tuple[int, ...] = ()

    def without_pixels(self) -> "_Decoded":
        """What the rows need after preprocessing: shape, time, note (not the pixels)."""
        return _Decoded(None, self.ms, self.note, self.pixels.shape if self.pixels is not None
                        else self.shape)


@dataclass
class _Prepped:
    pixels: np.ndarray          # (H, W, 3) float32, 0-255
    tensor: np.ndarray          # (3, H, W) float32, normalised
    digest: bytes
    ms: float
    placement: Placement        # where the decoded image sits in the input (maps boxes back)


@dataclass
class ChunkResult:
    chunk: int
    rows: pa.Table
    images: pa.Table
    counters: dict[str, float]
    backends: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class ChunkSummary:
    """What a worker reports for a chunk it computed and wrote itself: small, whatever the
    chunk's size (the rows stay in the part file)."""

    chunk: int
    rows: int
    errors: int
    images: int
    files: tuple[str, ...]
    counters: dict[str, float]
    backends: dict[str, dict[str, Any]]
    node: str
    environment: dict[str, Any] | None = None   # the node's fingerprint, on a worker's first chunk
    peak_rss_mb: float = 0.0                     # the worker process's peak resident memory so far
    seconds: float = 0.0                         # computing and writing it (the chunk deadlines)
    write_error: str | None = None               # its part file could not be written (retried)


#: Attempts at writing a chunk's part file, and the pause before each retry (seconds): a PUT
#: that fails (a throttled or briefly unreachable store, beyond the SDK's own retries) or a
#: local write that fails is tried again before the chunk is reported unwritten.
WRITE_ATTEMPTS = 3
WRITE_BACKOFF_S = (0.5, 2.0)
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def node_environment() -> dict[str, Any]:
    """This node's fingerprint plus ``dmx_code``, the digest of the dmx code it runs (shipped
    by ``py_modules`` it has no package metadata; the digest still tells one dmx from another)."""
    from .runtime_env import RuntimeEnvError, code_digest
    env = fingerprint()
    try:
        env["dmx_code"] = code_digest()
    except (RuntimeEnvError, OSError):
        env["dmx_code"] = None
    return env


READ_AHEAD = 16                    # remote reads in flight per worker
READ_AHEAD_BYTES = 64 * 1024 * 1024  # and at most this many bytes of them (listed sizes)

# Counters that are a maximum, not a count: merged across chunks and workers with max().
MAX_COUNTERS = frozenset({"determinism_max_abs"})


def merge_counters(total: Counter, part: dict[str, float]) -> None:
    """Add a chunk's counters to a run's: counts add up, maxima (``MAX_COUNTERS``) take the max."""
    for k, v in part.items():
        total[k] = max(total.get(k, 0), v) if k in MAX_COUNTERS else total.get(k, 0) + v


def _setting_key(setting: InferSetting) -> str:
    return ",".join(f"{k}={v}" for k, v in setting.__dict__.items() if v is not None)


class Worker:
    """Holds built backends for the life of the process (a Ray actor or the local executor)."""

    def __init__(self, plan: Plan, node: str | None = None) -> None:
        keep_freed_memory()
        self.plan = plan
        self.node = node or platform.node()
        self._environment_sent = False
        self.runners: dict[InferSetting, BackendRunner | _Failure] = {}
        self.decoder_versions: dict[str, dict[str, str | None]] = {}
        self.counters: Counter[str] = Counter()
        # (setting, input digest) -> (max abs, rel L2) of its output across batch compositions
        self._batch_checks: dict[tuple[str, bytes], tuple[float, float]] = {}
        self._pool: ThreadPoolExecutor | None = None    # read-ahead of remote images
        self._infos: dict[InferSetting, dict[str, Any]] = {}  # what each built backend reports

    def _artifacts_for(self, setting: InferSetting):
        """The artifacts ``setting`` builds from: on a cluster, its product (and a user's
        weights) fetched into this node's cache and verified; raises ArtifactError."""
        arts = self.plan.artifacts
        if not arts.published:
            return arts
        from .artifacts import WEIGHTS_KEY, materialise
        key = BACKENDS[setting.backend].model_key(setting)
        return materialise(arts, arts.published, keys=[k for k in (key, WEIGHTS_KEY) if k])

    def runner(self, setting: InferSetting) -> BackendRunner | _Failure:
        if setting not in self.runners:
            cls = BACKENDS[setting.backend]
            try:
                r = cls(self._artifacts_for(setting), setting, threads=self.plan.threads)
            except ArtifactError as e:           # the fetch, or the bytes fail their digest
                self.runners[setting] = _Failure("model-build", str(e))
                return self.runners[setting]
            try:
                r.activate()
                self.counters["model_builds"] += 1
                self.runners[setting] = r
            except Exception as e:  # a backend's build can fail in library-specific ways
                self.runners[setting] = _Failure("model-build", f"{type(e).__name__}: {e}")
        return self.runners[setting]

    def run_chunk(self, chunk: Chunk) -> ChunkSummary:
        """Compute ``chunk`` and write its part files (atomically) into the run directory. A
        write that fails is retried (``WRITE_ATTEMPTS``); one that keeps failing is reported
        in the summary (``write_error``), never raised: the run goes on without that chunk."""
        t = time.perf_counter()
        res = self.process_chunk(chunk)
        run = RunDir(self.plan.out)
        retry = res.counters.get("transient_read_errors", 0) > 0
        failure = write_with_retries(run, res, retry)
        env = None
        if not self._environment_sent:
            env, self._environment_sent = node_environment(), True
        errors = pc.sum(pc.equal(res.rows["status"], "error")).as_py() or 0
        return ChunkSummary(res.chunk, 0 if failure else res.rows.num_rows, 0 if failure else errors,
                            res.images.num_rows,
                            () if failure else (str(run.part_path(res.chunk, retry)),),
                            res.counters, res.backends, self.node, env,
                            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                            time.perf_counter() - t, failure)

    def process_chunk(self, chunk: Chunk) -> ChunkResult:
        plan = self.plan
        before = Counter(self.counters)
        cells = plan.active_cells()
        ref = plan.reference
        n = len(chunk.images)

        # In groups of images (``GROUP_IMAGES``, ``GROUP_BYTES``): the headers of a group, then
        # its decodes, decoder by decoder, so each library's code stays in the CPU's caches (the
        # header parse took 2-3x longer between decodes). Each decode feeds its preprocessing
        # variants at once and is then dropped (only its shape stays), so a worker holds one
        # full-resolution decode at a time, not the chunk's (64 twelve-megapixel photos x 4
        # variants were ~9 GB) - but for up to ``SHARE_KEEP_BYTES`` of a group's decodes, kept
        # so that a later decode of the same image that is equal to one of them, pixel for
        # pixel (Pillow and OpenCV on most JPEGs), shares its preprocessed inputs.
        dkeys = _unique(c.key(DECODE) for c in cells)
        pkeys = _unique(c.key(PREPROCESS) for c in cells)
        pkeys_of = {d: [k for k in pkeys if _decode_part(k) == d] for d in dkeys}
        prep_part = {k: tuple(f for f in k if AXES[f[0]].stage != DECODE) for k in pkeys}
        decoded: dict[tuple, list[_Decoded | _Failure]] = {k: [] for k in dkeys}
        prepped: dict[tuple, list[_Prepped | _Failure]] = {k: [] for k in pkeys}
        image_rows = []
        for group in _groups(zip(chunk.images, self._reads(chunk.images))):
            for img, data in group:
                # from the bytes already read: the file is read once per chunk, its header parsed once
                info, header, opened = (image_info_for_decoders(data)
                                        if not isinstance(data, _Failure) else ({}, None, None))
                if header is not None:
                    remember_header(data, DecodeError(f"decompression bomb: {header[1]}")
                                    if header[0] == "bomb" else header, opened)
                image_rows.append({"image_id": img.image_id, "path": img.path,
                                   **{k: info.get(k) for k, _ in IMAGE_COLUMNS[2:]}})
                if isinstance(data, _Failure):
                    image_rows[-1]["error"] = data.message
            kept: list[list] = [[] for _ in group]  # per image: [pixels, {preprocessing: input}]
            budget = SHARE_KEEP_BYTES
            for di, dkey in enumerate(dkeys):
                factors = dict(dkey)
                for j, (_, data) in enumerate(group):
                    d = self._decode(data, factors)
                    same = _same_decode(d, kept[j])
                    mine = {}
                    for pkey in pkeys_of[dkey]:
                        p = same.get(prep_part[pkey]) if same is not None else None
                        if p is None:
                            pk = dict(pkey)
                            p = self._preprocess(d, pk.get("resize") or "pil-bilinear", pk.get("fit"))
                        else:
                            self.counters["shared_resizes"] += 1
                        prepped[pkey].append(mine.setdefault(prep_part[pkey], p))
                    if same is not None:
                        for part, p in mine.items():
                            same.setdefault(part, p)
                    elif (isinstance(d, _Decoded) and di < len(dkeys) - 1
                          and d.pixels.nbytes <= budget):
                        kept[j].append((d.pixels, mine))
                        budget -= d.pixels.nbytes
                    decoded[dkey].append(d.without_pixels() if isinstance(d, _Decoded) else d)
                    del d, same, mine
            forget_headers()
            del group, kept

        outputs: dict[tuple, dict[bytes, tuple[np.ndarray, float] | _Failure]] = {}
        infos: dict[str, dict[str, Any]] = {}
        for ikey in _unique(c.key(INFER) for c in cells):
            setting = InferSetting.from_factors(dict(ikey))
            inputs: dict[bytes, np.ndarray] = {}
            for c in cells:
                if c.key(INFER) == ikey:
                    for p in prepped[c.key(PREPROCESS)]:
                        if isinstance(p, _Prepped):
                            inputs.setdefault(p.digest, p.tensor)
            outputs[ikey] = self._infer(setting, inputs, chunk.position)  # every 8th in plan order
            r = self.runners.get(setting)
            if isinstance(r, BackendRunner):
                if setting not in self._infos:   # read back once per built model, not per chunk
                    self._infos[setting] = r.info() | {"build_s": round(r.build_s, 3)}
                infos[_setting_key(setting)] = self._infos[setting]

        rows = self._rows(chunk, cells, ref, decoded, prepped, outputs, infos, n)
        self._batch_checks.clear()
        counters = {k: (v if k in MAX_COUNTERS else v - before.get(k, 0))
                    for k, v in self.counters.items()}
        counters["images"] = n
        return ChunkResult(chunk.index, rows,
                           pa.Table.from_pylist(image_rows, schema=IMAGE_SCHEMA), counters, infos)

    def _read(self, img) -> bytes | _Failure:
        try:
            return read_image(img)  # local file, object or shard member
        except TransientReadError as e:
            self.counters["transient_read_errors"] += 1
            return _Failure("read", f"{type(e).__name__}: {e}")
        except OSError as e:
            return _Failure("read", f"{type(e).__name__}: {e.strerror or e}")

    def _reads(self, images) -> Iterator[bytes | _Failure]:
        """The bytes of each image in order. Remote images are read ahead by a small pool of
        threads, at most ``READ_AHEAD`` images and ``READ_AHEAD_BYTES`` (by listed size) in
        flight, so decoding does not wait on each GET; local files are read as they come."""
        if not any("://" in img.path for img in images):
            for img in images:
                yield self._read(img)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(READ_AHEAD, thread_name_prefix="dmx-read")
        pending: deque = deque()
        nbytes, nxt = 0, 0
        try:
            for _ in images:
                while nxt < len(images) and (not pending or (
                        len(pending) < READ_AHEAD and nbytes + (images[nxt].size or 0) <= READ_AHEAD_BYTES)):
                    pending.append((self._pool.submit(self._read, images[nxt]), images[nxt].size or 0))
                    nbytes += pending[-1][1]
                    nxt += 1
                future, size = pending.popleft()
                nbytes -= size
                yield future.result()
        finally:
            for future, _ in pending:
                future.cancel()

    def _decode(self, data: bytes | _Failure,
                factors: dict) -> _Decoded | _Failure:
        if isinstance(data, _Failure):
            return data
        t = time.perf_counter()
        try:
            label = factors.get("decoder") or "pil"
            dec = get_decoder(label)
            if label not in self.decoder_versions:
                self.decoder_versions[label] = dec.version()
            img = dec.decode(data, decode_options(factors))
        except (DecodeError, DecoderUnavailable) as e:
            return _Failure("decode", str(e))
        if factors.get("color") == "bgr":
            img = np.ascontiguousarray(img[..., ::-1])
        self.counters["decodes"] += 1
        if dec.last_note and "warning:" in dec.last_note:
            self.counters["decode_warnings"] += 1
        return _Decoded(img, (time.perf_counter() - t) * 1e3, dec.last_note, img.shape)

    def _preprocess(self, d: _Decoded | _Failure, resize: str, fit: str | None) -> _Prepped | _Failure:
        if isinstance(d, _Failure):
            return d
        t = time.perf_counter()
        try:
            pixels, placement = model_input(d.pixels, resize, self.plan.model.preprocess, fit)
        except PreprocessError as e:
            return _Failure("preprocess", str(e))
        tensor = normalise(pixels, self.plan.model.preprocess)
        self.counters["resizes"] += 1
        digest = hashlib.sha256(tensor.tobytes()).digest()[:16]  # SHA-NI: 0.3 ms vs blake2b 0.46
        return _Prepped(pixels, tensor, digest, (time.perf_counter() - t) * 1e3, placement)

    def _infer(self, setting: InferSetting, inputs: dict[bytes, np.ndarray],
               chunk_index: int) -> dict[bytes, tuple[Any, float] | _Failure]:
        """Infer each distinct input once. The output per image is the tuple of all the model's
        outputs (a classifier's class scores are its first; a detector's tuple is its raw head)."""
        if not inputs:
            return {}
        runner = self.runner(setting)
        if isinstance(runner, _Failure):
            return {k: runner for k in inputs}
        keys = list(inputs)
        out: dict[bytes, tuple[Any, float] | _Failure] = {}
        b = min(setting.batch or self.plan.batch, self.plan.artifacts.max_batch or 1 << 30)
        for start in range(0, len(keys), b):
            part = keys[start: start + b]
            batch = np.stack([inputs[k] for k in part])
            t = time.perf_counter()
            try:
                ys = runner.infer_all(batch)
            except Exception as e:  # an inference failure is data: error rows, not a crash
                for k in part:
                    out[k] = _Failure("infer", f"{type(e).__name__}: {e}")
                continue
            try:
                self.plan.model.output_names(len(ys))   # the spec's names fit the model
            except ValueError as e:
                for k in part:
                    out[k] = _Failure("infer", str(e))
                continue
            wrong = next((y.shape for y in ys if y.ndim == 0 or y.shape[0] != len(part)), None)
            if wrong is not None:  # a fixed-batch model (e.g. a Reshape to [1, ...]) given more
                for k in part:
                    out[k] = _Failure("infer", f"the model returned an output of shape {list(wrong)} for "
                                               f"a batch of {len(part)}; a fixed-batch model needs "
                                               "the batch axis at 1 (-o batch=1)")
                continue
            per_image = (time.perf_counter() - t) * 1e3 / len(part)
            self.counters["inferences"] += len(part)
            for i, k in enumerate(part):
                out[k] = (tuple(y[i] for y in ys), per_image)
            if start == 0 and self.plan.reuse_check_every and chunk_index % self.plan.reuse_check_every == 0:
                self._check_batch_dependence(runner, setting, part, batch, ys)
        return out

    def _check_batch_dependence(self, runner: BackendRunner, setting: InferSetting,
                                part: list[bytes], batch: np.ndarray, ys: list[np.ndarray]) -> None:
        """The reuse guard. A reused output was inferred in one batch and handed to another cell
        whose own inference would have put that tensor in another batch (other neighbours, other
        size). So re-infer the batch in reverse order (other positions) and its first tensor
        alone (batch size 1), and compare each image's output with the one that was kept.
        Per image: max abs (output units) and rel L2 of the largest difference, for the rows
        (``batch_max_abs``, ``batch_rel_l2``) that ``dmx check`` judges."""
        again = {"reversed": (batch[::-1], list(range(len(part)))[::-1])}
        if len(part) > 1:
            again["alone"] = (batch[:1], [0])
        worst: dict[int, tuple[float, float]] = {}
        for sub, index in again.values():
            try:
                zs = runner.infer_all(sub)
            except Exception:  # noqa: BLE001 - a batch the backend refuses is not a mismatch
                continue
            for pos, i in enumerate(index):
                a = np.concatenate([np.ravel(y[i]) for y in ys]).astype(np.float64)
                b = np.concatenate([np.ravel(z[pos]) for z in zs]).astype(np.float64)
                diff = float(np.max(np.abs(a - b))) if a.size else 0.0
                rel = float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30)) if a.size else 0.0
                old = worst.get(i, (0.0, 0.0))
                worst[i] = (max(old[0], diff), max(old[1], rel))
        self.counters["determinism_checks"] += 1
        top = max((d for d, _ in worst.values()), default=0.0)
        if top > 0:
            self.counters["determinism_mismatches"] += 1
            self.counters["determinism_max_abs"] = max(self.counters["determinism_max_abs"], top)
        for i, v in worst.items():
            self._batch_checks[(_setting_key(setting), part[i])] = v

    def _rows(self, chunk: Chunk, cells: list[Cell], ref: Cell, decoded: dict, prepped: dict,
              outputs: dict, infos: dict, n: int) -> pa.Table:
        """The chunk's rows, built per cell as Arrow columns. Cells share blocks of columns:
        decode columns per decode variant, input divergence per preprocessing variant, output
        divergence per (infer setting, preprocessing variant); each block is computed once,
        and its metrics once per distinct pair of tensors, vectorised over the chunk."""
        plan = self.plan
        schema = row_schema(plan.axes)
        ctx = _RowContext(self, chunk, ref, decoded, prepped, outputs, n)
        seen: set[tuple] = set()
        tables = []
        for cell in plan.cells:
            skip = plan.skipped.get(cell.cell_id)
            setting = InferSetting.from_factors(dict(cell.key(INFER)))
            info = {} if skip else infos.get(_setting_key(setting), {})
            cols: dict[str, pa.Array] = {
                "run_id": _const(plan.run_id, n), "cell_id": _const(cell.cell_id, n),
                "image_id": ctx.ids, "is_reference": _const(cell.cell_id == plan.reference_id, n,
                                                            pa.bool_()),
                "precision_effective": _const(info.get("precision_effective"), n),
                "node": _const(self.node, n), "label": ctx.label_column}
            for axis in plan.axes:
                cols[axis] = _const(dict(cell.factors).get(axis), n)
            if skip:
                cols.update(status=_const("skipped", n), error=_const(skip, n))
            else:
                cols.update(ctx.cell_columns(cell, info, seen))
            tables.append(pa.table({f.name: _typed(cols.get(f.name), f.type, n) for f in schema},
                                   schema=schema))
        return pa.concat_tables(tables) if tables else schema.empty_table()

    def _detections(self, cache: dict, key: tuple, outputs: tuple[np.ndarray, ...]
                    ) -> tuple[Candidates, Detections] | _Failure:
        """Candidates and NMS'd detections of one inferred output (model-input pixels), decoded
        once per (infer setting, input) however many cells share it."""
        if key not in cache:
            size = self.plan.model.preprocess.crop
            try:
                cache[key] = detect(outputs, (size, size), self.plan.model.detection)
                self.counters["detection_decodes"] += 1
            except DetectionDecodeError as e:
                cache[key] = _Failure("postprocess", str(e))
        return cache[key]


def _typed(column: pa.Array | None, typ: pa.DataType, n: int) -> pa.Array:
    """``column`` as the schema's type ``typ`` (nulls when the cell has no such column)."""
    if column is None:
        return pa.nulls(n, typ)
    return column if column.type == typ else column.cast(typ)


def _const(value, n: int, typ: pa.DataType | None = None) -> pa.Array:
    """A column of ``n`` times ``value`` (a constant factor of a cell)."""
    if value is None:
        return pa.nulls(n, typ or pa.string())
    return pa.array([value] * n, typ or pa.string())


def _masked(values, valid: np.ndarray, typ: pa.DataType) -> pa.Array:
    """A column of ``values`` where ``valid``, null elsewhere; a 2-D array becomes a list
    column of its rows."""
    if isinstance(values, np.ndarray) and values.ndim == 2:
        n, k = values.shape
        return pa.ListArray.from_arrays(pa.array(np.arange(0, n * k + 1, k, dtype=np.int32)),
                                        pa.array(values.ravel(), typ.value_type),
                                        mask=pa.array(~valid))
    return pa.array(values, typ, mask=~valid)


# the float64 differences of one block of input pairs: cache-sized, and bounded whatever the
# chunk (256 pairs of 224 x 224 inputs would be 300 MB at once)
_DIVERGENCE_BLOCK_BYTES = 8 * 2 ** 20
# the reference's stacks kept for a chunk's other blocks, each at most this big
_REF_STACK_KEEP_BYTES = 16 * 2 ** 20


class _RowContext:
    """What the cells of one chunk share while their columns are built (see ``Worker._rows``)."""

    def __init__(self, worker: "Worker", chunk: Chunk, ref: Cell, decoded: dict, prepped: dict,
                 outputs: dict, n: int) -> None:
        self.w, self.chunk, self.n = worker, chunk, n
        self.decoded, self.prepped, self.outputs = decoded, prepped, outputs
        self.ids = pa.array([img.image_id for img in chunk.images], pa.string())
        self.labelled = np.array([img.label is not None for img in chunk.images], bool)
        self.labels = np.array([-1 if img.label is None else img.label for img in chunk.images],
                               np.int64)
        self.label_column = pa.array(self.labels.astype(np.int32), pa.int32(), mask=~self.labelled)
        self.ref = ref
        self.ref_dec, self.ref_pre = decoded[ref.key(DECODE)], prepped[ref.key(PREPROCESS)]
        ref_out = outputs[ref.key(INFER)]
        self.ref_y = [ref_out.get(p.digest) if isinstance(p, _Prepped) else None
                      for p in self.ref_pre]
        self.ref_ok = np.array([not isinstance(d, _Failure) and isinstance(p, _Prepped)
                                and isinstance(y, tuple)
                                for d, p, y in zip(self.ref_dec, self.ref_pre, self.ref_y)], bool)
        self.blocks: dict[tuple, dict[str, Any]] = {}
        self.detections: dict[tuple, Any] = {}
        self.digests: dict[tuple, str] = {}
        self.ref_stacks: dict[tuple, np.ndarray | None] = {}
        # (image, input digest) -> (its pixels, the block's input divergence): measured once
        self.measured: dict[tuple[int, bytes], tuple[np.ndarray, dict]] = {}
        self.twins: dict[tuple, tuple] = {}     # preprocessing variant -> its twin (``_twin``)

    def _block(self, key: tuple, make) -> dict[str, Any]:
        if key not in self.blocks:
            self.blocks[key] = make()
        return self.blocks[key]

    def decode_block(self, dkey: tuple) -> dict[str, Any]:
        def make():
            ds = self.decoded[dkey]
            ok = np.array([not isinstance(d, _Failure) for d in ds], bool)
            return {"ok": ok, "fail": [d if isinstance(d, _Failure) else None for d in ds],
                    "decoded_h": np.array([d.shape[0] if o else 0 for d, o in zip(ds, ok)], np.int32),
                    "decoded_w": np.array([d.shape[1] if o else 0 for d, o in zip(ds, ok)], np.int32),
                    "decode_ms": np.array([d.ms if o else 0.0 for d, o in zip(ds, ok)]),
                    "decode_note": [d.note if o else None for d, o in zip(ds, ok)],
                    "shape": [d.shape if o else None for d, o in zip(ds, ok)]}
        return self._block(("decode", dkey), make)

    def _twin(self, pkey: tuple) -> tuple:
        """An earlier preprocessing variant whose inputs are this one's, object for object (a
        decode equal to an earlier one took over its inputs, for every image of the chunk):
        its blocks are this variant's too. Else ``pkey`` itself."""
        if pkey not in self.twins:
            ps = self.prepped[pkey]
            self.twins[pkey] = next((k for k, t in self.twins.items() if k == t and
                                     all(a is b for a, b in zip(ps, self.prepped[k]))), pkey)
        return self.twins[pkey]

    def input_block(self, pkey: tuple, dkey: tuple) -> dict[str, Any]:
        """Preprocessing columns and input divergence vs the reference, per image."""
        twin = self._twin(pkey)
        if twin != pkey:    # equal decodes, so equal shapes too: the same columns
            return self.input_block(twin, _decode_part(twin))

        def make():
            ps = self.prepped[pkey]
            ok = np.array([isinstance(p, _Prepped) for p in ps], bool)
            dec = self.decode_block(dkey)
            ref_shape = self.decode_block(self.ref.key(DECODE))["shape"]
            cmp_ = ok & self.ref_ok
            m = {k: np.zeros(self.n) for k in ("px_max_abs", "px_mean_abs", "px_frac_diff", "px_psnr")}
            m["px_equal"] = np.zeros(self.n, bool)
            idx = np.flatnonzero(cmp_)
            if pkey == self.ref.key(PREPROCESS):   # the reference's own inputs: equal by identity
                m["px_equal"][idx], m["px_psnr"][idx] = True, math.inf
            elif len(idx):
                idx = self._known_inputs(ps, idx, m)
            if len(idx):   # model inputs, all of one shape: the pairs in blocks
                step = max(1, _DIVERGENCE_BLOCK_BYTES // (8 * max(1, ps[idx[0]].pixels.size)))
                for b in range(0, len(idx), step):
                    part = idx[b:b + step]
                    v = metrics.input_divergence_rows(np.stack([ps[i].pixels for i in part]),
                                                      self._ref_pixels(part))
                    for k in m:
                        m[k][part] = v[k]
                for i in idx.tolist():
                    self.measured[(i, ps[i].digest)] = (ps[i].pixels, m)
            return {"ok": ok, "fail": [p if isinstance(p, _Failure) else None for p in ps],
                    "digest": [p.digest if o else None for p, o in zip(ps, ok)],
                    "preprocess_ms": np.array([p.ms if o else 0.0 for p, o in zip(ps, ok)]),
                    "shape_match": np.array([dec["shape"][i] == ref_shape[i] for i in range(self.n)], bool),
                    "cmp": cmp_, **m}
        return self._block(("input", pkey), make)

    def _known_inputs(self, ps: list, idx: np.ndarray, m: dict[str, np.ndarray]) -> np.ndarray:
        """Fill ``m`` for the images of ``idx`` whose model input is, pixel for pixel, the
        reference's (equal) or one whose divergence another block of the chunk measured (its
        values); the rest of ``idx``, still to be measured. Matched by the tensor's digest, then
        compared byte for byte: float pixels that differ can normalise to the same tensor."""
        rest = []
        for i in idx.tolist():
            p, r = ps[i], self.ref_pre[i]
            if p is r or (p.digest == r.digest and _same_pixels(p.pixels, r.pixels)):
                m["px_equal"][i], m["px_psnr"][i] = True, math.inf
                continue
            known = self.measured.get((i, p.digest))
            if known is not None and _same_pixels(p.pixels, known[0]):
                for k in m:
                    m[k][i] = known[1][k][i]
                continue
            rest.append(i)
        return np.array(rest, np.int64)

    def _ref_pixels(self, idx: np.ndarray) -> np.ndarray:
        """The reference's model inputs of the images ``idx``, stacked once for every block."""
        return self._ref_stack(("pixels", idx.tobytes()),
                               lambda: np.stack([self.ref_pre[i].pixels for i in idx]))

    def _ref_stack(self, key: tuple, make):
        """A stack of the reference's inputs or outputs that the next block asks for again; kept
        for the chunk when small (``_REF_STACK_KEEP_BYTES``: a detector's raw heads or large
        inputs are stacked again rather than held beside the block's own)."""
        if key in self.ref_stacks:
            return self.ref_stacks[key]
        out = make()
        if out is None or out.nbytes <= _REF_STACK_KEEP_BYTES:
            self.ref_stacks[key] = out
        return out

    def output_block(self, ikey: tuple, pkey: tuple, setting: InferSetting) -> dict[str, Any]:
        """Inference columns and output divergence vs the reference, per image."""
        twin = self._twin(pkey)
        if twin != pkey:
            return self.output_block(ikey, twin, setting)

        def make():
            w = self.w
            plan = w.plan
            ps = self.prepped[pkey]
            inp = self.input_block(pkey, _decode_part(pkey))
            outs = self.outputs[ikey]
            ys = [outs.get(p.digest) if isinstance(p, _Prepped) else p for p in ps]
            ok = np.array([isinstance(y, tuple) for y in ys], bool)
            cmp_ = ok & inp["cmp"]
            block: dict[str, Any] = {
                "ok": ok, "fail": [y if isinstance(y, _Failure) else None for y in ys],
                "latency_ms": np.array([y[1] if o else 0.0 for y, o in zip(ys, ok)]),
                "out_digest": [self._digest(ikey, p.digest, y[0]) if o else None
                               for p, y, o in zip(ps, ys, ok)],
                "cmp": cmp_}
            sk = _setting_key(setting)
            checks = [w._batch_checks.get((sk, p.digest)) if isinstance(p, _Prepped) else None
                      for p in ps]
            block["batch_max_abs"] = [c[0] if c else None for c in checks]
            block["batch_rel_l2"] = [c[1] if c else None for c in checks]
            task = plan.model.task
            idx = np.flatnonzero(cmp_)
            for i in idx:   # a cell whose model returns other outputs than the reference's
                if len(ys[i][0]) != len(self.ref_y[i][0]):
                    block["fail"][i] = _Failure("infer", f"this cell's model returned {len(ys[i][0])} "
                                                         f"outputs, the reference's {len(self.ref_y[i][0])}")
                    ok[i] = cmp_[i] = False
            idx = np.flatnonzero(cmp_)
            stacks: dict[bytes, np.ndarray] = {}   # output 0 of the images idx, stacked once
            if task == "classification" and ok.any():
                ok_idx = np.flatnonzero(ok)
                top, prob = metrics.top5_rows(_stacked(ys, ok_idx, 0, stacks))
                block["top5"] = _scatter(top, ok_idx, self.n)
                block["top5_prob"] = _scatter(prob, ok_idx, self.n)
                if self.labelled.any():
                    label = self.labels[ok_idx][:, None]
                    block["correct_top1"] = _scatter(top[:, 0] == label[:, 0], ok_idx, self.n)
                    block["correct_top5"] = _scatter((top == label).any(axis=1), ok_idx, self.n)
            if len(idx):
                m = self._output_divergence(ys, idx, stacks)
                if task == "classification":
                    m.update(metrics.classification_rows(_stacked(ys, idx, 0, stacks),
                                                         self._ref_stacked(idx, 0)))
                block.update({k: _scatter(v, idx, self.n) if isinstance(v, np.ndarray)
                              else _scatter_lists(v, idx, self.n) for k, v in m.items()})
                if task == "detection":
                    block.update(self._detection_columns(ikey, ys, idx, pkey))
            return block
        return self._block(("output", ikey, pkey), make)

    def _digest(self, ikey: tuple, input_digest: bytes, y) -> str:
        """``_output_digest`` of the output inferred from one distinct input: once per chunk,
        however many cells and images share it."""
        key = (ikey, input_digest)
        if key not in self.digests:
            self.digests[key] = _output_digest(y)
        return self.digests[key]

    def _ref_stacked(self, idx: np.ndarray, j: int) -> np.ndarray | None:
        """The reference's output ``j`` of the images ``idx``, stacked once for every block."""
        return self._ref_stack((j, idx.tobytes()), lambda: _stacked(self.ref_y, idx, j))

    def _output_divergence(self, ys: list, idx: np.ndarray, stacks: dict) -> dict[str, Any]:
        """out_* of the images ``idx``: each output against the reference's same output, and per
        column the worst over the compared outputs (``model.compare_outputs``), so a change in any
        of them shows in out_* and fails the gate; ``out_worst`` names the output with the
        largest rel L2, ``outputs`` lists every output's divergence (models with several)."""
        names, compared = self.w.plan.model.output_names(len(ys[idx[0]][0]))
        per = []
        for j in range(len(names)):
            mine = _stacked(ys, idx, j, stacks if j == 0 else None)
            theirs = self._ref_stacked(idx, j)
            if mine is not None and theirs is not None and mine.shape == theirs.shape:
                per.append(metrics.output_divergence_rows(mine, theirs))
            else:   # outputs of varying shape (a detector's dynamic box count): row by row
                rows = [metrics.output_divergence(np.asarray(ys[i][0][j]), np.asarray(self.ref_y[i][0][j]))
                        for i in idx]
                per.append({k: np.array([d[k] for d in rows]) for k in rows[0]})
        judged = [per[j] for j in compared]
        worst = np.array(compared)[np.argmax(np.stack([d["out_rel_l2"] for d in judged]), axis=0)]
        m: dict[str, Any] = {
            k: (np.min if k in ("out_cosine", "out_sqnr_db") else np.max)(
                np.stack([d[k] for d in judged]), axis=0) for k in judged[0]}
        m["out_worst"] = np.array(names, object)[worst]
        if len(names) > 1:
            m["outputs"] = [[{"name": n, "max_abs": float(d["out_max_abs"][r]),
                              "rel_l2": float(d["out_rel_l2"][r]), "cosine": float(d["out_cosine"][r])}
                             for n, d in zip(names, per)] for r in range(len(idx))]
        return m

    def _detection_columns(self, ikey: tuple, ys: list, idx: np.ndarray, pkey: tuple) -> dict:
        w, ref = self.w, self.ref
        cfg = w.plan.model.detection
        ps, rps = self.prepped[pkey], self.ref_pre
        cols: dict[str, list] = {}
        fails: list = [None] * self.n
        for i in idx:
            mine = w._detections(self.detections, (ikey, ps[i].digest), ys[i][0])
            theirs = w._detections(self.detections, (ref.key(INFER), rps[i].digest), self.ref_y[i][0])
            failure = next((x for x in (mine, theirs) if isinstance(x, _Failure)), None)
            if failure:
                fails[i] = failure
                continue
            for k, v in _detection_metrics(mine, theirs, ps[i].placement, rps[i].placement, cfg).items():
                cols.setdefault(k, [None] * self.n)[i] = v
        return {**cols, "post_fail": fails}

    def cell_columns(self, cell: Cell, info: dict, seen: set[tuple]) -> dict[str, pa.Array]:
        """Every column of one computed (not skipped) cell but its constant factors."""
        n = self.n
        dkey, pkey, ikey = cell.key(DECODE), cell.key(PREPROCESS), cell.key(INFER)
        setting = InferSetting.from_factors(dict(ikey))
        dec = self.decode_block(dkey)
        inp = self.input_block(pkey, dkey)
        out = self.output_block(ikey, pkey, setting)
        failure = [d or p or o for d, p, o in zip(dec["fail"], inp["fail"], out["fail"])]
        ok = np.array([f is None for f in failure], bool)
        full = ok & self.ref_ok
        post = out.get("post_fail")
        if post is not None:
            failure = [f or q for f, q in zip(failure, post)]
        status = ["error" if f is not None else "ok" for f in failure]
        stage = [f.stage if f is not None else ("reference" if o else None)
                 for f, o in zip(failure, ok & ~self.ref_ok)]
        error = [f.message if f is not None else (_REFERENCE_FAILED if o else None)
                 for f, o in zip(failure, ok & ~self.ref_ok)]
        reused = np.zeros(n, bool)
        for i in np.flatnonzero(ok):
            key = (ikey, inp["digest"][i])
            reused[i] = key in seen
            seen.add(key)
        self.w.counters["reuses"] += int(reused.sum())
        v = self.w.decoder_versions.get(cell.get("decoder", "pil")) or {}
        cols: dict[str, pa.Array] = {
            "status": pa.array(status, pa.string()), "error_stage": pa.array(stage, pa.string()),
            "error": pa.array(error, pa.string()),
            "decoded_h": _masked(dec["decoded_h"], dec["ok"], pa.int32()),
            "decoded_w": _masked(dec["decoded_w"], dec["ok"], pa.int32()),
            "decode_ms": _masked(dec["decode_ms"], dec["ok"], pa.float64()),
            "decode_note": pa.array(dec["decode_note"], pa.string()),
            "decoder_version": _masked([f"{v.get('library')} {v.get('version')}" if v else None] * n,
                                       dec["ok"], pa.string()),
            "decoder_libjpeg": _masked([v.get("libjpeg")] * n, dec["ok"], pa.string()),
            "preprocess_ms": _masked(inp["preprocess_ms"], inp["ok"], pa.float64()),
            "latency_ms": _masked(out["latency_ms"], ok, pa.float64()),
            "reused": _masked(reused, ok, pa.bool_()),
            "out_digest": _masked(out["out_digest"], ok, pa.string()),
            "threads_used": _masked([info.get("threads")] * n, ok, pa.int32()),
            "batch_max_abs": _masked(out["batch_max_abs"], ok, pa.float64()),
            "batch_rel_l2": _masked(out["batch_rel_l2"], ok, pa.float64()),
            "shape_match": _masked(inp["shape_match"], full, pa.bool_()),
        }
        for k in ("px_equal", "px_max_abs", "px_mean_abs", "px_frac_diff", "px_psnr"):
            cols[k] = _masked(inp[k], full, pa.bool_() if k == "px_equal" else pa.float64())
        for k in ("top5", "top5_prob"):
            if k in out:
                cols[k] = _masked(out[k], ok, pa.list_(pa.int32() if k == "top5" else pa.float32()))
        for k in ("correct_top1", "correct_top5"):
            if k in out:
                cols[k] = _masked(out[k], ok & self.labelled, pa.bool_())
        if "outputs" in out:
            cols["outputs"] = _masked(out["outputs"], full, pa.list_(OUTPUT_DIV))
        for k, values in out.items():
            if k in ("out_digest", "outputs"):
                continue
            if k.startswith(("out_", "top1")) or k == "top5_overlap":
                typ = (pa.int32() if k in ("top1", "top1_ref") else pa.bool_() if k == "top1_agree"
                       else pa.string() if k == "out_worst" else pa.float64())
                cols[k] = _masked(values, full, typ)
            elif k.startswith("det_"):
                cols[k] = pa.array(values, pa.list_(DET_BOX) if k == "det_boxes" else None)
        return cols


_REFERENCE_FAILED = "the reference cell failed on this image: no divergence measured"


def _same_pixels(a: np.ndarray, b: np.ndarray) -> bool:
    return a is b or (a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b))


def _output_digest(y) -> str:
    """Hex of the first 16 bytes of SHA-256 over the bytes of all of an image's outputs,
    so two runs can tell bit for bit whether the same cell gave the same output."""
    h = hashlib.sha256()
    for a in (y if isinstance(y, tuple) else (y,)):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:32]


def write_with_retries(run: RunDir, res: ChunkResult, retry: bool = False) -> str | None:
    """Write a chunk's part files, retrying a failed write; None when written, else why not
    (one line: the last attempt's error)."""
    last = ""
    for attempt in range(WRITE_ATTEMPTS):
        if attempt:
            time.sleep(WRITE_BACKOFF_S[min(attempt - 1, len(WRITE_BACKOFF_S) - 1)])
        try:
            run.write_chunk(res.chunk, res.rows, res.images, retry=retry)
            return None
        except (OSError, StorageError) as e:   # a local write, or the store refused the PUT
            if isinstance(e, OSError) and e.errno in _DISK_FULL:
                raise               # every later chunk would fail too: the run stops, resumable
            text = getattr(e, "strerror", None) or str(e)
            last = f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"
    return f"its part file could not be written after {WRITE_ATTEMPTS} attempts ({last})"


def _scatter(values: np.ndarray, idx: np.ndarray, n: int) -> np.ndarray:
    """``values`` (one row per image of ``idx``) at their images' places among ``n``."""
    out = np.zeros((n, *values.shape[1:]), values.dtype)
    out[idx] = values
    return out


def _stacked(ys: list, idx: np.ndarray, j: int, memo: dict | None = None) -> np.ndarray | None:
    """Output ``j`` of the images ``idx`` (``ys[i][0][j]``) as one array, or None when their
    shapes differ; ``memo`` keeps it for the next ask with the same images."""
    key = idx.tobytes()
    if memo is not None and key in memo:
        return memo[key]
    try:
        out = np.stack([ys[i][0][j] for i in idx])
    except ValueError:   # outputs of varying shape
        out = None
    if memo is not None:
        memo[key] = out
    return out


def _scatter_lists(values: np.ndarray | list, idx: np.ndarray, n: int) -> list:
    out: list = [None] * n
    for row, i in zip(values.tolist() if isinstance(values, np.ndarray) else values, idx):
        out[i] = row
    return out


def error_result(plan: Plan, chunk: Chunk, stage: str, message: str,
                 node: str | None = None) -> ChunkResult:
    """Error rows for every (cell, image) of ``chunk`` (skipped cells stay skipped): what a
    chunk whose images kill their worker every time becomes, so the run can complete."""
    rows = []
    for cell in plan.cells:
        skip = plan.skipped.get(cell.cell_id)
        for img in chunk.images:
            rows.append({"run_id": plan.run_id, "cell_id": cell.cell_id, "image_id": img.image_id,
                         **dict(cell.factors), "is_reference": cell.cell_id == plan.reference_id,
                         "node": node, **({"status": "skipped", "error": skip} if skip else
                                          {"status": "error", "error_stage": stage,
                                           "error": message})})
    images = [{"image_id": img.image_id, "path": img.path, "error": message} for img in chunk.images]
    return ChunkResult(chunk.index, pa.Table.from_pylist(rows, schema=row_schema(plan.axes)),
                       pa.Table.from_pylist(images, schema=IMAGE_SCHEMA), {"images": len(chunk.images)})


def _in_image(d: Detections, pl: Placement) -> Detections:
    return to_image(d, (pl.scale_x, pl.scale_y), (pl.offset_x, pl.offset_y), pl.image_hw)


def _detection_metrics(mine: tuple[Candidates, Detections], theirs: tuple[Candidates, Detections],
                       placement: Placement, ref_placement: Placement,
                       cfg: DetectionConfig) -> dict[str, Any]:
    """det_* columns: pre-NMS candidate order (model order, input frame) and post-NMS boxes
    compared in decoded-image pixels, so cells with another resize or fit stay comparable.
    A user decoder that returns a varying number of candidates leaves the order columns null."""
    (c, d), (rc, rd) = mine, theirs
    out: dict[str, Any] = {"det_rank_tau": None, "det_topk_overlap": None}
    if len(c.scores) == len(rc.scores):
        out.update(metrics.candidate_rank_agreement(c.scores, rc.scores, cfg.rank_k))
    a, b = _in_image(d, placement), _in_image(rd, ref_placement)
    out["det_boxes"] = [{"x1": x1, "y1": y1, "x2": x2, "y2": y2, "score": s, "class": k}
                        for (x1, y1, x2, y2), s, k in zip(a.boxes.tolist(), a.scores.tolist(),
                                                           a.classes.tolist())]
    out.update(metrics.detection_divergence(a.boxes, a.scores, a.classes, b.boxes, b.scores, b.classes,
                                            match_iou=cfg.match_iou, same_iou=cfg.same_iou,
                                            same_score=cfg.same_score))
    return out


# a group of images whose headers are parsed before their decodes (``process_chunk``)
GROUP_IMAGES = 32
GROUP_BYTES = 64 * 2 ** 20


def _groups(items) -> Iterator[list]:
    """(image, bytes or failure) pairs in lists of at most ``GROUP_IMAGES`` images and, past
    the first image, ``GROUP_BYTES`` bytes."""
    group: list = []
    size = 0
    for img, data in items:
        n = 0 if isinstance(data, _Failure) else len(data)
        if group and (len(group) >= GROUP_IMAGES or size + n > GROUP_BYTES):
            yield group
            group, size = [], 0
        group.append((img, data))
        size += n
    if group:
        yield group


# a group's decodes kept for a later decoder's equal decode to share their inputs, in bytes
SHARE_KEEP_BYTES = 32 * 2 ** 20


def _same_decode(d: "_Decoded | _Failure", kept: list) -> dict | None:
    """The preprocessed inputs (preprocessing factors -> input) of an earlier decode of the same
    image whose pixels equal ``d``'s, or None."""
    if not isinstance(d, _Decoded):
        return None
    for pixels, inputs in kept:
        if _same_pixels(pixels, d.pixels):
            return inputs
    return None


def _decode_part(pkey: tuple) -> tuple:
    return tuple((a, v) for a, v in pkey if AXES[a].stage == DECODE)


def _unique(keys):
    seen: dict = {}
    for k in keys:
        seen.setdefault(k, None)
    return list(seen)
