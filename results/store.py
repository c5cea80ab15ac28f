"""A run directory, on a local disk or in an object store: atomic part files, the manifest,
the chunk list, resume bookkeeping and verification on read.

Layout (``RUN`` is a local folder or an ``s3://``/``gs://`` prefix)::

    RUN/manifest.json            spec, versions, machine, counters, status, dataset digest
    RUN/chunks.parquet           the plan: one row per image (image_id, size_bytes, chunk)
    RUN/cells.parquet            one row per cell
    RUN/images.parquet           one row per image (written when the run ends)
    RUN/rows/chunk=N/part-0.parquet          one row per (cell, image), one file per chunk
    RUN/rows/chunk=compacted-G-K/part-0.parquet  compacted rows, sorted by cell (``dmx compact``)
    RUN/compaction.json          which chunks the compacted files hold (the commit point)
    RUN/_images/chunk=N.parquet  per-chunk image properties, merged into images.parquet

A chunk's number ``N`` is derived from the ids of its images (see ``chunk_id``), never from its
position, so a resume after the dataset changed can never shift chunks.

Every local file is written to a temporary name in the same folder and renamed into place; an
object is uploaded in one request (it appears whole or not at all). So a killed run never leaves
a half-written file under a final name, and a chunk either has its part file or does not.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .fs import StorageError, filesystem, is_remote, uri
from .schema import IMAGE_SCHEMA

MANIFEST = "manifest.json"
CHUNK_LIST = "chunks.parquet"
COMPACTION = "compaction.json"
RETRY_PART = "part-0.retry.parquet"
_CHUNK_DIR = re.compile(r"^chunk=(\d+)$")
_COMPACTED_DIR = re.compile(r"^chunk=compacted-(\d+)-(\d+)$")
CHUNK_LIST_SCHEMA = pa.schema([("image_id", pa.string()), ("size_bytes", pa.int64()),
                               ("chunk", pa.int64())])


class RunDirError(RuntimeError):
    """The output directory cannot be used as asked (another spec's run, or not a run)."""


class IncompleteRunError(RunDirError):
    """A run whose chunks are not all present and readable, where a complete one is needed."""


def chunk_id(image_ids: Iterable[str]) -> int:
    """A chunk's number: 60 bits of SHA-256 over its image ids (fits DuckDB's BIGINT)."""
    h = hashlib.sha256("\n".join(image_ids).encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(h[:8], "big") >> 4


def dataset_digest(items: Iterable[tuple[str, int | None]]) -> str:
    """SHA-256 over (image id, size in bytes) pairs, in id order: the dataset a run saw."""
    h = hashlib.sha256()
    for image_id, size in sorted(items, key=lambda t: t[0]):
        h.update(f"{image_id}\0{size if size is not None else -1}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _stats_columns(schema: pa.Schema) -> list[str]:
    # No min/max statistics on float columns: they leave NaN out, and DuckDB trusts them,
    # so NaN outputs would become invisible to `isnan(...)` filters.
    return [f.name for f in schema if not pa.types.is_floating(f.type)]


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    """Write a local Parquet file so that readers see all of it or nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp, compression="zstd", write_statistics=_stats_columns(table.schema))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def parquet_bytes(table: pa.Table) -> bytes:
    """A table as the bytes of a Parquet file (zstd, no float statistics)."""
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression="zstd", write_statistics=_stats_columns(table.schema))
    return buf.getvalue().to_pybytes()


@dataclass
class Health:
    """What verification on read found: chunks planned, missing, present but unreadable."""

    location: str
    planned: list[int]
    missing: list[int] = field(default_factory=list)
    unreadable: dict[int, str] = field(default_factory=dict)
    status: str = "complete"

    @property
    def complete(self) -> bool:
        return not self.missing and not self.unreadable

    def message(self) -> str:
        """One line: which chunks (1-based positions in the plan) are missing or unreadable."""
        pos = {c: i + 1 for i, c in enumerate(self.planned)}
        parts = []
        if self.missing:
            parts.append(f"{_numbers([pos.get(c, 0) for c in self.missing])} missing")
        if self.unreadable:
            parts.append(f"{_numbers([pos.get(c, 0) for c in self.unreadable])} unreadable "
                         "(truncated or corrupt)")
        return (f"{self.location} is incomplete: {' and '.join(parts)} of {len(self.planned)} "
                f"chunks; run `dmx run SPEC --out {self.location} --resume` to compute them")

    def require_complete(self) -> "Health":
        if not self.complete:
            raise IncompleteRunError(self.message())
        return self


def _numbers(ns: list[int]) -> str:
    ns = sorted(ns)
    shown = ", ".join(str(n) for n in ns[:8]) + (f" (+{len(ns) - 8} more)" if len(ns) > 8 else "")
    return f"chunk{'s' if len(ns) > 1 else ''} {shown}"


class RunDir:
    """Reads and writes one run directory (a local folder or an object-store prefix)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.location = str(root)
        self.fs, self.base = filesystem(root)
        self.remote = is_remote(root)
        self._parts: dict[int, tuple[str, bool]] | None = None   # part_files(), until a write
        self.retry_chunks: set[int] = set()     # chunks whose part file holds transient errors
        self.stale_retry: list[str] = []        # retry files of chunks since computed again

    # ------------------------------------------------------------------ paths
    @property
    def uri(self) -> str:
        return uri(self.fs, self.base)

    @property
    def root(self) -> Path:
        """The local folder (object-store runs have none: use ``uri``)."""
        if self.remote:
            raise RunDirError(f"{self.uri} is in an object store, not a local folder")
        return Path(self.base)

    def path(self, rel: str) -> str:
        """The path of ``rel`` (posix, relative to the run) on ``self.fs``."""
        return f"{self.base}/{rel}"

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    @property
    def rows_dir(self) -> Path:
        return self.root / "rows"

    def part_path(self, chunk: int, retry: bool = False) -> str:
        """A chunk's part file; ``retry``: its rows hold transient errors (a read that may
        succeed later), so ``--resume`` computes the chunk again (the rows stay readable)."""
        return self.path(f"rows/chunk={chunk:05d}/{RETRY_PART if retry else 'part-0.parquet'}")

    def images_part_path(self, chunk: int) -> str:
        return self.path(f"_images/chunk={chunk:05d}.parquet")

    # ------------------------------------------------------------------ low-level I/O
    def _storage_error(self, e: OSError) -> StorageError:
        return StorageError(f"{self.uri}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")

    def _info(self, rel: str) -> pafs.FileInfo:
        try:
            return self.fs.get_file_info(self.path(rel))
        except OSError as e:
            raise self._storage_error(e) from None

    def is_file(self, rel: str) -> bool:
        return self._info(rel).type == pafs.FileType.File

    def read_bytes(self, rel: str) -> bytes:
        try:
            with self.fs.open_input_stream(self.path(rel)) as f:
                return f.read()
        except FileNotFoundError:
            raise
        except OSError as e:
            raise self._storage_error(e) from None

    def write_bytes(self, rel: str, data: bytes) -> None:
        """All of ``data`` under ``rel``, or nothing (temp + rename; one upload for an object)."""
        self._parts = None
        if self.remote:
            try:
                with self.fs.open_output_stream(self.path(rel)) as f:
                    f.write(data)
            except OSError as e:
                raise self._storage_error(e) from None
        else:
            _atomic_write_bytes(Path(self.path(rel)), data)

    def write_parquet(self, rel: str, table: pa.Table) -> None:
        self._parts = None
        if self.remote:
            self.write_bytes(rel, parquet_bytes(table))
        else:
            write_parquet_atomic(table, Path(self.path(rel)))

    def read_parquet(self, rel: str, schema: pa.Schema | None = None) -> pa.Table:
        return pq.read_table(self.path(rel), filesystem=self.fs, schema=schema)

    def _list(self, rel: str) -> list[pafs.FileInfo]:
        sel = pafs.FileSelector(self.path(rel), recursive=True, allow_not_found=True)
        try:
            return [i for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.File]
        except OSError as e:
            raise self._storage_error(e) from None

    def delete(self, paths: Iterable[str]) -> None:
        """Delete files dmx wrote (fs paths), and their chunk folders once empty."""
        self._parts = None
        for p in paths:
            try:
                self.fs.delete_file(p)
            except FileNotFoundError:
                pass
            if not self.remote:
                parent = Path(p).parent
                if parent.name.startswith("chunk=") and parent.is_dir() and not any(parent.iterdir()):
                    parent.rmdir()

    # ------------------------------------------------------------------ the manifest
    def exists(self) -> bool:
        return self.is_file(MANIFEST)

    def has_other_files(self) -> bool:
        """True when the location exists and holds anything (a folder or a prefix)."""
        if self.remote:
            return bool(self._list(""))
        return self.root.exists() and (not self.root.is_dir() or any(self.root.iterdir()))

    def read_manifest(self) -> dict[str, Any]:
        if not self.exists():
            raise RunDirError(f"{self.uri} is not a dmx run directory (no {MANIFEST})")
        data = self.read_bytes(MANIFEST)
        try:
            manifest = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise RunDirError(f"{self.uri}/{MANIFEST} is damaged: byte {e.start} is not UTF-8 "
                              "(the run's manifest must be rewritten by `dmx run --resume` "
                              "or the run redone)") from None
        except json.JSONDecodeError as e:
            raise RunDirError(f"{self.uri}/{MANIFEST} is not valid JSON: {e}") from None
        if not isinstance(manifest, dict):
            raise RunDirError(f"{self.uri}/{MANIFEST} is not a JSON object")
        return manifest

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        self.write_bytes(MANIFEST, json.dumps(manifest, indent=2, sort_keys=False,
                                              default=str).encode())

    # ------------------------------------------------------------------ the plan
    def upload(self, rel: str, local: str | os.PathLike) -> None:
        """Copy the local file ``local`` to ``rel``: a temp + rename locally, one streamed
        upload to an object store (the object appears when the upload completes)."""
        self._parts = None
        if not self.remote:
            dest = Path(self.path(rel))
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
            os.close(fd)
            try:
                shutil.copyfile(local, tmp)
                os.replace(tmp, dest)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            return
        try:
            with open(local, "rb") as src, self.fs.open_output_stream(self.path(rel)) as dst:
                shutil.copyfileobj(src, dst, 8 << 20)
        except OSError as e:
            raise self._storage_error(e) from None

    def fetch(self, rel: str, local: str | os.PathLike) -> Path:
        """Copy ``rel`` to the local file ``local`` (streamed); returns ``local``."""
        try:
            with self.fs.open_input_stream(self.path(rel)) as src, open(local, "wb") as dst:
                shutil.copyfileobj(src, dst, 8 << 20)
        except OSError as e:
            raise self._storage_error(e) from None
        return Path(local)

    def fetch_chunk_list(self, local: str | os.PathLike) -> Path | None:
        """The run's chunk list as a local file (None for runs of dmx before chunk ids)."""
        if not self.is_file(CHUNK_LIST):
            return None
        path = Path(self.path(CHUNK_LIST)) if not self.remote else self.fetch(CHUNK_LIST, local)
        try:
            pq.read_metadata(path)
        except (OSError, pa.ArrowInvalid) as e:
            raise RunDirError(f"{self.uri}/{CHUNK_LIST} is unreadable ({e}); "
                              "the run cannot be resumed safely: choose another --out") from None
        return path

    def read_chunk_list(self, columns: list[str] | None = None) -> pa.Table | None:
        """The image list and chunk of every image (None for runs of dmx before chunk ids)."""
        if not self.is_file(CHUNK_LIST):
            return None
        try:
            return pq.read_table(self.path(CHUNK_LIST), filesystem=self.fs, columns=columns)
        except (OSError, pa.ArrowInvalid) as e:
            raise RunDirError(f"{self.uri}/{CHUNK_LIST} is unreadable ({e}); "
                              "the run cannot be resumed safely: choose another --out") from None

    def planned_chunks(self) -> list[int] | None:
        """Chunk numbers in plan order (by first image id); runs of dmx before chunk lists:
        0 .. chunks-1; None when the run says nothing about its chunks (hand-made runs)."""
        t = self.read_chunk_list(["chunk"])
        if t is None:
            n = self.read_manifest().get("chunks")
            return list(range(int(n))) if isinstance(n, int) else None
        return pc.unique(t["chunk"]).to_pylist()   # in order of first appearance

    # ------------------------------------------------------------------ chunks
    def _intact(self, path: str, size: int | None) -> bool:
        """A Parquet file's footer is whole: ``<footer length><PAR1>`` at its end, in range.
        Truncation (a disk filled, a copy cut short) always breaks this."""
        try:
            if size is None:
                size = self.fs.get_file_info(path).size
            if size is None or size < 12:
                return False
            with self.fs.open_input_file(path) as f:
                tail = f.read_at(8, size - 8)
                head = f.read_at(4, 0)
        except OSError:
            return False
        return (head == b"PAR1" and tail[4:] == b"PAR1"
                and int.from_bytes(tail[:4], "little") + 12 <= size)

    def part_files(self) -> dict[int, tuple[str, bool]]:
        """Every per-chunk part file present: chunk -> (path, intact). Listed once per RunDir
        until it writes or deletes a file."""
        if self._parts is not None:
            return self._parts
        out, retry = {}, {}
        for info in self._list("rows"):
            parent, name = info.path.rsplit("/", 2)[-2:]
            m = _CHUNK_DIR.match(parent)
            if m and name == "part-0.parquet":
                out[int(m.group(1))] = (info.path, self._intact(info.path, info.size))
            elif m and name == RETRY_PART:
                retry[int(m.group(1))] = (info.path, self._intact(info.path, info.size))
        # a chunk computed again after transient errors: its new file wins, the old is stale
        self.retry_chunks = {c for c in retry if c not in out}
        self.stale_retry = [retry[c][0] for c in retry if c in out]
        out.update({c: retry[c] for c in self.retry_chunks})
        self._parts = out
        return out

    def compaction(self) -> dict[str, Any]:
        """Which chunks the compacted files hold: {generation, files (relative), chunks, rows}."""
        if not self.is_file(COMPACTION):
            return {"generation": 0, "files": [], "chunks": [], "rows": 0}
        try:
            return json.loads(self.read_bytes(COMPACTION).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RunDirError(f"{self.uri}/{COMPACTION} is damaged ({e}); "
                              "the compacted rows cannot be located") from None

    def write_compaction(self, state: dict[str, Any]) -> None:
        self.write_bytes(COMPACTION, json.dumps(state).encode())

    def compaction_intact(self, state: dict[str, Any] | None = None) -> bool:
        state = state or self.compaction()
        return all(self._intact(self.path(f), None) for f in state["files"])

    def done_chunks(self) -> set[int]:
        """Chunks whose rows are complete: an intact part file, or held by intact compacted
        files. A truncated file does not count, so ``--resume`` computes its chunks again."""
        done = {c for c, (_, ok) in self.part_files().items() if ok} - self.retry_chunks
        state = self.compaction()
        return done | (set(state["chunks"]) if self.compaction_intact(state) else set())

    def drop_damaged_compaction(self) -> bool:
        """Before a resume: when a compacted file is truncated or gone, forget the compaction
        (its chunks are computed again as part files) and delete its files. True if dropped."""
        state = self.compaction()
        if not state["files"] or self.compaction_intact(state):
            return False
        self.write_compaction({"generation": state["generation"], "files": [], "chunks": [],
                               "rows": 0})
        self.delete(self.path(f) for f in state["files"])
        return True

    def verify(self) -> Health:
        """Planned chunks vs chunks present and readable (verification on read)."""
        manifest = self.read_manifest()
        for name in ("cells.parquet",):
            if not self._intact(self.path(name), None):
                raise RunDirError(f"{self.uri}/{name} is missing or damaged (truncated or corrupt); "
                                  "the run cannot be read")
        parts = self.part_files()
        state = self.compaction()
        planned = self.planned_chunks()
        if planned is None:
            planned = sorted(set(parts) | set(state["chunks"]))
        compacted = set(state["chunks"])
        health = Health(self.uri, planned, status=str(manifest.get("status")))
        for f in state["files"]:
            if not self._intact(self.path(f), None):
                health.unreadable.update({c: f for c in compacted})
        for c in planned:
            if c in compacted:
                continue
            if c not in parts:
                health.missing.append(c)
            elif not parts[c][1]:
                health.unreadable[c] = parts[c][0]
        return health

    def files_key(self) -> list[list[Any]]:
        """[relative name, size, mtime in ns] of the row files, ``cells.parquet`` and
        ``images.parquet``: what results computed from the rows (the run's summary, stored mAP)
        are keyed by. The time sees a file rewritten in place at the same size."""
        base = self.path("")
        files = self.row_files() + [self.path("cells.parquet"), self.path("images.parquet")]
        return [[i.path[len(base):], *((i.size, i.mtime_ns) if i.type == pafs.FileType.File
                                       else (None, None))]
                for i in self.fs.get_file_info(files)]

    def row_files(self) -> list[str]:
        """The files holding the run's rows (paths on ``self.fs``): compacted files, then the
        intact part files of planned chunks they do not hold. Never a row twice."""
        state = self.compaction()
        compacted = set(state["chunks"])
        known = self.planned_chunks() if self.exists() else None
        planned = set(known) if known is not None else None
        files = [self.path(f) for f in state["files"] if self._intact(self.path(f), None)]
        for c, (p, ok) in sorted(self.part_files().items()):
            if ok and c not in compacted and (planned is None or c in planned):
                files.append(p)
        return files

    def write_chunk(self, chunk: int, rows: pa.Table, images: pa.Table, retry: bool = False) -> None:
        """Image properties first, rows last: a chunk counts as done once its rows exist (and
        hold no transient error: ``retry``). A chunk computed again after transient errors
        replaces its retry file: the new part file first, then the old one goes."""
        self.write_parquet(f"_images/chunk={chunk:05d}.parquet", images)
        rel = self.part_path(chunk, retry)[len(self.base) + 1:]
        self.write_parquet(rel, rows)
        if not retry:
            old = self.part_path(chunk, True)
            if self._info(old[len(self.base) + 1:]).type == pafs.FileType.File:
                self.delete([old])

    def merge_images(self, chunks: set[int] | None = None, scratch: str | os.PathLike | None = None) -> int:
        """Merge per-chunk image properties (of ``chunks``, default all) into ``images.parquet``,
        sorted by image id, in DuckDB (bounded memory, spilling to ``scratch``); returns the
        image count."""
        import duckdb
        files = []
        for info in self._list("_images"):
            m = re.match(r"^chunk=(\d+)\.parquet$", info.base_name)
            if m and (chunks is None or int(m.group(1)) in chunks):
                files.append(info.path)
        own = scratch is None
        work = Path(scratch or tempfile.mkdtemp(prefix="dmx-images-"))
        try:
            con = duckdb.connect()
            con.execute("SET memory_limit = '256MB'")
            con.execute("SET threads = 2")
            con.execute("SET temp_directory = ?", [str(work / "duckdb-spill")])
            if self.remote or not files:
                import pyarrow.dataset as pads
                con.register("src", pads.dataset(files, schema=IMAGE_SCHEMA, filesystem=self.fs,
                                                 format="parquet"))
            else:
                con.read_parquet(files).create_view("src")   # one schema: union_by_name held ~600 MB per 15k files
            target = work / "images.parquet"
            cols = ", ".join(f'"{n}"' for n in IMAGE_SCHEMA.names)
            quoted = str(target).replace("'", "''")
            con.execute(f"COPY (SELECT {cols} FROM src ORDER BY image_id) TO '{quoted}' "
                        "(FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE 131072)")
            con.close()
            n = pq.read_metadata(target).num_rows
            self.upload("images.parquet", target)
        finally:
            if own:
                shutil.rmtree(work, ignore_errors=True)
        return n
