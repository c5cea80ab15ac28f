"""A run directory on disk: atomic part files, the manifest, resume bookkeeping.

Layout::

    DIR/manifest.json            spec, versions, machine, counters, status
    DIR/cells.parquet            one row per cell
    DIR/images.parquet           one row per image (written when the run ends)
    DIR/rows/chunk=NNNNN/part-0.parquet   one row per (cell, image), one file per chunk
    DIR/_images/chunk=NNNNN.parquet       per-chunk image properties, merged into images.parquet

Every file is written to a temporary name in the same directory and renamed into place, so a
killed run never leaves a half-written file, and a chunk either has its part file or does not.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .schema import IMAGE_SCHEMA

MANIFEST = "manifest.json"
_CHUNK_DIR = re.compile(r"^chunk=(\d+)$")


class RunDirError(RuntimeError):
    """The output directory cannot be used as asked (another spec's run, or not a run)."""


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
    """Write a Parquet file so that readers see all of it or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        # No min/max statistics on float columns: they leave NaN out, and DuckDB trusts them,
        # so NaN outputs would become invisible to `isnan(...)` filters.
        stats = [f.name for f in table.schema if not pa.types.is_floating(f.type)]
        pq.write_table(table, tmp, compression="zstd", write_statistics=stats)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RunDir:
    """Reads and writes one run directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    @property
    def rows_dir(self) -> Path:
        return self.root / "rows"

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def read_manifest(self) -> dict[str, Any]:
        if not self.exists():
            raise RunDirError(f"{self.root} is not a dmx run directory (no {MANIFEST})")
        try:
            return json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise RunDirError(f"{self.manifest_path} is not valid JSON: {e}") from None

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        _atomic_write_bytes(self.manifest_path,
                            json.dumps(manifest, indent=2, sort_keys=False, default=str).encode())

    def part_path(self, chunk: int) -> Path:
        return self.rows_dir / f"chunk={chunk:05d}" / "part-0.parquet"

    def images_part_path(self, chunk: int) -> Path:
        return self.root / "_images" / f"chunk={chunk:05d}.parquet"

    def done_chunks(self) -> set[int]:
        """Chunks whose row file is complete (present under its final name)."""
        done = set()
        if self.rows_dir.is_dir():
            for d in self.rows_dir.iterdir():
                m = _CHUNK_DIR.match(d.name)
                if m and (d / "part-0.parquet").is_file():
                    done.add(int(m.group(1)))
        return done

    def write_chunk(self, chunk: int, rows: pa.Table, images: pa.Table) -> None:
        """Image properties first, rows last: a chunk counts as done once its rows exist."""
        write_parquet_atomic(images, self.images_part_path(chunk))
        write_parquet_atomic(rows, self.part_path(chunk))

    def merge_images(self) -> int:
        """Merge per-chunk image properties into ``images.parquet``; returns the image count."""
        parts = sorted((self.root / "_images").glob("chunk=*.parquet"))
        tables = [pq.read_table(p, schema=IMAGE_SCHEMA) for p in parts]
        table = pa.concat_tables(tables) if tables else IMAGE_SCHEMA.empty_table()
        write_parquet_atomic(table, self.root / "images.parquet")
        return table.num_rows
