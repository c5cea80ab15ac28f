"""Finding the images of a dataset: a folder (recursive), a glob, or a manifest of paths."""
from __future__ import annotations

import csv
import errno
import glob
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from matrix import DatasetSpec, SpecError

from .imageref import IMAGE_SUFFIXES, MANIFEST_SUFFIXES, ImageRef


@dataclass(frozen=True)
class NotRead:
    """An entry under the dataset that no row will stand for, and why (recorded in the manifest)."""

    path: str
    reason: str


@dataclass(frozen=True)
class Listing:
    """What a dataset holds: the images to read (sorted by id, cut to ``limit``) and every other
    entry found, with the reason it is not read - so each file is accounted for."""

    images: list[ImageRef]
    not_read: list[NotRead] = field(default_factory=list)


def _is_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def scan_dataset(ds: DatasetSpec) -> Listing:
    """The dataset's images and the entries it holds that are not read (see ``Listing``)."""
    not_read: list[NotRead] = []
    images = list_images(ds, not_read)
    return Listing(images, sorted(not_read, key=lambda n: n.path))


def list_images(ds: DatasetSpec, not_read: list[NotRead] | None = None) -> list[ImageRef]:
    """The dataset's images, sorted by id, cut to ``limit``. Raises SpecError if none exist.

    Every entry found that is not read is appended to ``not_read`` with its reason. Symlinks
    are followed and images de-duplicated by real path: a file reached twice (a link to an
    image already in the dataset) is read once, under the id of the path as given - the real
    file's own path when it is in the dataset, else the first link in id order.
    """
    from . import sources  # object stores and shard files (s3://, gs://, *.parquet, *.tar)
    if sources.handles(ds):
        return sources.list_images(ds)
    not_read = [] if not_read is None else not_read
    base = Path(ds.base_dir)
    target = ds.path if os.path.isabs(ds.path) else str(base / ds.path)
    if _is_glob(ds.path):
        root = Path(target.split("*")[0].split("?")[0].split("[")[0])
        root = root if root.is_dir() else root.parent
        paths = []
        for p in sorted(glob.glob(target, recursive=True)):
            if os.path.isdir(p):
                continue
            reason = _unreadable(Path(p))
            if reason:
                not_read.append(NotRead(_rel_id(Path(p), root), reason))
            else:
                paths.append(Path(p))
    elif os.path.isdir(target):
        root = Path(target)
        paths = _walk(root, not_read)
    elif os.path.isfile(target) and Path(target).suffix.lower() in MANIFEST_SUFFIXES:
        root = Path(target).parent
        paths = [Path(p) if os.path.isabs(p) else root / p for p in _read_manifest(Path(target))]
    elif os.path.isfile(target):
        raise SpecError("dataset.path", f"{ds.path} is a file but not a manifest "
                                        f"({', '.join(sorted(MANIFEST_SUFFIXES))})")
    else:
        raise SpecError("dataset.path", f"{ds.path} does not exist (resolved to {target}); "
                                        "give a folder, a glob or a .txt/.csv manifest")
    refs = _dedupe([ImageRef(_rel_id(p, root), str(p)) for p in paths], not_read)
    if not refs:
        found = f"; {len(not_read)} entries not read, e.g. {not_read[0].path}: " \
                f"{not_read[0].reason}" if not_read else ""
        raise SpecError("dataset.path", f"no images found under {ds.path} "
                                        f"(looked for {', '.join(sorted(IMAGE_SUFFIXES))}){found}")
    return refs[: ds.limit] if ds.limit else refs


def _unreadable(p: Path) -> str | None:
    """Why a path found by a listing cannot be read as a file, or None when it can."""
    try:
        st = p.stat()  # follows links
    except OSError as e:
        if p.is_symlink():
            if e.errno == errno.ELOOP:
                return "symlink loop"
            return f"dangling symlink (to {os.readlink(p)})"
        return f"cannot stat: {e.strerror}"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    return None


def _walk(root: Path, not_read: list[NotRead]) -> list[Path]:
    """Image files under ``root``, following symlinked folders once each (no loops); every
    other entry goes to ``not_read`` with its reason. Real folders are walked before linked
    ones, so an image reached both ways keeps the id of its real path."""
    out: list[Path] = []
    seen_dirs = {os.path.realpath(root)}
    folders, linked = [root], []
    while folders or linked:
        folder = folders.pop() if folders else linked.pop(0)
        if folder is not root:
            real = os.path.realpath(folder)
            if real in seen_dirs:
                inside = (os.path.realpath(folder.parent) + os.sep).startswith(real + os.sep)
                not_read.append(NotRead(_rel_id(folder, root) + "/", "symlink loop" if inside
                                        else "folder reached twice (a symlink to a folder read)"))
                continue
            seen_dirs.add(real)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            not_read.append(NotRead(_rel_id(folder, root) + "/", f"cannot list folder: {e.strerror}"))
            continue
        for entry in entries:
            p = Path(entry.path)
            if _is_dir(entry):
                (linked if entry.is_symlink() else folders).append(p)
            elif reason := _unreadable(p):
                not_read.append(NotRead(_rel_id(p, root), reason))
            elif p.suffix.lower() not in IMAGE_SUFFIXES:
                not_read.append(NotRead(_rel_id(p, root), f"unsupported suffix {p.suffix or '(none)'}"))
            else:
                out.append(p)
    return out


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows a symlink to a folder
    except OSError:
        return False


def _dedupe(refs: list[ImageRef], not_read: list[NotRead]) -> list[ImageRef]:
    """One image per real file and per id; the others are recorded as duplicates."""
    by_real: dict[str, ImageRef] = {}
    # real files before links to them, then id order: the id kept is the path as given
    for r in sorted(refs, key=lambda r: (os.path.islink(r.path), r.image_id)):
        real = os.path.realpath(r.path)
        kept = by_real.get(real)
        if kept is None:
            kept = next((k for k in by_real.values() if k.image_id == r.image_id), None)
        if kept is not None:
            same = kept.image_id == r.image_id and kept.path == r.path
            not_read.append(NotRead(r.image_id, "listed twice" if same
                                    else f"duplicate of {kept.image_id}"))
            continue
        by_real[real] = r
    return sorted(by_real.values(), key=lambda r: r.image_id)


def _rel_id(p: Path, root: Path) -> str:
    """The path as given, relative to the dataset root (links are not resolved: the id is the
    name the user sees); outside the root, the absolute path."""
    rel = os.path.relpath(os.path.abspath(p), os.path.abspath(root))
    if rel == os.pardir or rel.startswith(os.pardir + os.sep):
        return Path(os.path.abspath(p)).as_posix()
    return Path(rel).as_posix()


def _read_manifest(path: Path) -> list[str]:
    """Paths from a text manifest (one per line) or a CSV (column ``path``, else the first)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".csv":
        rows = list(csv.reader(text.splitlines()))
        if not rows:
            return []
        header = [h.strip().lower() for h in rows[0]]
        col = header.index("path") if "path" in header else 0
        body = rows[1:] if "path" in header else rows
        return [r[col].strip() for r in body if r and r[col].strip()]
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
