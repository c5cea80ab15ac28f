"""Finding the images of a dataset: a folder (recursive), a glob, or a manifest of paths."""
from __future__ import annotations

import csv
import glob
import os
from dataclasses import dataclass
from pathlib import Path

from matrix import DatasetSpec, SpecError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".webp", ".tif", ".tiff"}
MANIFEST_SUFFIXES = {".txt", ".csv", ".lst"}


@dataclass(frozen=True)
class ImageRef:
    """One image of the dataset: a stable id (path relative to the dataset root) and its path."""

    image_id: str
    path: str
    size: int | None = None     # bytes, when known from the listing (the run records it)


def _is_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def list_images(ds: DatasetSpec) -> list[ImageRef]:
    """The dataset's images, sorted by id, cut to ``limit``. Raises SpecError if none exist."""
    from . import sources  # object stores and shard files (s3://, gs://, *.parquet, *.tar)
    if sources.handles(ds):
        return sources.list_images(ds)
    base = Path(ds.base_dir)
    target = ds.path if os.path.isabs(ds.path) else str(base / ds.path)
    if _is_glob(ds.path):
        root = Path(target.split("*")[0].split("?")[0].split("[")[0])
        root = root if root.is_dir() else root.parent
        paths = [Path(p) for p in glob.glob(target, recursive=True) if os.path.isfile(p)]
    elif os.path.isdir(target):
        root = Path(target)
        paths = [p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    elif os.path.isfile(target) and Path(target).suffix.lower() in MANIFEST_SUFFIXES:
        root = Path(target).parent
        paths = [Path(p) if os.path.isabs(p) else root / p for p in _read_manifest(Path(target))]
    elif os.path.isfile(target):
        raise SpecError("dataset.path", f"{ds.path} is a file but not a manifest "
                                        f"({', '.join(sorted(MANIFEST_SUFFIXES))})")
    else:
        raise SpecError("dataset.path", f"{ds.path} does not exist (resolved to {target}); "
                                        "give a folder, a glob or a .txt/.csv manifest")
    refs = sorted({ImageRef(_rel_id(p, root), str(p)) for p in paths}, key=lambda r: r.image_id)
    if not refs:
        raise SpecError("dataset.path", f"no images found under {ds.path} "
                                        f"(looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return refs[: ds.limit] if ds.limit else refs


def _rel_id(p: Path, root: Path) -> str:
    try:
        return p.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return p.resolve().as_posix()


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
