"""Where image bytes come from beyond a local folder: object stores and shard files.

- ``s3://bucket/prefix/**/*.jpg`` or ``gs://...`` (a glob, or a prefix: every image under it):
  listed on the driver (one listing, sizes included); each worker GETs the bytes of its own
  images from the store - bytes never travel through the driver.
- Parquet shards (``shards/*.parquet``, local or remote): one row per image, an id column
  (``image_id``, ``id``, ``key``, ``__key__``, ``path``, ``file_name``; else the row number) and
  a bytes column (a binary column, or Hugging Face's ``Image`` struct ``{bytes, path}``).
- WebDataset tar shards (``shards/*.tar``): members ``KEY.jpg`` (any image suffix) grouped by key.

A shard image's ``image_id`` is ``<shard path relative to the dataset root>/<key>``. Chunks are
cut from the id-sorted list, so a chunk's images sit in one or two shards; a worker reads a
Parquet shard row group by row group and a tar shard whole, keeping only the last one open.
"""
from __future__ import annotations

import bisect
import contextlib
import fnmatch
import itertools
import os
import random
import re
import tarfile
import threading
import time
from pathlib import Path, PurePosixPath
from typing import Generator, Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dmx.matrix import DatasetSpec, SpecError
from dmx.results.fs import StorageError, filesystem, is_remote, uri

from .imageref import IMAGE_SUFFIXES, ImageRef

SHARD_SUFFIXES = {".parquet", ".tar"}
_ID_COLUMNS = ("image_id", "id", "key", "__key__", "path", "file_name", "filename", "name")
_BYTES_COLUMNS = ("image", "img", "jpg", "jpeg", "png", "bytes", "content", "data")
_ROW = "#dmx-row="
_MEMBER = "#dmx-member="


def handles(ds: DatasetSpec) -> bool:
    """True when ``ds`` is an object-store location or a set of shard files."""
    return is_remote(ds.path) or _shard_suffix(ds.path) is not None


def _shard_suffix(text: str) -> str | None:
    suffix = PurePosixPath(text.split("?")[0]).suffix.lower()
    return suffix if suffix in SHARD_SUFFIXES else None


def _glob_regex(pattern: str) -> re.Pattern:
    """``**`` crosses folders, ``*`` and ``?`` do not (as in ``glob(recursive=True)``)."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            j = pattern.find("]", i)
            out, i = (out + re.escape(pattern[i]), i + 1) if j < 0 else (
                out + fnmatch.translate(pattern[i: j + 1])[4:-3], j + 1)
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


LIST_THREADS = 16      # sub-prefixes of an object-store location listed at once
_OBJECT_STORES = (pafs.S3FileSystem, pafs.GcsFileSystem)   # listed in key order, by prefix


def _select(fs: pafs.FileSystem, root: str) -> Iterator[pafs.FileInfo]:
    """Every file under ``root``, as it is listed. In an object store, in key order (so that
    ``dataset.limit`` can stop the listing): the first level is listed once, and its
    sub-prefixes are then listed recursively in ``LIST_THREADS`` threads (a listing is one
    request per 1,000 keys, so a large prefix is latency-bound), at most twice that many
    ahead of the consumer, so memory holds a few sub-prefixes' listings, not the whole. A
    local folder is listed by one recursive selector."""
    if not isinstance(fs, _OBJECT_STORES):
        yield from (i for i in fs.get_file_info(pafs.FileSelector(root, recursive=True,
                                                                  allow_not_found=True))
                    if i.type == pafs.FileType.File)
        return
    top = fs.get_file_info(pafs.FileSelector(root, recursive=False, allow_not_found=True))
    # "b.jpg" < "b/x.jpg" < "b0.jpg": a sub-prefix sorts as its name and a slash
    top = sorted((i for i in top if i.type in (pafs.FileType.File, pafs.FileType.Directory)),
                 key=lambda i: i.path + ("/" if i.type == pafs.FileType.Directory else ""))
    dirs = iter([i.path for i in top if i.type == pafs.FileType.Directory])
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    def listed(d: str) -> list[pafs.FileInfo]:
        return sorted((i for i in fs.get_file_info(pafs.FileSelector(d, recursive=True))
                       if i.type == pafs.FileType.File), key=lambda i: i.path)
    pool = ThreadPoolExecutor(LIST_THREADS, thread_name_prefix="dmx-list")
    try:
        ahead = deque(pool.submit(listed, d) for d in itertools.islice(dirs, 2 * LIST_THREADS))
        for entry in top:
            if entry.type == pafs.FileType.File:
                yield entry
                continue
            infos = ahead.popleft().result()
            ahead.extend(pool.submit(listed, d) for d in itertools.islice(dirs, 1))
            yield from infos
    finally:    # a consumer that stops early (``limit``) leaves the rest unlisted
        pool.shutdown(wait=True, cancel_futures=True)


def _files(ds: DatasetSpec, suffixes: set[str]
           ) -> tuple[pafs.FileSystem, str, Generator[pafs.FileInfo, None, None]]:
    """Files matching ``ds.path`` (a glob, a folder/prefix, or one file): (fs, root, infos),
    the infos listed as they are consumed (``_listing_errors`` names a failure)."""
    target = ds.path if (is_remote(ds.path) or os.path.isabs(ds.path)) else str(Path(ds.base_dir) / ds.path)
    with _listing_errors(ds):
        fs, path = filesystem(target)
        first_glob = min((path.find(c) for c in "*?[" if c in path), default=-1)
        if first_glob >= 0:
            root = path[:first_glob].rsplit("/", 1)[0]
            rx = _glob_regex(path)
            return fs, root, (i for i in _select(fs, root) if rx.match(i.path))
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            return fs, path.rsplit("/", 1)[0], (i for i in (info,))
        if info.type == pafs.FileType.Directory or is_remote(target):
            return fs, path, (i for i in _select(fs, path)
                              if PurePosixPath(i.path).suffix.lower() in suffixes)
    raise SpecError("dataset.path", f"{ds.path} does not exist (resolved to {target})")


@contextlib.contextmanager
def _listing_errors(ds: DatasetSpec) -> Iterator[None]:
    try:
        yield
    except (OSError, StorageError) as e:
        raise SpecError("dataset.path", f"cannot list {ds.path}: {str(e).splitlines()[0]}") from None


def _rel(path: str, root: str) -> str:
    return path[len(root):].lstrip("/") if path.startswith(root + "/") else path


def list_into(ds: DatasetSpec, sink) -> None:
    """Append the images of an object-store location or of shard files to ``sink`` (a
    ``dataset.ListingSink``); sorting, the duplicate check and ``limit`` follow in DuckDB (an
    object store's listing, in key order, stops at ``limit`` images)."""
    suffix = _shard_suffix(ds.path)
    if suffix is None:
        fs, root, infos = _files(ds, IMAGE_SUFFIXES)
        n = 0
        with _listing_errors(ds):
            for i in infos:
                if PurePosixPath(i.path).suffix.lower() in IMAGE_SUFFIXES:
                    sink.image(_rel(i.path, root), uri(fs, i.path), i.size)
                    n += 1
                    if ds.limit and n >= ds.limit and isinstance(fs, _OBJECT_STORES):
                        break   # keys come in order: the first ``limit`` are the ones kept
            infos.close()
        return
    fs, root, infos = _files(ds, {suffix})
    with _listing_errors(ds):
        shards = sorted(infos, key=lambda i: i.path)    # shard files: few
    for info in shards:
        shard = uri(fs, info.path)
        lister = _parquet_members if suffix == ".parquet" else _tar_members
        try:
            for key, loc, size in lister(fs, info.path):
                sink.image(f"{_rel(info.path, root)}/{key}", shard + loc, size, shard=shard)
        except (OSError, pa.ArrowInvalid, tarfile.TarError, ValueError) as e:
            raise SpecError("dataset.path", f"shard {shard} is unreadable: "
                                            f"{str(e).splitlines()[0]}") from None


# ------------------------------------------------------------------ Parquet shards
def _columns(schema: pa.Schema) -> tuple[str | None, str]:
    """(id column or None, bytes column) of an image shard."""
    def is_bytes(t: pa.DataType) -> bool:
        return (pa.types.is_binary(t) or pa.types.is_large_binary(t)
                or (pa.types.is_struct(t) and t.get_field_index("bytes") >= 0))
    names = {f.name.lower(): f.name for f in schema}
    data = next((names[n] for n in _BYTES_COLUMNS if n in names and is_bytes(schema.field(names[n]).type)),
                next((f.name for f in schema if is_bytes(f.type)), None))
    if data is None:
        raise ValueError("no binary column (image bytes) and no struct column with a 'bytes' field")
    def is_key(n: str) -> bool:
        t = schema.field(names[n]).type
        return names[n] != data and (pa.types.is_string(t) or pa.types.is_integer(t))
    ident = next((names[n] for n in _ID_COLUMNS if n in names and is_key(n)), None)
    return ident, data


def _parquet_members(fs: pafs.FileSystem, path: str):
    pf = pq.ParquetFile(path, filesystem=fs)
    ident, _ = _columns(pf.schema_arrow)
    keys = (pf.read(columns=[ident])[ident].to_pylist() if ident
            else [f"{i:08d}" for i in range(pf.metadata.num_rows)])
    width = len(str(max(len(keys) - 1, 0)))
    for row, key in enumerate(keys):
        key = str(key) if key is not None else f"{row:0{width}d}"
        yield key, f"{_ROW}{row}", None


class _ParquetShard:
    """One open Parquet shard: row groups read on demand, the last one kept."""

    def __init__(self, location: str) -> None:
        fs, path = filesystem(location)
        self.file = pq.ParquetFile(path, filesystem=fs)
        self.column = _columns(self.file.schema_arrow)[1]
        starts, n = [], 0
        for g in range(self.file.num_row_groups):
            starts.append(n)
            n += self.file.metadata.row_group(g).num_rows
        self.starts = starts
        self.group, self.values = -1, None
        self.lock = threading.Lock()

    def read(self, row: int) -> bytes:
        g = bisect.bisect_right(self.starts, row) - 1
        with self.lock:
            if g != self.group:
                col = self.file.read_row_group(g, columns=[self.column])[self.column]
                if pa.types.is_struct(col.type):
                    col = col.combine_chunks().field("bytes")
                self.group, self.values = g, col
            value = self.values[row - self.starts[g]].as_py()
        if value is None:
            raise OSError(f"row {row} of the shard holds no image bytes")
        return value


# ------------------------------------------------------------------ WebDataset tar shards
def _tar_members(fs: pafs.FileSystem, path: str):
    with fs.open_input_stream(path, buffer_size=8 << 20) as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for m in tar:
            p = PurePosixPath(m.name)
            if m.isfile() and p.suffix.lower() in IMAGE_SUFFIXES:
                key = str(p.parent / p.name.split(".", 1)[0]) if p.parent != PurePosixPath(".") \
                    else p.name.split(".", 1)[0]
                yield key, f"{_MEMBER}{m.name}", m.size


class _TarShard:
    """One tar shard, fetched once (streamed to a local file for a remote shard) and indexed:
    members are read by offset, so a worker holds none of it in memory."""

    def __init__(self, location: str) -> None:
        fs, path = filesystem(location)
        self.tmp: str | None = None
        if is_remote(location):
            import tempfile
            fd, self.tmp = tempfile.mkstemp(prefix="dmx-shard-", suffix=".tar")
            try:
                with os.fdopen(fd, "wb") as dst, fs.open_input_stream(path) as src:
                    while block := src.read(8 << 20):
                        dst.write(block)
            except BaseException:
                self.close()
                raise
            path = self.tmp
        self.path = path
        self.members: dict[str, tuple[int, int]] = {}
        with tarfile.open(path, mode="r:") as tar:
            for m in tar:
                if m.isfile():
                    self.members[m.name] = (m.offset_data, m.size)

    def read(self, name: str) -> bytes:
        if name not in self.members:
            raise FileNotFoundError(2, "no such member in the shard", name)
        offset, size = self.members[name]
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read(size)

    def close(self) -> None:
        if self.tmp:
            Path(self.tmp).unlink(missing_ok=True)


SHARDS_KEPT = 4   # shards a process keeps open (chunks never cross a shard: usually 1 in use)
_open_shards: "dict[str, _ParquetShard | _TarShard]" = {}


_shards_lock = threading.Lock()   # read-ahead threads share a process's open shards


def _shard(location: str):
    """The shard at ``location``, opened (fetched) once per process while it is among the
    ``SHARDS_KEPT`` used last."""
    with _shards_lock:
        shard = _open_shards.pop(location, None)
        if shard is None:
            shard = _ParquetShard(location) if location.endswith(".parquet") else _TarShard(location)
            while len(_open_shards) >= SHARDS_KEPT:
                _forget(next(iter(_open_shards)))
        _open_shards[location] = shard   # most recently used last
        return shard


def _forget(location: str) -> None:
    old = _open_shards.pop(location, None)
    if isinstance(old, _TarShard):
        old.close()


class TransientReadError(OSError):
    """A read from an object store that still failed after retries, for a reason that may go
    away (throttling, timeouts, dropped connections): its rows say so and ``--resume`` retries."""


READ_ATTEMPTS = 3           # dmx's own attempts around the SDK's (which retries each request)
_PERMANENT = ("NoSuchKey", "NoSuchBucket", "AccessDenied", "ACCESS_DENIED", "InvalidAccessKeyId",
              "SignatureDoesNotMatch", "404", "403")


def _is_transient(e: BaseException) -> bool:
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return False
    text = str(e)
    return not any(p in text for p in _PERMANENT)


def read_image(ref: ImageRef) -> bytes:
    """The encoded bytes of one image, from where it is. Failures are ``OSError``s."""
    return read_location(ref.path)


def read_location(path: str) -> bytes:
    """The bytes at an ``ImageRef.path`` (as recorded in ``images.parquet``): a local file, an
    object, a row of a Parquet shard or a member of a tar shard. Failures are ``OSError``s; a
    remote read is retried with backoff and what still fails for a passing reason raises
    ``TransientReadError``."""
    if "://" not in path:
        return _read_once(path)
    for attempt in range(READ_ATTEMPTS):
        try:
            return _read_once(path)
        except OSError as e:
            if not _is_transient(e):
                raise
            if attempt == READ_ATTEMPTS - 1:
                raise TransientReadError(f"{e} (after {READ_ATTEMPTS} attempts; "
                                         "dmx run --resume tries again)") from None
            with _shards_lock:   # a shard that failed to open or read is fetched again
                _forget(path.split(_ROW)[0].split(_MEMBER)[0])
            time.sleep(0.2 * 2 ** attempt * (0.5 + random.random()))
    raise AssertionError("unreachable")


def _read_once(path: str) -> bytes:
    try:
        if _ROW in path:
            shard, row = path.rsplit(_ROW, 1)
            return _shard(shard).read(int(row))
        if _MEMBER in path:
            shard, name = path.split(_MEMBER, 1)
            return _shard(shard).read(name)
        if "://" in path:
            fs, p = filesystem(path)
            with fs.open_input_stream(p) as f:
                return f.read()
        with open(path, "rb") as f:
            return f.read()
    except (pa.ArrowInvalid, tarfile.TarError, StorageError, ValueError) as e:
        raise OSError(f"{type(e).__name__}: {str(e).splitlines()[0]}") from None
