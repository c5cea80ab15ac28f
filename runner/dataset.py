"""Finding the images of a dataset: a folder (recursive), a glob, or a manifest of paths.

A listing streams: every entry found is appended to a ``ListingSink``, which writes the images
and the entries not read to Parquet files in batches, so a dataset of millions of files is
never held in memory as Python objects. Sorting, de-duplication and ``limit`` happen afterwards
in DuckDB (``dmx.results.planning``), out of core.
"""
from __future__ import annotations

import csv
import errno
import glob
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from dmx.matrix import DatasetSpec, SpecError
from dmx.results.planning import (LISTING_SCHEMA, NOT_READ_SCHEMA, DuplicateIds, ListingResult,
                              finish_listing)

from .imageref import IMAGE_SUFFIXES, MANIFEST_SUFFIXES, ImageRef

BATCH_ROWS = 65_536   # entries buffered before a batch is written


@dataclass(frozen=True)
class NotRead:
    """An entry under the dataset that no row will stand for, and why (recorded in the run)."""

    path: str
    reason: str


@dataclass(frozen=True)
class Listing:
    """What a small dataset holds, in memory (tests and tools; runs use the streamed files):
    the images (sorted by id, cut to ``limit``) and every other entry with its reason."""

    images: list[ImageRef]
    not_read: list[NotRead] = field(default_factory=list)


class _Writer:
    """Rows appended one at a time, written as Arrow record batches of ``BATCH_ROWS``."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.path, self.schema = path, schema
        self.buffer: list[tuple] = []
        self.writer = pq.ParquetWriter(path, schema, compression="lz4")
        self.rows = 0

    def add(self, *values) -> None:
        self.buffer.append(values)
        if len(self.buffer) >= BATCH_ROWS:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            columns = zip(*self.buffer)
            self.writer.write_batch(pa.record_batch(
                [pa.array(c, f.type) for c, f in zip(columns, self.schema)], schema=self.schema))
            self.rows += len(self.buffer)
            self.buffer = []

    def close(self) -> None:
        self.flush()
        self.writer.close()


class ListingSink:
    """Where a listing puts what it finds: ``images.parquet`` (``LISTING_SCHEMA``) and
    ``not_read.parquet`` (``NOT_READ_SCHEMA``) in ``folder`` (scratch space of the driver)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.images = _Writer(self.folder / "listing.parquet", LISTING_SCHEMA)
        self.skipped = _Writer(self.folder / "not_read.parquet", NOT_READ_SCHEMA)

    def image(self, image_id: str, path: str, size: int | None, dev: int | None = None,
              ino: int | None = None, is_link: bool = False, shard: str | None = None) -> None:
        self.images.add(image_id, path, size, dev, ino, is_link, shard)  # LISTING_SCHEMA order

    def not_read(self, path: str, reason: str) -> None:
        self.skipped.add(path, reason)

    def close(self) -> tuple[Path, Path]:
        self.images.close()
        self.skipped.close()
        return self.images.path, self.skipped.path



def _is_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def collect(ds: DatasetSpec, scratch: Path) -> ListingResult:
    """List the dataset into ``scratch``: the sorted, de-duplicated images cut to ``limit``
    and the entries not read, as Parquet files (see ``dmx.results.planning.finish_listing``).
    Raises SpecError if there are no images."""
    from . import sources
    sink = ListingSink(scratch)
    try:
        list_into(ds, sink)
    finally:
        files = sink.close()
    try:
        listing = finish_listing(*files, Path(scratch) / "images.parquet", ds.limit,
                                 unique_ids=sources.handles(ds))
    except DuplicateIds as e:
        raise SpecError("dataset.path", f"{e} in {ds.path} (two rows of a shard with the same "
                                        "key)") from None
    if not listing.n_images:
        sample = listing.not_read_sample
        found = (f"; {listing.not_read_count} entries not read, e.g. {sample[0][0]}: {sample[0][1]}"
                 if sample else "")
        raise SpecError("dataset.path", f"no images found under {ds.path} "
                                        f"(looked for {', '.join(sorted(IMAGE_SUFFIXES))}){found}")
    return listing


def scan_dataset(ds: DatasetSpec) -> Listing:
    """The dataset's images and the entries it holds that are not read, in memory (small
    datasets; see ``Listing``). Raises SpecError if there are no images."""
    import shutil

    from dmx.results.planning import scratch_dir
    tmp = scratch_dir("dmx-listing-")
    try:
        listing = collect(ds, tmp)
        images = pq.read_table(listing.images).to_pylist()
        not_read = pq.read_table(listing.not_read).to_pylist()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Listing([ImageRef(r["image_id"], r["path"], r["size"]) for r in images],
                   [NotRead(r["path"], r["reason"]) for r in not_read])


def list_images(ds: DatasetSpec) -> list[ImageRef]:
    """The dataset's images, sorted by id, cut to ``limit`` (small datasets)."""
    return scan_dataset(ds).images


def check_dataset(ds: DatasetSpec) -> None:
    """Raise the SpecError that listing a local dataset would raise first - a path that does not
    exist, a file that is no manifest - without listing it (a run lists while Ray starts)."""
    from . import sources
    if not sources.handles(ds):
        _local_target(ds)


def _local_target(ds: DatasetSpec) -> str:
    target = ds.path if os.path.isabs(ds.path) else str(Path(ds.base_dir) / ds.path)
    if _is_glob(ds.path) or os.path.isdir(target):
        return target
    if os.path.isfile(target) and Path(target).suffix.lower() in MANIFEST_SUFFIXES:
        return target
    if os.path.isfile(target):
        raise SpecError("dataset.path", f"{ds.path} is a file but not a manifest "
                                        f"({', '.join(sorted(MANIFEST_SUFFIXES))})")
    raise SpecError("dataset.path", f"{ds.path} does not exist (resolved to {target}); "
                                    "give a folder, a glob or a .txt/.csv manifest")


def list_into(ds: DatasetSpec, sink: ListingSink) -> None:
    """Append every entry of the dataset to ``sink``: images with their size and identity
    (device, inode, whether the name is a symlink) for de-duplication, and every other entry
    with the reason it is not read. Object stores and shard files go to ``sources``."""
    from . import sources  # object stores and shard files (s3://, gs://, *.parquet, *.tar)
    if sources.handles(ds):
        sources.list_into(ds, sink)
        return
    target = _local_target(ds)
    if _is_glob(ds.path):
        root = Path(target.split("*")[0].split("?")[0].split("[")[0])
        root = root if root.is_dir() else root.parent
        root = os.path.abspath(root)
        for p in glob.iglob(target, recursive=True):
            if not os.path.isdir(p):
                _add_path(sink, p, root)
    elif os.path.isdir(target):
        _walk(Path(target), sink)
    else:   # a manifest (``_local_target`` raised for anything else)
        root = os.path.dirname(os.path.abspath(target))
        for p in _read_manifest(Path(target)):
            _add_path(sink, p if os.path.isabs(p) else os.path.join(root, p), root)


def _add_path(sink: ListingSink, p: str, root: str) -> None:
    """A path named by a glob or a manifest (``root``: the dataset root, absolute): an image if
    it can be read as a file."""
    image_id = _fast_id(p, root)
    if image_id is None:
        p = str(Path(p))   # "./a.jpg" and "a.jpg" are one path (a repeat, not a duplicate)
        image_id = _rel_id(Path(p), Path(root))
    try:
        lst = os.lstat(p)
        link = stat.S_ISLNK(lst.st_mode)
        st = os.stat(p) if link else lst
    except OSError as e:
        sink.not_read(image_id, _stat_failure(Path(p), e))
        return
    if not stat.S_ISREG(st.st_mode):
        sink.not_read(image_id, "not a regular file")
        return
    sink.image(image_id, p, st.st_size, st.st_dev, st.st_ino, link)


def _fast_id(p: str, root: str) -> str | None:
    """``_rel_id`` for the common case of a plain path under ``root`` (no ``.``/``..``
    components, no doubled slashes) without the cost of ``relpath``; None otherwise."""
    if p.startswith(root) and p[len(root): len(root) + 1] == "/":
        rel = p[len(root) + 1:]
        if rel and "//" not in rel and "/." not in "/" + rel and not rel.endswith("/"):
            return rel
    return None


def _stat_failure(p: Path, e: OSError) -> str:
    if os.path.islink(p):
        if e.errno == errno.ELOOP:
            return "symlink loop"
        return f"dangling symlink (to {os.readlink(p)})"
    return f"cannot stat: {e.strerror}"


def _walk(root: Path, sink: ListingSink) -> None:
    """Image files under ``root``, following symlinked folders once each (no loops); every
    other entry goes to ``not_read`` with its reason. Real folders are walked before linked
    ones; which name of a file reached twice is kept is decided later (the real one)."""
    seen_dirs = {os.path.realpath(root)}
    folders, linked = [(root, False)], []   # (folder, reached through a symlinked folder)
    while folders or linked:
        folder, via_link = folders.pop() if folders else linked.pop(0)
        if folder is not root:
            real = os.path.realpath(folder)
            if real in seen_dirs:
                inside = (os.path.realpath(folder.parent) + os.sep).startswith(real + os.sep)
                sink.not_read(_rel_id(folder, root) + "/", "symlink loop" if inside
                              else "folder reached twice (a symlink to a folder read)")
                continue
            seen_dirs.add(real)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            sink.not_read(_rel_id(folder, root) + "/", f"cannot list folder: {e.strerror}")
            continue
        rel = _rel_id(folder, root)
        prefix = "" if rel == "." else rel + "/"
        for entry in entries:
            if _is_dir(entry):
                (linked if entry.is_symlink() else folders).append(
                    (Path(entry.path), via_link or entry.is_symlink()))
                continue
            image_id = prefix + entry.name
            link = via_link or entry.is_symlink()
            try:
                st = entry.stat()  # follows links
            except OSError as e:
                sink.not_read(image_id, _stat_failure(Path(entry.path), e))
                continue
            suffix = os.path.splitext(entry.name)[1]
            if not stat.S_ISREG(st.st_mode):
                sink.not_read(image_id, "not a regular file")
            elif suffix.lower() not in IMAGE_SUFFIXES:
                sink.not_read(image_id, f"unsupported suffix {suffix or '(none)'}")
            else:
                sink.image(image_id, entry.path, st.st_size, st.st_dev, st.st_ino, link)


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows a symlink to a folder
    except OSError:
        return False


def _rel_id(p: Path, root: Path) -> str:
    """The path as given, relative to the dataset root (links are not resolved: the id is the
    name the user sees); outside the root, the absolute path."""
    rel = os.path.relpath(os.path.abspath(p), os.path.abspath(root))
    if rel == os.pardir or rel.startswith(os.pardir + os.sep):
        return Path(os.path.abspath(p)).as_posix()
    return Path(rel).as_posix()


def _read_manifest(path: Path) -> Iterator[str]:
    """Paths from a text manifest (one per line) or a CSV (column ``path``, else the first),
    read line by line."""
    with open(path, encoding="utf-8", newline="" if path.suffix.lower() == ".csv" else None) as f:
        if path.suffix.lower() == ".csv":
            rows = csv.reader(f)
            first = next(rows, None)
            if first is None:
                return
            header = [h.strip().lower() for h in first]
            col = header.index("path") if "path" in header else 0
            if "path" not in header and first and first[col].strip():
                yield first[col].strip()
            for r in rows:
                if len(r) > col and r[col].strip():
                    yield r[col].strip()
            return
        for ln in f:
            ln = ln.strip()
            if ln and not ln.startswith("#"):
                yield ln
