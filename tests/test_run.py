"""Whole runs: spec -> runner -> Parquet -> DuckDB, locally and through Ray."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

from dmx.analysis.explain import explain_run
from dmx.matrix import parse_spec
from dmx.results import RunDirError, row_schema
from dmx.runner.sweep import RunOptions, run_spec

AXES = {"decoder": ["pil", "opencv"], "exif": ["apply", "ignore"],
        "resize": ["pil-bilinear", "cv2-linear"], "backend": ["torch", "onnxruntime"]}


def make_spec(photo_dir: Path, **changes):
    raw = {"name": "tiny-run", "dataset": {"path": str(photo_dir)}, "model": "tiny", "axes": AXES}
    raw.update(changes)
    return parse_spec(raw)


@pytest.fixture(scope="module")
def local_run(photo_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "local"
    run_spec(make_spec(photo_dir), RunOptions(out=str(out), executor="local", chunk_size=3,
                                              progress=False))
    return out


def query(run: Path, sql: str) -> list[tuple]:
    """Run SQL against a view ``rows`` over the run's part files."""
    con = duckdb.connect()
    con.execute(f"CREATE VIEW rows AS SELECT * FROM read_parquet('{run}/rows/*/part-0.parquet', "
                "hive_partitioning=true)")
    return con.execute(sql).fetchall()


def test_every_cell_image_pair_is_exactly_one_row(local_run: Path):
    [(n, distinct)] = query(local_run, "SELECT count(*), count(DISTINCT (cell_id, image_id)) FROM rows")
    assert n == distinct == 16 * 7          # 16 cells x 7 files (4 photos, 3 bad)


def test_row_files_follow_the_documented_schema(local_run: Path):
    part = next((local_run / "rows").glob("chunk=*/part-0.parquet"))
    assert pq.read_schema(part).remove_metadata() == row_schema(
        ("decoder", "exif", "resize", "backend")).remove_metadata()


def test_bad_images_become_error_rows_with_their_stage(local_run: Path):
    errors = query(local_run, "SELECT image_id, error_stage, count(*) FROM rows "
                              "WHERE status = 'error' GROUP BY ALL")
    by_image = {i: s for i, s, _ in errors}
    assert by_image["bad/empty.jpg"] == "decode"
    assert by_image["bad/not_an_image.jpg"] == "decode"
    assert set(by_image) <= {"bad/empty.jpg", "bad/not_an_image.jpg", "bad/truncated.jpg"}


def test_exif_ignore_shows_a_shape_mismatch_only_on_the_rotated_photo(local_run: Path):
    mism = query(local_run, "SELECT DISTINCT image_id, exif FROM rows WHERE shape_match = false")
    assert mism == [("coffee_exif6.jpg", "ignore")]


def test_the_reference_cell_has_zero_divergence(local_run: Path):
    ref = query(local_run, "SELECT max(out_max_abs), bool_and(px_equal), bool_and(top1_agree) "
                           "FROM rows WHERE is_reference AND status = 'ok'")
    assert ref == [(0.0, True, True)]


def test_work_is_shared_decodes_resizes_and_inferences_at_their_minimum(local_run: Path):
    m = json.loads((local_run / "manifest.json").read_text())
    c = m["counters"]
    good = 4                                 # the 3 bad files decode in no variant
    assert c["decodes"] == 4 * good          # 4 decode variants (decoder x exif)
    # 8 preprocess variants (x resize); a decode equal to an earlier one shares its inputs
    assert c["resizes"] + c["shared_resizes"] == 8 * good and c["shared_resizes"] > 0
    assert c["model_builds"] == 2                                # torch + onnxruntime, once each
    # pil and opencv agree bit for bit, so their inputs are inferred once and reused
    assert c["reuses"] > 0 and c["inferences"] < 16 * good


def test_manifest_records_environment_and_backend_precision(local_run: Path):
    m = json.loads((local_run / "manifest.json").read_text())
    assert m["status"] == "complete" and m["spec"]["name"] == "tiny-run"
    assert m["environment"]["libjpeg"]["pillow"]
    assert m["environment"]["packages"]["onnxruntime"]
    effective = {v["backend"]: v["precision_effective"] for v in m["backends"].values()}
    assert effective == {"torch": "fp32", "onnxruntime": "fp32"}


def test_images_table_has_file_properties(local_run: Path):
    t = pq.read_table(local_run / "images.parquet").to_pylist()
    by_id = {r["image_id"]: r for r in t}
    assert by_id["chelsea_444.jpg"]["subsampling"] == "4:4:4"
    assert by_id["coffee_exif6.jpg"]["exif_orientation"] == 6
    assert by_id["bad/empty.jpg"]["error"]


def test_explain_ranks_factors_from_the_parquet_files(local_run: Path):
    e = explain_run(local_run)
    ranked = [f["factor"] for f in e.factor_ranking()]
    assert set(ranked) == {"decoder", "exif", "resize", "backend"}
    top = e.ranking()[0]
    assert top["factor"] in ("exif", "resize") and top["effect"] > 1e-4
    backend = next(f for f in e.factor_ranking() if f["factor"] == "backend")
    assert backend["effect"] < 1e-6          # onnxruntime at fp32: same input, same numbers


def test_a_run_directory_refuses_a_different_spec(photo_dir: Path, local_run: Path):
    other = make_spec(photo_dir, axes={"decoder": ["pil"]})
    with pytest.raises(RunDirError, match="different spec"):
        run_spec(other, RunOptions(out=str(local_run), executor="local", progress=False))


def test_rerunning_without_resume_is_refused(photo_dir: Path, local_run: Path):
    with pytest.raises(RunDirError, match="--resume"):
        run_spec(make_spec(photo_dir), RunOptions(out=str(local_run), executor="local",
                                                  chunk_size=3, progress=False))


def test_resume_computes_only_missing_chunks_and_duplicates_nothing(photo_dir: Path, tmp_path: Path):
    out = tmp_path / "resumed"
    spec = make_spec(photo_dir, axes={"decoder": ["pil", "opencv"], "backend": ["torch"]})
    run_spec(spec, RunOptions(out=str(out), executor="local", chunk_size=2, progress=False,
                              compact=False))     # as an interrupted run: one file per chunk
    full = sorted(query(out, "SELECT cell_id, image_id, out_max_abs FROM rows"))
    lost = sorted((out / "rows").glob("chunk=*"))[1]
    for f in lost.iterdir():
        f.unlink()
    lost.rmdir()
    # no --chunk-size on resume: the run's own chunking is kept
    s = run_spec(spec, RunOptions(out=str(out), executor="local", resume=True, progress=False))
    assert (s.chunks_run, s.chunks_resumed) == (1, 3)
    assert sorted(query(out, "SELECT cell_id, image_id, out_max_abs FROM rows")) == full


def test_sql_command_queries_the_rows_view(local_run: Path):
    r = subprocess.run([sys.executable, "-m", "dmx", "sql", str(local_run),
                        "SELECT count(*) AS n FROM rows JOIN cells USING (cell_id)", "--format", "csv"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["n", "112"]


def test_ray_run_gives_the_same_rows_as_the_local_run(photo_dir: Path, local_run: Path,
                                                     tmp_path: Path, ray_session):
    out = tmp_path / "ray"
    s = run_spec(make_spec(photo_dir), RunOptions(out=str(out), executor="ray", workers=2,
                                                  chunk_size=3, progress=False))
    assert s.rows == 112
    sql = "SELECT cell_id, image_id, status, px_max_abs, top1 FROM rows"
    assert sorted(query(out, sql)) == sorted(query(local_run, sql))
    [(numeric,)] = duckdb.connect().execute(
        f"SELECT max(abs(a.out_max_abs - b.out_max_abs)) FROM "
        f"read_parquet('{out}/rows/*/*.parquet') a JOIN read_parquet('{local_run}/rows/*/*.parquet') b "
        "USING (cell_id, image_id)").fetchall()
    assert numeric < 1e-4     # thread counts differ (1 per actor vs 2 locally)
    m = json.loads((out / "manifest.json").read_text())
    assert m["executor"]["name"] == "ray" and m["counters"]["model_builds"] <= 2 * 2
    # the workers' start (process, imports, probe) is recorded apart from the sweep it precedes
    assert 0 < m["executor"]["start_s"] == round(s.start_s, 2) < m["wall_s"]


@pytest.mark.parametrize("n_images", [1, 7, 100, 5_000, 100_000, 10_000_000])
@pytest.mark.parametrize("input_hw", [(32, 32), (224, 224), (1024, 1024)])
def test_the_default_chunk_bounds_memory_spreads_over_the_workers_and_batches(n_images, input_hw):
    from dmx.runner.plan import CHUNK_BYTES, MAX_CHUNK, default_chunk_size
    workers, variants = 2, 4
    size = default_chunk_size(n_images, variants, workers, input_hw)
    per_image = 24 * input_hw[0] * input_hw[1] * variants
    assert 1 <= size <= MAX_CHUNK
    assert size * per_image <= max(CHUNK_BYTES, per_image), "a chunk's inputs fit the budget"
    assert size <= max(4, -(-n_images // (8 * workers))), "about 8 chunks per worker, or more"
    if n_images >= 8 * workers * MAX_CHUNK and per_image * MAX_CHUNK <= CHUNK_BYTES:
        assert size == MAX_CHUNK, "a large run of small inputs gets the largest chunks"
