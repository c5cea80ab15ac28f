"""`ray job submit -- dmx run ...` against a real Ray head's job server (the dashboard and its
agent on), dataset and run directory on moto's S3 server: how batch users run dmx on a Ray
cluster without a driver of their own on the head node."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cluster_nodes import BUCKET, RAY, Head, clean_env, moto_s3, s3_keys, upload_dir

pytestmark = pytest.mark.slow(reason="a Ray head with its job server and jobs through it (~40 s)")

N_IMAGES = 6


@pytest.fixture(scope="module")
def s3():
    try:
        with moto_s3() as (fs, env):
            yield fs, env
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def job_head():
    """A head with one CPU, the dashboard and the job server; it holds no S3 credentials (the
    job brings them in its runtime environment)."""
    import importlib.util
    if not all(importlib.util.find_spec(m) for m in ("aiohttp", "aiohttp_cors", "opencensus")):
        pytest.skip("Ray's dashboard and job server need ray[default] (pip install 'ray[default]')")
    head = Head(clean_env(), dashboard=True, num_cpus=1)
    try:
        head.wait_nodes(1)
        yield head
    finally:
        head.stop()


def submit(head: Head, workdir: Path, runtime_env: dict, *entrypoint: str,
           timeout: int = 300) -> subprocess.CompletedProcess:
    env = clean_env()
    env.pop("RAY_AUTH_MODE")
    cmd = [RAY, "job", "submit", "--address", head.job_address, "--working-dir", str(workdir),
           "--runtime-env-json", json.dumps(runtime_env), "--", *entrypoint]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def test_ray_job_submit_runs_dmx_and_writes_the_run_to_s3(s3, job_head: Head, photo_dir: Path,
                                                          tmp_path: Path):
    fs, aws = s3
    photos = tmp_path / "photos"
    photos.mkdir()
    good = sorted(photo_dir.glob("*.jpg"))
    for i in range(N_IMAGES):
        shutil.copy(good[i % len(good)], photos / f"img{i}.jpg")
    upload_dir(fs, photos, "jobs/photos")
    work = tmp_path / "job"
    work.mkdir()
    (work / "spec.yaml").write_text(
        f"name: job\ndataset: {{path: 's3://{BUCKET}/jobs/photos'}}\nmodel: tiny\n"
        "axes: {decoder: [pil, opencv], backend: [torch, onnxruntime]}\n")
    out = f"s3://{BUCKET}/jobs/run"
    r = submit(job_head, work, {"env_vars": {**aws, "DMX_CACHE": str(tmp_path / "job-cache")}},
               sys.executable, "-m", "dmx", "run", "spec.yaml", "--out", out)
    log = r.stdout + r.stderr
    print(log[-4000:])
    assert r.returncode == 0, log[-3000:]
    assert "succeeded" in log.lower()
    keys = s3_keys(fs, "jobs/run")
    assert "manifest.json" in keys and any(k.startswith("rows/") for k in keys)
    with fs.open_input_stream(f"{BUCKET}/jobs/run/manifest.json") as f:
        m = json.loads(f.read())
    assert m["status"] == "complete" and m["images"] == N_IMAGES
    assert m["counters"]["images"] == N_IMAGES
    assert m["executor"]["name"] == "ray" and m["ray"].startswith("cluster")   # the job's cluster


def test_a_job_whose_spec_is_wrong_fails_with_dmx_one_line(job_head: Head, tmp_path: Path):
    work = tmp_path / "job"
    work.mkdir()
    (work / "spec.yaml").write_text("name: bad\ndataset: {path: /nowhere}\nmodel: tiny\n"
                                    "axes: {decoder: [pil, no-such-decoder]}\n")
    r = submit(job_head, work, {}, sys.executable, "-m", "dmx", "run", "spec.yaml", "--out",
               str(tmp_path / "run"), timeout=180)
    log = r.stdout + r.stderr
    assert r.returncode != 0
    assert "no-such-decoder" in log and "Traceback" not in log, log[-2000:]
