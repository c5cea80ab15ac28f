"""The run directory as storage: resume by image ids, compaction, damaged runs verified on read."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dmx.matrix import parse_spec
from dmx.results import RunDirError
from dmx.runner.sweep import RunOptions, run_spec

AXES = {"decoder": ["pil", "opencv"], "backend": ["torch"]}
CELLS = 2


def spec_for(images: Path, name: str = "storage"):
    return parse_spec({"name": name, "dataset": {"path": str(images)}, "model": "tiny", "axes": AXES})


def _opts(out: Path, **kw) -> RunOptions:
    kw.setdefault("compact", False)
    try:
        return RunOptions(out=str(out), executor="local", progress=False, **kw)
    except TypeError:  # dmx before compaction: every run is a set of part files
        kw.pop("compact")
        return RunOptions(out=str(out), executor="local", progress=False, **kw)


def all_rows(run: Path) -> list[tuple[str, str]]:
    """(cell, image) of every row in every Parquet file under rows/ (what a reader would see)."""
    files = sorted(str(p) for p in (run / "rows").rglob("*.parquet"))
    return duckdb.connect().execute(
        f"SELECT cell_id, image_id FROM read_parquet({files!r}, hive_partitioning=false)").fetchall()


def part_files_holding(run: Path, image_ids: set[str]) -> list[Path]:
    return [p for p in (run / "rows").glob("chunk=*/part-0.parquet")
            if image_ids & set(pq.read_table(p, columns=["image_id"])["image_id"].to_pylist())]


@pytest.fixture
def images(photo_dir: Path, tmp_path: Path) -> Path:
    """Eight real JPEGs named img0..img7 (copies of the photo fixtures)."""
    d = tmp_path / "images"
    d.mkdir()
    good = sorted(photo_dir.glob("*.jpg"))
    for i in range(8):
        shutil.copy(good[i % len(good)], d / f"img{i}.jpg")
    return d


def interrupted_run(images: Path, out: Path, lose: set[str]) -> None:
    """A run whose chunks holding the images ``lose`` were never written (as after kill -9)."""
    run_spec(spec_for(images), _opts(out, chunk_size=2))
    for p in part_files_holding(out, lose):
        shutil.rmtree(p.parent)


# ------------------------------------------------------------------ resume by image ids

def test_resume_after_images_were_added_and_removed_computes_exactly_the_missing_pairs(
        images: Path, tmp_path: Path):
    out = tmp_path / "run"
    interrupted_run(images, out, lose={"img2.jpg", "img7.jpg"})   # chunks 2 and 4 of 4
    shutil.copy(images / "img0.jpg", images / "img00.jpg")       # sorts among the first chunk's
    shutil.copy(images / "img0.jpg", images / "img9.jpg")        # sorts last
    (images / "img6.jpg").unlink()                               # its chunk was never written
    run_spec(spec_for(images), _opts(out, resume=True))
    rows = all_rows(out)
    expected = {f"img{i}.jpg" for i in (0, 1, 2, 3, 4, 5, 7, 9)} | {"img00.jpg"}
    assert len(rows) == len(set(rows)), "a (cell, image) pair was written twice"
    assert {i for _, i in rows} == expected
    assert len(rows) == CELLS * len(expected)


def test_resume_refuses_when_an_image_with_written_rows_is_gone(images: Path, tmp_path: Path):
    out = tmp_path / "run"
    interrupted_run(images, out, lose={"img7.jpg"})
    (images / "img0.jpg").unlink()                               # its rows are written
    with pytest.raises(RunDirError, match="img0.jpg"):
        run_spec(spec_for(images), _opts(out, resume=True))


def test_resume_refuses_when_an_image_with_written_rows_changed(images: Path, tmp_path: Path):
    out = tmp_path / "run"
    interrupted_run(images, out, lose={"img7.jpg"})
    (images / "img1.jpg").write_bytes((images / "img1.jpg").read_bytes() + b"\0" * 10)
    with pytest.raises(RunDirError, match="img1.jpg"):
        run_spec(spec_for(images), _opts(out, resume=True))


def test_manifest_records_the_image_list_with_sizes_and_a_digest(images: Path, tmp_path: Path):
    out = tmp_path / "run"
    run_spec(spec_for(images), _opts(out, chunk_size=3))
    m = json.loads((out / "manifest.json").read_text())
    assert m["dataset"]["images"] == 8 and len(m["dataset"]["digest"]) == 64
    listed = pq.read_table(out / "chunks.parquet").to_pylist()
    assert {r["image_id"]: r["size_bytes"] for r in listed} == {
        p.name: p.stat().st_size for p in images.iterdir()}
    assert len({r["chunk"] for r in listed}) == 3
    # the sampled determinism check follows plan order (first chunk), not the hashed chunk ids
    assert m["counters"].get("determinism_checks", 0) >= 1


def test_chunk_names_follow_image_ids_not_positions(images: Path, tmp_path: Path):
    a, b = tmp_path / "a", tmp_path / "b"
    run_spec(spec_for(images), _opts(a, chunk_size=2))
    (images / "img0.jpg").unlink()                              # the first chunk goes:
    (images / "img1.jpg").unlink()                              # every position moves up
    run_spec(spec_for(images), _opts(b, chunk_size=2))
    first = {p.parent.name for p in part_files_holding(a, {"img7.jpg"})}
    assert first and first == {p.parent.name for p in part_files_holding(b, {"img7.jpg"})}


# ------------------------------------------------------------------ compaction

def _pairs_with_values(run: Path) -> list[tuple]:
    from dmx.analysis.db import open_run
    return sorted(open_run(run).execute(
        "SELECT cell_id, image_id, status, out_max_abs FROM rows").fetchall())


def test_a_run_ends_compacted_into_files_sorted_by_cell_with_the_same_rows(images: Path,
                                                                            tmp_path: Path):
    parts, compacted = tmp_path / "parts", tmp_path / "compacted"
    run_spec(spec_for(images), _opts(parts, chunk_size=2))
    run_spec(spec_for(images), RunOptions(out=str(compacted), executor="local", chunk_size=2,
                                          progress=False))
    files = list((compacted / "rows").rglob("*.parquet"))
    assert len(list((parts / "rows").rglob("*.parquet"))) == 4 and len(files) == 1
    cells = pq.read_table(files[0], columns=["cell_id"])["cell_id"].to_pylist()
    assert cells == sorted(cells)                     # row groups can be skipped by cell_id
    assert _pairs_with_values(compacted) == _pairs_with_values(parts)


def test_dmx_compact_merges_an_older_run_and_explain_says_the_same(images: Path, tmp_path: Path):
    from dmx.analysis.explain import explain_run
    out = tmp_path / "run"
    run_spec(spec_for(images), _opts(out, chunk_size=2))
    before = explain_run(out).to_json()
    r = subprocess.run([sys.executable, "-m", "dmx", "compact", str(out)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert "4 file(s) -> 1" in r.stderr
    assert len(list((out / "rows").rglob("*.parquet"))) == 1
    assert explain_run(out).to_json() == before


def test_part_files_of_two_schemas_compact_into_one_with_the_missing_column_null(
        images: Path, tmp_path: Path):
    """Part files written by an older dmx lack columns: compaction reads each schema apart
    (one scan per schema, not one reader held open per file) and fills the gap with nulls."""
    from dmx.results.compact import compact_run
    out = tmp_path / "run"
    run_spec(spec_for(images), _opts(out, chunk_size=2))
    parts = sorted((out / "rows").rglob("part-0.parquet"))
    assert len(parts) == 4
    before = _pairs_with_values(out)
    for part in parts[:2]:                            # "older": no out_digest column
        t = pq.read_table(part)
        pq.write_table(t.drop_columns(["out_digest"]), part)
    compact_run(out)
    (merged,) = list((out / "rows").rglob("*.parquet"))
    t = pq.read_table(merged)
    assert "out_digest" in t.column_names and t.num_rows == len(before)
    assert not any(p.exists() for p in parts)         # the inputs are gone
    assert t["out_digest"].null_count > 0 and t["out_digest"].null_count < t.num_rows
    assert _pairs_with_values(out) == before


def test_part_files_whose_column_types_differ_compact_into_the_wider_type(
        images: Path, tmp_path: Path):
    """A column written as float32 by one dmx version and float64 by another (or int32 and
    int64) is promoted, not a compaction that stops: pyarrow's unify_schemas refuses them."""
    from dmx.results.compact import compact_run
    out = tmp_path / "run"
    run_spec(spec_for(images), _opts(out, chunk_size=2))
    parts = sorted((out / "rows").rglob("part-0.parquet"))
    before = pq.read_table(parts[0]).column_names
    for part in parts[:2]:
        t = pq.read_table(part)
        i = t.schema.get_field_index("px_max_abs")
        t = t.set_column(i, pa.field("px_max_abs", pa.float32()), t["px_max_abs"].cast(pa.float32()))
        pq.write_table(t, part)
    expected = len(_pairs_with_values(out))
    compact_run(out)
    (merged,) = list((out / "rows").rglob("*.parquet"))
    t = pq.read_table(merged)
    assert t.schema.field("px_max_abs").type == pa.float64()
    assert t.column_names == before and t.num_rows == expected
    assert not any(p.exists() for p in parts)


def test_a_compacted_run_extended_by_resume_has_every_pair_once(images: Path, tmp_path: Path):
    out = tmp_path / "run"
    run_spec(spec_for(images), RunOptions(out=str(out), executor="local", chunk_size=2,
                                          progress=False))
    shutil.copy(images / "img0.jpg", images / "img05.jpg")
    shutil.copy(images / "img0.jpg", images / "img9.jpg")
    s = run_spec(spec_for(images), RunOptions(out=str(out), executor="local", resume=True,
                                              progress=False))
    assert s.chunks_run == 1 and s.chunks_resumed == 4    # only the two new images computed
    rows = all_rows(out)
    assert len(rows) == len(set(rows)) == CELLS * 10
    assert len(list((out / "rows").rglob("*.parquet"))) == 1


def test_a_compaction_killed_before_its_commit_leaves_no_duplicate(images: Path, tmp_path: Path):
    """The files of a generation that never reached compaction.json are ignored, then removed."""
    out = tmp_path / "run"
    run_spec(spec_for(images), _opts(out, chunk_size=2))
    expected = _pairs_with_values(out)
    orphan = out / "rows" / "chunk=compacted-007-000" / "part-0.parquet"
    orphan.parent.mkdir()
    shutil.copy(next((out / "rows").glob("chunk=*/part-0.parquet")), orphan)
    assert _pairs_with_values(out) == expected
    from dmx.results.compact import compact_run
    compact_run(out)
    assert not orphan.exists()
    assert _pairs_with_values(out) == expected


def test_a_compaction_killed_after_its_commit_leaves_no_duplicate(images: Path, tmp_path: Path):
    """Part files already merged but not yet deleted are not read twice, nor resumed."""
    out = tmp_path / "run"
    run_spec(spec_for(images), _opts(out, chunk_size=2))
    saved = tmp_path / "saved"
    shutil.copytree(out / "rows", saved)
    expected = _pairs_with_values(out)
    from dmx.results.compact import compact_run
    compact_run(out)
    shutil.copytree(saved, out / "rows", dirs_exist_ok=True)  # as if killed before deleting
    assert _pairs_with_values(out) == expected
    s = run_spec(spec_for(images), _opts(out, resume=True))
    assert s.chunks_run == 0
    assert _pairs_with_values(out) == expected


# ------------------------------------------------------------------ damaged run directories

@pytest.fixture(scope="module")
def finished(photo_dir: Path, tmp_path_factory) -> tuple[Path, Path]:
    """(images, run): a finished run of 8 images in 4 part files, never modified by tests."""
    base = tmp_path_factory.mktemp("finished")
    images = base / "images"
    images.mkdir()
    good = sorted(photo_dir.glob("*.jpg"))
    for i in range(8):
        shutil.copy(good[i % len(good)], images / f"img{i}.jpg")
    out = base / "run"
    run_spec(spec_for(images), _opts(out, chunk_size=2))
    return images, out


def damaged_copy(finished: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path, list[Path]]:
    images, run = finished
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    parts = sorted((copy / "rows").glob("chunk=*/part-0.parquet"),
                   key=lambda p: pq.read_table(p, columns=["image_id"])["image_id"][0].as_py())
    return images, copy, parts


def dmx(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dmx", *args], capture_output=True, text=True)


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_truncated_part_file_is_named_by_explain_refused_by_check_and_repaired_by_resume(
        finished, tmp_path: Path):
    images, run, parts = damaged_copy(finished, tmp_path)
    truncate(parts[2])
    r = dmx("explain", str(run))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "incomplete: chunk 3 unreadable (truncated or corrupt) of 4 chunks" in r.stderr
    assert "--resume" in r.stderr
    r = dmx("check", str(run))
    assert r.returncode == 2 and "chunk 3 unreadable" in one_line(r.stderr)
    s = run_spec(spec_for(images), _opts(run, resume=True))
    assert (s.chunks_run, s.chunks_resumed) == (1, 3)
    assert _pairs_with_values(run) == _pairs_with_values(finished[1])
    assert dmx("check", str(run)).returncode == 0


def test_a_deleted_chunk_is_named_and_check_never_passes_the_incomplete_run(finished,
                                                                           tmp_path: Path):
    images, run, parts = damaged_copy(finished, tmp_path)
    parts[1].unlink()
    parts[3].unlink()
    r = dmx("explain", str(run))
    assert r.returncode == 0
    assert "incomplete: chunks 2, 4 missing of 4 chunks" in r.stderr
    r = dmx("check", str(run), "--min-top1", "0")
    assert r.returncode == 2 and "chunks 2, 4 missing" in one_line(r.stderr)
    r = dmx("report", str(run), "-o", str(tmp_path / "r.html"))
    assert r.returncode == 2 and "incomplete" in r.stderr and "Traceback" not in r.stderr
    r = dmx("diff", str(finished[1]), str(run))
    assert r.returncode == 0 and "incomplete: chunks 2, 4 missing" in r.stderr
    s = run_spec(spec_for(images), _opts(run, resume=True))
    assert (s.chunks_run, s.chunks_resumed) == (2, 2)
    assert _pairs_with_values(run) == _pairs_with_values(finished[1])


def test_a_manifest_with_non_utf8_bytes_is_one_line_for_every_command(finished, tmp_path: Path):
    images, run, _ = damaged_copy(finished, tmp_path)
    data = (run / "manifest.json").read_bytes()
    i = data.index(b'"name"')
    (run / "manifest.json").write_bytes(data[:i + 2] + b"\xff\xfe" + data[i + 2:])
    for args in (["explain", str(run)], ["check", str(run)], ["report", str(run)],
                 ["diff", str(run), str(finished[1])], ["compact", str(run)]):
        r = dmx(*args)
        assert r.returncode == 2 and "not UTF-8" in one_line(r.stderr), (args, r.stderr)


def test_a_truncated_compacted_file_is_recomputed_by_resume(finished, tmp_path: Path):
    images, run, _ = damaged_copy(finished, tmp_path)
    from dmx.results.compact import compact_run
    compact_run(run)
    (compacted,) = (run / "rows").glob("chunk=compacted-*/part-0.parquet")
    truncate(compacted)
    r = dmx("check", str(run))
    assert r.returncode == 2 and "unreadable" in one_line(r.stderr)
    s = run_spec(spec_for(images), _opts(run, resume=True))
    assert s.chunks_run == 4
    assert _pairs_with_values(run) == _pairs_with_values(finished[1])


def test_compacted_files_hold_whole_cells_so_a_cell_filter_skips_files(images: Path,
                                                                       tmp_path: Path,
                                                                       monkeypatch):
    import dmx.results.compact as compact
    out = tmp_path / "run"
    run_spec(spec_for(images), _opts(out, chunk_size=2))
    expected = _pairs_with_values(out)
    monkeypatch.setattr(compact, "BUCKET_ROWS", 3)   # the one pass flushes buckets as it reads
    c = compact.compact_run(out, rows_per_file=8, row_group_rows=4)  # 8 images: one cell per file
    assert (c.files_before, c.files_after, c.rows) == (4, CELLS, CELLS * 8)
    files = sorted((out / "rows").glob("chunk=compacted-*/part-0.parquet"))
    cells = [pq.read_table(f, columns=["cell_id"])["cell_id"].unique().to_pylist() for f in files]
    assert all(len(c) == 1 for c in cells) and len({c[0] for c in cells}) == CELLS
    for f in files:
        keys = pq.read_table(f, columns=["cell_id", "image_id"]).to_pylist()
        assert keys == sorted(keys, key=lambda k: (k["cell_id"], k["image_id"]))
    assert not (out / ".compact-tmp").exists()          # the buckets went with the spill folder
    md = pq.read_metadata(files[0])
    assert md.num_row_groups == 2 and md.row_group(0).column(
        md.schema.to_arrow_schema().get_field_index("cell_id")).statistics.has_min_max
    assert _pairs_with_values(out) == expected


# ------------------------------------------------------------------ explain's stored aggregates

def _explain_without_summary(out: Path, tmp_path: Path) -> dict:
    from dmx.analysis.explain import explain_run
    bare = tmp_path / "bare"
    shutil.copytree(out, bare)
    shutil.rmtree(bare / "summary", ignore_errors=True)
    return explain_run(bare).to_json()


def test_explain_answers_from_the_summary_kept_at_compaction_and_says_the_same(
        images: Path, tmp_path: Path, monkeypatch):
    import dmx.analysis.summary as summary
    from dmx.analysis.explain import explain_run
    out = tmp_path / "run"
    run_spec(spec_for(images), _opts(out, chunk_size=2))
    r = subprocess.run([sys.executable, "-m", "dmx", "compact", str(out)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert (out / "summary" / "summary.json").is_file()
    scans = []
    real = summary.query_dicts
    monkeypatch.setattr(summary, "query_dicts", lambda *a, **k: scans.append(a[1]) or real(*a, **k))
    got = explain_run(out).to_json()
    assert scans == []                                   # no query ran over the rows
    assert got == _explain_without_summary(out, tmp_path)


def test_queries_that_hold_every_value_of_a_cell_run_in_passes_within_bounded_memory(
        tmp_path: Path, monkeypatch):
    """cell_stats' exact quantiles keep every value of a cell and DuckDB cannot spill them: in
    one pass over all cells they ran out of memory (64 M rows, 2 GB); in passes of cells they
    fit and give numpy's exact quantiles."""
    import duckdb
    import numpy as np

    import dmx.analysis.queries as queries
    from dmx.analysis.queries import load_sql
    from dmx.analysis.summary import run_query
    rows = tmp_path / "rows.parquet"
    con = duckdb.connect()
    con.execute(f"""COPY (SELECT 'c' || (i % 8)::VARCHAR AS cell_id, 'fp32' AS precision_effective,
        i // 8 AS image_id, 'ok' AS status, 1 - (hash(i) % 100000) / 1e7 AS out_cosine,
        (hash(3 * i) % 1000) / 100.0 AS out_max_abs, (hash(5 * i) % 1000) / 1e4 AS out_rel_l2,
        true AS top1_agree, 0.0 AS px_mean_abs, true AS px_equal, true AS shape_match,
        1.0 AS latency_ms FROM range(1000000) t(i) ORDER BY cell_id, image_id)
        TO '{rows}' (FORMAT parquet)""")
    con.execute(f"CREATE VIEW rows AS SELECT * FROM '{rows}'")
    con.execute("SET memory_limit = '32MB'")
    params = {"cells": [f"c{k}" for k in range(8)], "cos_eps": 1e-6}
    with pytest.raises(duckdb.OutOfMemoryException):     # the query as one pass does not fit
        con.sql(load_sql("cell_stats"), params=params).fetchall()
    monkeypatch.setattr(queries, "ROWS_PER_PASS", 250_000)
    assert queries.cell_passes(params["cells"], con) == [["c0", "c1"], ["c2", "c3"],
                                                         ["c4", "c5"], ["c6", "c7"]]
    got = {d["cell_id"]: d for d in run_query(con, "cell_stats", params).to_pylist()}
    con.execute("SET memory_limit = '1GB'")
    values = con.execute("SELECT cell_id, list(1 - out_cosine), list(out_max_abs) FROM rows "
                         "GROUP BY cell_id").fetchall()
    assert len(got) == 8
    for cell, cos_dist, max_abs in values:
        assert got[cell]["n"] == len(cos_dist) == 125_000
        assert got[cell]["cos_dist_p50"] == pytest.approx(np.quantile(cos_dist, 0.5), rel=1e-9)
        assert got[cell]["cos_dist_p95"] == pytest.approx(np.quantile(cos_dist, 0.95), rel=1e-9)
        assert got[cell]["max_abs_p95"] == pytest.approx(np.quantile(max_abs, 0.95), rel=1e-9)


def test_explain_in_passes_of_cells_says_what_one_pass_says(images: Path, tmp_path: Path,
                                                            monkeypatch):
    import dmx.analysis.queries as queries
    from dmx.analysis.explain import explain_run
    out = tmp_path / "run"
    run_spec(spec_for(images), _opts(out, chunk_size=2))
    one_pass = explain_run(out).to_json()
    monkeypatch.setattr(queries, "ROWS_PER_PASS", 5)      # a pass per cell
    assert explain_run(out).to_json() == one_pass


def test_a_summary_that_no_longer_describes_the_rows_is_not_used(images: Path, tmp_path: Path,
                                                                 monkeypatch):
    """Rows added by a resume that did not compact: the stored aggregates are stale, so
    explain queries the rows and counts the new images."""
    import dmx.analysis.summary as summary
    from dmx.analysis.explain import explain_run
    out = tmp_path / "run"
    run_spec(spec_for(images), _opts(out, chunk_size=2))
    assert subprocess.run([sys.executable, "-m", "dmx", "compact", str(out)]).returncode == 0
    shutil.copy(images / "img0.jpg", images / "img9.jpg")
    run_spec(spec_for(images), _opts(out, resume=True))          # a new part file, not compacted
    scans = []
    real = summary.query_dicts
    monkeypatch.setattr(summary, "query_dicts", lambda *a, **k: scans.append(a[1]) or real(*a, **k))
    got = explain_run(out).to_json()
    assert scans                                          # the rows were read again
    assert got == _explain_without_summary(out, tmp_path)
    assert sum(s["n"] for s in got["status"]) == CELLS * 9


def test_a_summary_that_cannot_be_written_is_one_warning_and_the_rows_stay(images: Path,
                                                                          tmp_path: Path):
    """A file of the user's where the summary folder would go: never replaced; compaction
    succeeds, one warning line, explain reads the rows."""
    from dmx.analysis.explain import explain_run
    out = tmp_path / "run"
    run_spec(spec_for(images), _opts(out, chunk_size=2))
    (out / "summary").write_text("the user's notes")
    r = subprocess.run([sys.executable, "-m", "dmx", "compact", str(out)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert any(ln.startswith("dmx: warning: the run's summary was not written")
               for ln in r.stderr.splitlines()), r.stderr
    assert (out / "summary").read_text() == "the user's notes"
    assert sum(s["n"] for s in explain_run(out).to_json()["status"]) == CELLS * 8
