"""Reading images from a store that misbehaves: moto's real S3 server behind a proxy that answers
503 SlowDown and drops connections (``s3faults``). Every read that eventually succeeds gives
the rows a clean store gives; a read that keeps failing is an error row that ``--resume``
computes again; a tar shard read by several chunks is fetched once per worker."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from dmx.analysis.db import open_run
from dmx.matrix import parse_spec
from dmx.runner.sweep import RunOptions, run_spec

from s3faults import FaultProxy, environment, moto_server, s3_env

BUCKET = "flaky"
AXES = {"decoder": ["pil", "opencv"], "backend": ["torch"]}


@pytest.fixture(scope="module")
def store():
    """(proxy, direct filesystem): moto behind the fault proxy, the AWS variables on the proxy."""
    with moto_server() as port:
        proxy = FaultProxy(port)
        direct = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http",
                                   access_key="testing", secret_key="testing", region="us-east-1",
                                   allow_bucket_creation=True)
        direct.create_dir(BUCKET)
        with environment(s3_env(proxy.port)):
            yield proxy, direct
        proxy.close()


@pytest.fixture(scope="module")
def images(photo_dir: Path, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("flaky-images")
    good = sorted(photo_dir.glob("*.jpg"))
    for i in range(8):
        shutil.copy(good[i % len(good)], d / f"img{i}.jpg")
    return d


@pytest.fixture(scope="module")
def uploaded(store, images: Path) -> str:
    _, direct = store
    pafs.copy_files(str(images), f"{BUCKET}/photos", source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=direct)
    return f"s3://{BUCKET}/photos/*.jpg"


def spec_for(path: str):
    return parse_spec({"name": "flaky", "dataset": {"path": path}, "model": "tiny", "axes": AXES})


def rows(run: Path) -> dict[tuple[str, str], tuple]:
    got = open_run(run).execute("SELECT cell_id, image_id, status, error_stage, out_max_abs, top1 "
                                "FROM rows").fetchall()
    out = {(c, i.rsplit("/", 1)[-1]): rest for c, i, *rest in got}
    assert len(out) == len(got), "a (cell, image) pair twice"
    return out


@pytest.fixture(scope="module")
def clean(images: Path, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("clean") / "run"
    run_spec(spec_for(str(images)), RunOptions(out=str(out), executor="local", chunk_size=3,
                                               progress=False))
    return rows(out)


def _image_get(method: str, path: str) -> bool:
    return method == "GET" and "/photos/img" in path and "list-type" not in path


def test_a_store_that_throttles_and_drops_connections_gives_the_clean_rows(
        store, uploaded: str, clean: dict, tmp_path: Path):
    proxy, _ = store
    proxy.reset()
    # every image read: 503 SlowDown and dropped connections, five times, then the object
    proxy.policy = lambda m, p, attempt: ({1: "503", 2: "drop", 3: "503", 4: "drop", 5: "503"}.get(attempt)
                                          if _image_get(m, p) else None)
    out = tmp_path / "run"
    run_spec(spec_for(uploaded), RunOptions(out=str(out), executor="local", chunk_size=3,
                                            progress=False))
    assert proxy.faults["503"] >= 24 and proxy.faults["drop"] >= 16      # injected on every image
    assert rows(out) == clean                                          # and none shows


def test_a_read_that_keeps_failing_is_an_error_row_that_resume_computes_again(
        store, uploaded: str, clean: dict, tmp_path: Path):
    proxy, _ = store
    proxy.reset()
    proxy.policy = lambda m, p, attempt: "503" if m == "GET" and p.endswith("/img3.jpg") else None
    out = tmp_path / "run"
    with environment({"AWS_MAX_ATTEMPTS": "2"}):   # fail fast: 2 SDK attempts x dmx's 3
        first = run_spec(spec_for(uploaded), RunOptions(out=str(out), executor="local",
                                                        chunk_size=3, progress=False))
        got = rows(out)
        failed = {k: v for k, v in got.items() if v[0] == "error"}
        assert {i for _, i in failed} == {"img3.jpg"} and {v[1] for v in failed.values()} == {"read"}
        msg = open_run(out).execute("SELECT any_value(error) FROM rows WHERE status = 'error'").fetchone()[0]
        assert "--resume" in msg, msg
        proxy.policy = lambda m, p, attempt: None          # the store recovers
        again = run_spec(spec_for(uploaded), RunOptions(out=str(out), executor="local",
                                                        resume=True, progress=False))
    assert first.chunks_run == 3 and (again.chunks_run, again.chunks_resumed) == (1, 2)
    assert rows(out) == clean
    assert not list(out.glob("rows/*/part-0.retry.parquet"))


def _tar_shard(images: Path, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(dest, "w") as tar:
        for f in sorted(images.iterdir()):
            info = tarfile.TarInfo(f.name)
            data = f.read_bytes()
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return dest


def test_a_tar_shard_read_by_several_chunks_is_fetched_once_per_worker(
        store, images: Path, clean: dict, tmp_path: Path):
    proxy, direct = store
    shard = _tar_shard(images, tmp_path / "wds" / "shard-000000.tar")
    with direct.open_output_stream(f"{BUCKET}/wds/shard-000000.tar") as f:
        f.write(shard.read_bytes())
    proxy.reset()
    out = tmp_path / "local"
    run_spec(spec_for(f"s3://{BUCKET}/wds/*.tar"),
             RunOptions(out=str(out), executor="local", chunk_size=2, progress=False))
    # one GET to list its members (the driver), one for the 4 chunks of the one worker
    assert proxy.gets("/shard-000000.tar") == 2
    assert {(c, i + ".jpg"): v for (c, i), v in rows(out).items()} == clean

    proxy.reset()
    spec = tmp_path / "spec.yaml"
    spec.write_text(json.dumps({"name": "flaky", "dataset": {"path": f"s3://{BUCKET}/wds/*.tar"},
                                "model": "tiny", "axes": AXES}))
    r = subprocess.run([sys.executable, "-m", "dmx", "run", str(spec), "--out", str(tmp_path / "ray"),
                        "--workers", "2", "--chunk-size", "1", "--quiet"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert proxy.gets("/shard-000000.tar") <= 1 + 2     # 8 chunks, 2 workers


def test_a_prefix_is_listed_a_few_sub_prefixes_ahead_of_what_planning_has_taken(
        store, monkeypatch):
    """A 1M-object prefix is not held whole in memory: sub-prefixes are listed in threads, at
    most 2 x LIST_THREADS ahead of the consumer, and each exactly once."""
    from dmx.results.fs import filesystem
    from dmx.runner import sources
    proxy, direct = store
    names = [f"{BUCKET}/tree/d{d:02d}/s{j}.jpg" for d in range(12) for j in range(2)]
    for name in names:
        with direct.open_output_stream(name) as f:
            f.write(b"\xff\xd8")
    monkeypatch.setattr(sources, "LIST_THREADS", 2)
    proxy.reset()
    listed: list[str] = []
    proxy.policy = lambda m, p, attempt: listed.append(p) if "list-type" in p else None
    fs, root = filesystem(f"s3://{BUCKET}/tree")
    files = iter(sources._select(fs, root))
    first = next(files)
    time.sleep(1.0)         # the threads list what they may before the consumer takes more
    sub = [p for p in listed if "prefix=tree%2Fd" in p or "prefix=tree/d" in p]
    assert 1 <= len(sub) <= 2 * 2 + 1, listed
    got = [first.path, *(i.path for i in files)]
    assert sorted(got) == names and got == sorted(got)      # every file, in listing order
    sub = [p for p in listed if "prefix=tree%2Fd" in p or "prefix=tree/d" in p]
    assert len(sub) == 12 and len(set(sub)) == 12           # each sub-prefix listed once


def test_a_limit_stops_an_object_store_listing_and_keeps_the_images_a_full_listing_keeps(
        store, monkeypatch, tmp_path: Path):
    """Keys come in order ("b.jpg" < "b/x.jpg" < "b0.jpg", top-level objects among sub-prefixes),
    so the listing stops after ``limit`` images and the plan is the full listing's first ones."""
    import pyarrow.parquet as pq

    from dmx.matrix import DatasetSpec
    from dmx.runner import sources
    from dmx.runner.dataset import collect
    proxy, direct = store
    names = ["b.jpg", "b/x.jpg", "b0.jpg", "a/z/1.jpg", "a.txt", "c.png", "a/y.jpg",
             *(f"d{d:02d}/s{j}.jpg" for d in range(12) for j in range(2))]
    for name in names:
        with direct.open_output_stream(f"{BUCKET}/lim/{name}") as f:
            f.write(b"\xff\xd8")
    monkeypatch.setattr(sources, "LIST_THREADS", 2)

    def planned(limit, folder):
        proxy.reset()
        listed: list[str] = []
        proxy.policy = lambda m, p, attempt: listed.append(p) if "list-type" in p else None
        result = collect(DatasetSpec(f"s3://{BUCKET}/lim", limit, "."), tmp_path / folder)
        return pq.read_table(result.images).column("image_id").to_pylist(), listed

    everything, all_listed = planned(None, "all")
    assert everything == sorted(n for n in names if not n.endswith(".txt"))
    for limit in (1, 3, 6):
        got, listed = planned(limit, f"limit-{limit}")
        assert got == everything[:limit]
        assert len(listed) < len(all_listed) - 2, (limit, listed)  # the later sub-prefixes unlisted
