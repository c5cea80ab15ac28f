"""A run's plan as files, built out of core by DuckDB: the image list and the chunk list.

The listing of a dataset streams into a Parquet file (``LISTING_SCHEMA``, one row per entry
found, unsorted); ``finish_listing`` de-duplicates it, sorts it by image id and applies
``limit``; ``plan_chunks`` cuts the sorted list into chunks (reusing the finished chunks of a
resumed run) and writes ``chunks.parquet``. Nothing here holds one Python object per image:
the driver keeps a ``ChunkIndex`` (a few numpy arrays, one entry per chunk) and reads each
chunk's images from the chunk list when it hands the chunk out (``ChunkReader``).

Chunks are consecutive slices of the id-sorted list, never crossing a shard (a tar or Parquet
file holding many images), and are named by their image ids (``chunk_id``): SHA-256 over the
ids joined by newlines, 60 bits - computed here by DuckDB's ``sha256`` with the same result.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

LISTING_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("path", pa.string()), ("size", pa.int64()),
    ("dev", pa.uint64()), ("ino", pa.uint64()),   # the file's identity (local files), for links
    ("is_link", pa.bool_()),                        # the name is (or is under) a symlink
    ("shard", pa.string()),                         # the tar/Parquet file holding it, if any
])
NOT_READ_SCHEMA = pa.schema([("path", pa.string()), ("reason", pa.string())])
CHUNK_ROW_GROUP = 16_384          # rows per row group of chunks.parquet
NOT_READ_SAMPLE = 20              # entries not read that the manifest and the CLI show


class PlanError(RuntimeError):
    """The dataset or the resumed run cannot be planned (the message says why)."""


class DuplicateIds(PlanError):
    """Two entries of a shard dataset have the same image id."""


def _connect(scratch: Path) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.execute("SET memory_limit = '256MB'")
    con.execute("SET threads = 2")
    con.execute("SET enable_progress_bar = false")
    con.execute("SET temp_directory = ?", [str(scratch / "duckdb-spill")])
    return con


def _q(path: Path | str) -> str:
    return "'" + str(path).replace("'", "''") + "'"


@dataclass(frozen=True)
class ListingResult:
    images: Path                 # image_id, path, size, shard; sorted by image_id; cut to limit
    not_read: Path               # path, reason; sorted by path
    n_images: int
    total_bytes: int
    not_read_count: int
    not_read_sample: list[tuple[str, str]]


def finish_listing(listing: Path, not_read: Path, out: Path, limit: int | None,
                   unique_ids: bool = False) -> ListingResult:
    """De-duplicate, sort and cut the raw listing into ``out``.

    One image per id (a path listed twice is read once), and one per file: a name that is a
    symlink (or lies under a symlinked folder) to a file the dataset also holds under its own
    name is a duplicate of that name; several links to a file outside keep the first in id
    order. Hard links are distinct names and all kept. ``unique_ids``: two entries with the
    same id are an error (shards: two rows with the same key) instead of a duplicate."""
    out = Path(out)
    con = _connect(out.parent)
    try:
        con.execute(f"CREATE TEMP VIEW raw AS SELECT * FROM read_parquet({_q(listing)})")
        if unique_ids:
            dup = con.execute("SELECT image_id FROM raw GROUP BY image_id HAVING count(*) > 1 "
                              "ORDER BY image_id LIMIT 1").fetchone()
            if dup:
                raise DuplicateIds(f"image id {dup[0]!r} occurs twice")
        con.execute("""
            CREATE TEMP TABLE ranked AS
            WITH by_id AS (
                SELECT *, row_number() OVER (PARTITION BY image_id ORDER BY is_link, path) AS id_rank,
                       first(path) OVER (PARTITION BY image_id ORDER BY is_link, path) AS id_path
                FROM raw)
            SELECT *,
                   CASE WHEN dev IS NULL THEN 1 ELSE row_number() OVER (
                       PARTITION BY dev, ino, id_rank = 1 ORDER BY is_link, image_id) END AS file_rank,
                   CASE WHEN dev IS NULL THEN image_id ELSE first(image_id) OVER (
                       PARTITION BY dev, ino, id_rank = 1 ORDER BY is_link, image_id) END AS file_id
            FROM by_id""")
        keep = "id_rank = 1 AND (NOT is_link OR file_rank = 1)"
        lim = f"LIMIT {int(limit)}" if limit else ""
        con.execute(f"COPY (SELECT image_id, path, size, shard FROM ranked WHERE {keep} "
                    f"ORDER BY image_id {lim}) TO {_q(out)} (FORMAT parquet, ROW_GROUP_SIZE 65536)")
        not_read_out = out.with_name(out.stem + "-not-read.parquet")
        con.execute(f"""
            COPY (SELECT path, reason FROM (
                SELECT path, reason FROM read_parquet({_q(not_read)})
                UNION ALL
                SELECT image_id, CASE WHEN path = id_path THEN 'listed twice'
                                      ELSE 'duplicate of ' || image_id END
                FROM ranked WHERE id_rank > 1
                UNION ALL
                SELECT image_id, 'duplicate of ' || file_id FROM ranked
                WHERE id_rank = 1 AND is_link AND file_rank > 1)
              ORDER BY path) TO {_q(not_read_out)} (FORMAT parquet)""")
        n, total = con.execute(f"SELECT count(*), coalesce(sum(size), 0) FROM read_parquet({_q(out)})"
                               ).fetchone()
        n_nr = con.execute(f"SELECT count(*) FROM read_parquet({_q(not_read_out)})").fetchone()[0]
        sample = con.execute(f"SELECT path, reason FROM read_parquet({_q(not_read_out)}) LIMIT "
                             f"{NOT_READ_SAMPLE}").fetchall()
    finally:
        con.close()
    return ListingResult(out, not_read_out, int(n), int(total), int(n_nr),
                         [(p, r) for p, r in sample])


def first_images(images: Path, n: int) -> pa.Table:
    """The first ``n`` rows of a sorted image list (calibration reads a few images)."""
    f = pq.ParquetFile(images)
    batches = []
    for b in f.iter_batches(batch_size=max(1, min(n, 65536))):
        batches.append(b)
        if sum(x.num_rows for x in batches) >= n:
            break
    return pa.Table.from_batches(batches, schema=f.schema_arrow).slice(0, n)


@dataclass(frozen=True)
class ChunkIndex:
    """Every chunk of a run in plan order: its id, where its rows start in the chunk list,
    how many images it holds, and whether it was finished before (a resume keeps it)."""

    ids: np.ndarray       # int64
    start: np.ndarray     # int64, row of chunks.parquet where the chunk begins
    count: np.ndarray     # int64
    kept: np.ndarray      # bool
    digest: str           # SHA-256 over the chunks' (image id, size) lists, in plan order
    note: str | None = None

    def __len__(self) -> int:
        return len(self.ids)


def plan_chunks(images: Path, size: int, out: Path, previous: Path | None = None,
                done: set[int] | frozenset = frozenset(), where: str = "",
                labels: Path | None = None) -> ChunkIndex:
    """Write the chunk list ``out`` (image_id, size_bytes, chunk, path; rows in plan order) for
    the sorted image list ``images``: the finished chunks of ``previous`` (an earlier chunk
    list of this run) whose images are all still there unchanged, plus new chunks of ``size``
    images for every image they do not cover. Raises PlanError when an image whose rows are
    written is gone or changed size. ``labels`` (image_id, label_index): each image's
    ground-truth class, carried in the chunk list's ``label`` column to the workers."""
    out = Path(out)
    con = _connect(out.parent)
    try:
        if labels is not None:
            con.execute(f"CREATE TEMP VIEW cur AS SELECT i.*, l.label_index AS label FROM "
                        f"read_parquet({_q(images)}) i LEFT JOIN read_parquet({_q(labels)}) l "
                        "USING (image_id)")
        else:
            con.execute(f"CREATE TEMP VIEW cur AS SELECT *, NULL::INTEGER AS label "
                        f"FROM read_parquet({_q(images)})")
        note = None
        if previous is not None and done:
            con.execute(f"CREATE TEMP TABLE prev AS SELECT image_id, size_bytes, chunk "
                        f"FROM read_parquet({_q(previous)})")
            con.execute("CREATE TEMP TABLE done (chunk BIGINT)")
            con.executemany("INSERT INTO done VALUES (?)", [(int(c),) for c in done])
            con.execute("CREATE TEMP TABLE kept AS SELECT p.* FROM prev p SEMI JOIN done d "
                        "ON p.chunk = d.chunk")
            gone = con.execute("SELECT count(*), min(image_id) FROM kept k ANTI JOIN cur c "
                               "ON k.image_id = c.image_id").fetchone()
            if gone[0]:
                raise PlanError(
                    f"the dataset changed since {where} began: {gone[0]} image(s) whose rows are "
                    f"already written are gone ({gone[1]}{', ...' if gone[0] > 1 else ''}); "
                    "restore them, or choose another --out for a new run")
            changed = con.execute(
                "SELECT count(*), min(k.image_id) FROM kept k JOIN cur c ON k.image_id = c.image_id "
                "WHERE k.size_bytes IS NOT NULL AND c.size IS NOT NULL AND k.size_bytes <> c.size"
            ).fetchone()
            if changed[0]:
                raise PlanError(
                    f"the dataset changed since {where} began: {changed[0]} image(s) whose rows are "
                    f"already written changed size ({changed[1]}); choose another --out for a new run")
            added, removed = con.execute(
                "SELECT (SELECT count(*) FROM cur c ANTI JOIN prev p ON c.image_id = p.image_id), "
                "(SELECT count(*) FROM prev p ANTI JOIN cur c ON c.image_id = p.image_id)").fetchone()
            if added or removed:
                note = (f"the dataset changed since the run began ({added} image(s) added, "
                        f"{removed} removed, none of them with rows written): computing only the "
                        "missing (cell, image) pairs")
        else:
            if done and previous is None:
                raise PlanError(f"{where} was written by a dmx that numbered chunks by position; "
                                "it cannot be resumed safely: choose another --out")
            con.execute("CREATE TEMP TABLE kept (image_id VARCHAR, size_bytes BIGINT, chunk BIGINT)")
        # New chunks: consecutive slices of the images no kept chunk covers, within a shard.
        con.execute(f"""
            CREATE TEMP TABLE fresh AS
            SELECT c.image_id, c.size, c.path, c.shard, c.label,
                   (row_number() OVER (PARTITION BY c.shard ORDER BY c.image_id) - 1) // {int(size)} AS seq
            FROM cur c ANTI JOIN kept k ON c.image_id = k.image_id""")
        con.execute("""
            CREATE TEMP TABLE fresh_ids AS
            SELECT shard, seq,
                   (('0x' || left(sha256(string_agg(image_id, chr(10) ORDER BY image_id)), 16))::UBIGINT
                    >> 4)::BIGINT AS chunk
            FROM fresh GROUP BY shard, seq""")
        clash = con.execute("""
            SELECT count(*) FROM (SELECT chunk FROM fresh_ids GROUP BY chunk HAVING count(*) > 1)
            UNION ALL SELECT count(*) FROM fresh_ids f SEMI JOIN kept k ON f.chunk = k.chunk
            """).fetchall()
        if any(n for (n,) in clash):
            raise PlanError(f"two chunks of {where or 'the dataset'} got the same id; "
                            "change --chunk-size")
        con.execute("""
            CREATE TEMP TABLE assigned AS
            SELECT f.image_id, f.size AS size_bytes, i.chunk, f.path, f.label, false AS kept
            FROM fresh f JOIN fresh_ids i ON f.shard IS NOT DISTINCT FROM i.shard AND f.seq = i.seq
            UNION ALL
            SELECT k.image_id, c.size, k.chunk, c.path, c.label, true
            FROM kept k JOIN cur c USING (image_id)""")
        index = con.execute("""
            SELECT chunk, count(*) AS n, bool_or(kept) AS kept,
                   sha256(string_agg(image_id || chr(0) || coalesce(size_bytes, -1)::VARCHAR, chr(10)
                                     ORDER BY image_id)) AS h
            FROM assigned GROUP BY chunk ORDER BY min(image_id)""").fetchnumpy()
        con.execute("""
            CREATE TEMP TABLE positions AS
            SELECT chunk, row_number() OVER (ORDER BY min(image_id)) AS position
            FROM assigned GROUP BY chunk""")
        con.execute(f"""
            COPY (SELECT a.image_id, a.size_bytes, a.chunk, a.path, a.label FROM assigned a
                  JOIN positions p USING (chunk) ORDER BY p.position, a.image_id)
            TO {_q(out)} (FORMAT parquet, ROW_GROUP_SIZE {CHUNK_ROW_GROUP})""")
    finally:
        con.close()
    counts = np.asarray(index["n"], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    digest = hashlib.sha256("\n".join(index["h"]).encode()).hexdigest()
    return ChunkIndex(np.asarray(index["chunk"], dtype=np.int64), starts, counts,
                      np.asarray(index["kept"], dtype=bool), digest, note)


class ChunkReader:
    """Reads the rows of one chunk at a time from a local chunk list, in plan order: one row
    group is decoded at a time (the last one is kept)."""

    def __init__(self, path: Path) -> None:
        self.file = pq.ParquetFile(path)
        meta = self.file.metadata
        sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        self.group_start = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._cache: dict[int, pa.Table] = {}

    def _group(self, g: int) -> pa.Table:
        if g not in self._cache:
            if len(self._cache) > 2:
                self._cache.pop(next(iter(self._cache)))
            self._cache[g] = self.file.read_row_group(g, columns=["image_id", "size_bytes", "path",
                                                                  "label"])
        return self._cache[g]

    def rows(self, start: int, count: int) -> list[tuple[str, int | None, str, int | None]]:
        """(image_id, size_bytes, path, label) of rows ``start .. start+count-1``."""
        out: list[tuple[str, int | None, str, int | None]] = []
        pos, end = int(start), int(start) + int(count)
        while pos < end:
            g = int(np.searchsorted(self.group_start, pos, side="right") - 1)
            t = self._group(g)
            lo = pos - int(self.group_start[g])
            hi = min(t.num_rows, end - int(self.group_start[g]))
            part = t.slice(lo, hi - lo)
            out += zip(part["image_id"].to_pylist(), part["size_bytes"].to_pylist(),
                       part["path"].to_pylist(), part["label"].to_pylist())
            pos += hi - lo
        return out


def scratch_dir(prefix: str = "dmx-plan-") -> Path:
    """A private scratch folder for the plan's working files (removed by the caller)."""
    base = os.environ.get("DMX_SCRATCH") or None
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))
