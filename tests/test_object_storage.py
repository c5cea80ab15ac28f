"""Datasets and runs in object storage (a real S3 endpoint: moto in server mode on localhost),
and shard datasets (Parquet with image bytes, WebDataset tar)."""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from dmx.analysis.db import open_run
from dmx.matrix import parse_spec
from dmx.runner.sweep import RunOptions, run_spec

from s3faults import environment, free_port, moto_server, s3_env

AXES = {"decoder": ["pil", "opencv"], "backend": ["torch"]}
BUCKET = "audits"


@pytest.fixture(scope="module")
def s3() -> pafs.S3FileSystem:
    """moto_server on a free port, the AWS variables pointing at it, and one bucket."""
    with moto_server() as port, environment(s3_env(port)):
        fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http",
                               access_key="testing", secret_key="testing", region="us-east-1",
                               allow_bucket_creation=True)
        fs.create_dir(BUCKET)
        yield fs


@pytest.fixture(scope="module")
def images(photo_dir: Path, tmp_path_factory) -> Path:
    """Eight real JPEGs and one bad file, locally."""
    d = tmp_path_factory.mktemp("images")
    good = sorted(photo_dir.glob("*.jpg"))
    for i in range(8):
        shutil.copy(good[i % len(good)], d / f"img{i}.jpg")
    shutil.copy(photo_dir / "bad" / "truncated.jpg", d / "img8.jpg")
    return d


def spec_for(path: str, name: str = "store"):
    return parse_spec({"name": name, "dataset": {"path": path}, "model": "tiny", "axes": AXES})


@pytest.fixture(scope="module")
def local_run(images: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "run"
    run_spec(spec_for(str(images)), RunOptions(out=str(out), executor="local", chunk_size=3,
                                               progress=False))
    return out


def by_image(run: str | Path, key=lambda image_id: image_id) -> dict[tuple[str, str], tuple]:
    rows = open_run(run).execute(
        "SELECT cell_id, image_id, status, error_stage, out_max_abs, top1 FROM rows").fetchall()
    out = {(c, key(i)): rest for c, i, *rest in rows}
    assert len(out) == len(rows), "a (cell, image) pair twice"
    return out


def upload(s3: pafs.S3FileSystem, local: Path, prefix: str) -> None:
    pafs.copy_files(str(local), f"{BUCKET}/{prefix}", source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=s3)


def dmx(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dmx", *args], capture_output=True, text=True,
                          cwd=cwd)


@pytest.fixture(scope="module")
def s3_run(s3, images: Path) -> str:
    """A run whose images and run directory are both in S3."""
    upload(s3, images, "photos/set1")
    out = f"s3://{BUCKET}/runs/first"
    run_spec(spec_for(f"s3://{BUCKET}/photos/**/*.jpg"),
             RunOptions(out=out, executor="local", chunk_size=3, progress=False))
    return out


# ------------------------------------------------------------------ object storage

def test_a_run_reads_its_images_from_s3_and_writes_its_run_there(s3, s3_run: str,
                                                                 local_run: Path):
    keys = {i.path.split("/runs/first/", 1)[1] for i in s3.get_file_info(
        pafs.FileSelector(f"{BUCKET}/runs/first", recursive=True)) if i.type == pafs.FileType.File}
    assert {"manifest.json", "chunks.parquet", "cells.parquet", "images.parquet",
            "compaction.json"} <= keys
    assert any(k.startswith("rows/chunk=compacted-") for k in keys)
    assert by_image(s3_run, lambda i: i.rsplit("/", 1)[-1]) == by_image(local_run)
    paths = pq.read_table(f"{BUCKET}/runs/first/images.parquet", filesystem=s3)["path"].to_pylist()
    assert all(p.startswith(f"s3://{BUCKET}/photos/set1/") for p in paths)


def test_explain_sql_check_report_and_diff_read_an_s3_run(s3_run: str, local_run: Path,
                                                         tmp_path: Path):
    r = dmx("explain", s3_run)
    assert r.returncode == 0 and "9 images x 2 cells" in r.stdout, r.stderr
    r = dmx("sql", s3_run, "SELECT count(*) AS n FROM rows JOIN cells USING (cell_id)",
            "--format", "csv")
    assert r.returncode == 0 and r.stdout.split() == ["n", "18"], r.stderr
    # the dataset holds one truncated file, on which the reference fails too
    r = dmx("check", s3_run)
    assert r.returncode == 1 and "the reference failed on 1 of 9 images" in r.stdout, r.stderr + r.stdout
    r = dmx("check", s3_run, "--max-reference-errors", "1")
    assert r.returncode == 0 and "PASS" in r.stdout, r.stderr + r.stdout
    again = f"s3://{BUCKET}/runs/again"
    run_spec(spec_for(f"s3://{BUCKET}/photos/**/*.jpg"),
             RunOptions(out=again, executor="local", chunk_size=4, progress=False, compact=False))
    r = dmx("diff", s3_run, again)
    assert r.returncode == 0 and "0 of 2 cells moved" in r.stdout, r.stderr + r.stdout
    r = dmx("report", s3_run, cwd=tmp_path)
    assert r.returncode == 0 and f"{s3_run}/report.html" in r.stderr, r.stderr
    assert not list(tmp_path.iterdir())          # nothing written locally


def test_ray_workers_read_images_from_s3_themselves(s3, s3_run: str, local_run: Path,
                                                    tmp_path: Path):
    """An embedded Ray of its own (a child process): its workers inherit the S3 variables."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"name: store\ndataset: {{path: 's3://{BUCKET}/photos/**/*.jpg'}}\n"
                    f"model: tiny\naxes: {AXES}\n")
    out = f"s3://{BUCKET}/runs/ray"
    r = dmx("run", str(spec), "--out", out, "--executor", "ray", "--workers", "2",
            "--chunk-size", "3", "--quiet")
    assert r.returncode == 0, r.stderr
    assert by_image(out, lambda i: i.rsplit("/", 1)[-1]) == by_image(local_run)


def test_an_s3_run_missing_a_part_object_is_named_and_repaired_by_resume(s3, s3_run: str,
                                                                        images: Path):
    out = f"s3://{BUCKET}/runs/damaged"
    spec = spec_for(f"s3://{BUCKET}/photos/**/*.jpg")
    run_spec(spec, RunOptions(out=out, executor="local", chunk_size=3, progress=False,
                              compact=False))
    full = by_image(out)
    part = sorted(i.path for i in s3.get_file_info(pafs.FileSelector(
        f"{BUCKET}/runs/damaged/rows", recursive=True)) if i.type == pafs.FileType.File)[0]
    s3.delete_file(part)
    r = dmx("check", out)
    assert r.returncode == 2 and "missing of 3 chunks" in r.stderr, r.stderr
    s = run_spec(spec, RunOptions(out=out, executor="local", resume=True, progress=False))
    assert (s.chunks_run, s.chunks_resumed) == (1, 2)
    assert by_image(out) == full


def test_an_unreachable_store_is_one_line(tmp_path: Path):
    env = dict(os.environ, AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}",
               AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="x", AWS_REGION="us-east-1",
               AWS_MAX_ATTEMPTS="1")
    r = subprocess.run([sys.executable, "-m", "dmx", "explain", "s3://nowhere/run"],
                       capture_output=True, text=True, env=env, timeout=120)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr


# ------------------------------------------------------------------ shard datasets

def _hf_parquet_shards(images: Path, dest: Path) -> None:
    """Two shards as Hugging Face `datasets` exports an Image column: struct{bytes, path}."""
    files = sorted(images.iterdir())
    dest.mkdir(parents=True, exist_ok=True)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for n, part in enumerate((files[:5], files[5:])):
        table = pa.table({"image": pa.array([{"bytes": f.read_bytes(), "path": f.name} for f in part],
                                            image_type),
                          "id": [f.name for f in part], "label": list(range(len(part)))})
        pq.write_table(table, dest / f"train-{n:05d}.parquet", row_group_size=2)


def _webdataset_shards(images: Path, dest: Path) -> None:
    files = sorted(images.iterdir())
    dest.mkdir(parents=True, exist_ok=True)
    for n, part in enumerate((files[:4], files[4:])):
        with tarfile.open(dest / f"shard-{n:06d}.tar", "w") as tar:
            for f in part:
                for name, data in ((f"{f.stem}.jpg", f.read_bytes()), (f"{f.stem}.cls", b"1")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def test_parquet_shards_in_hugging_face_layout_give_the_rows_of_the_image_folder(
        images: Path, local_run: Path, tmp_path: Path):
    _hf_parquet_shards(images, tmp_path / "shards")
    out = tmp_path / "run"
    s = run_spec(spec_for(str(tmp_path / "shards" / "*.parquet")),
                 RunOptions(out=str(out), executor="local", chunk_size=3, progress=False))
    assert s.images == 9
    ids = pq.read_table(out / "images.parquet")["image_id"].to_pylist()
    assert ids[0] == "train-00000.parquet/img0.jpg"      # image_id = shard + key
    assert by_image(out, lambda i: i.rsplit("/", 1)[-1]) == by_image(local_run)


def test_webdataset_tar_shards_give_the_rows_of_the_image_folder(images: Path, local_run: Path,
                                                                tmp_path: Path):
    _webdataset_shards(images, tmp_path / "wds")
    out = tmp_path / "run"
    run_spec(spec_for(str(tmp_path / "wds" / "shard-*.tar")),
             RunOptions(out=str(out), executor="local", chunk_size=3, progress=False))
    ids = pq.read_table(out / "images.parquet")["image_id"].to_pylist()
    assert "shard-000000.tar/img0" in ids and len(ids) == 9
    assert by_image(out, lambda i: i.rsplit("/", 1)[-1] + ".jpg") == by_image(local_run)


def test_parquet_shards_in_s3_are_read_by_the_workers(s3, images: Path, local_run: Path,
                                                     tmp_path: Path):
    _hf_parquet_shards(images, tmp_path / "shards")
    upload(s3, tmp_path / "shards", "hf/train")
    out = f"s3://{BUCKET}/runs/shards"
    run_spec(spec_for(f"s3://{BUCKET}/hf/train/*.parquet"),
             RunOptions(out=out, executor="local", chunk_size=3, progress=False))
    assert by_image(out, lambda i: i.rsplit("/", 1)[-1]) == by_image(local_run)


# ------------------------------------------------------------------ locations

def test_locations_map_to_a_filesystem_and_a_path():
    from dmx.results.fs import StorageError, filesystem
    fs, path = filesystem("s3://bucket/runs/x/")
    assert isinstance(fs, pafs.S3FileSystem) and path == "bucket/runs/x"
    fs, path = filesystem("gs://bucket/photos")
    assert isinstance(fs, pafs.GcsFileSystem) and path == "bucket/photos"
    fs, path = filesystem("relative/run")
    assert isinstance(fs, pafs.LocalFileSystem) and Path(path).is_absolute()
    with pytest.raises(StorageError, match="unsupported storage scheme 'ftp'"):
        filesystem("ftp://host/run")
    with pytest.raises(StorageError, match="no bucket"):
        filesystem("s3:///runs")


def test_a_remote_glob_matches_like_a_recursive_local_glob():
    from dmx.runner.sources import _glob_regex
    rx = _glob_regex("bucket/photos/**/*.jpg")
    assert rx.match("bucket/photos/a.jpg") and rx.match("bucket/photos/x/y/a.jpg")
    assert not rx.match("bucket/photos/a.png") and not rx.match("bucket/other/a.jpg")
    assert not _glob_regex("bucket/photos/*.jpg").match("bucket/photos/x/a.jpg")
