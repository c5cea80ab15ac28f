"""Runs on a multi-node Ray cluster on this machine (``ray.cluster_utils.Cluster``): the whole
cluster used, GPU work placed on GPU nodes, workers writing their own part files, nodes on
record, a node lost mid-run."""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from dmx.matrix import parse_spec
from dmx.runner.executors import RayExecutor
from dmx.runner.sweep import RunOptions, run_spec
from conftest import stop_process_group

AXES = "{decoder: [pil, opencv], resize: [pil-bilinear, cv2-linear], backend: [torch]}"


@contextlib.contextmanager
def without_ray_auth():
    """Nodes started meanwhile run as a plain `ray start` would: without the auth settings an
    embedded session of this test process (another module's) put in its environment, which
    would otherwise put them in token mode, and ``dmx_run`` does not pass on."""
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("RAY_AUTH")}
    try:
        yield
    finally:
        os.environ.update(saved)


@pytest.fixture(scope="module")
def cluster():
    """A head with 1 CPU and a second node with 2 CPUs, as `ray start` would make them; this
    test process does not connect to it (dmx runs attach with --address)."""
    from ray.cluster_utils import Cluster
    with without_ray_auth():
        c = Cluster(initialize_head=True, connect=False,
                    head_node_args={"num_cpus": 1, "include_dashboard": False})
        c.second = c.add_node(num_cpus=2)
    yield c
    c.shutdown()


@pytest.fixture(scope="module")
def photos(photo_dir: Path, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cluster-photos")
    good = sorted(photo_dir.glob("*.jpg"))
    for i in range(24):
        shutil.copy(good[i % len(good)], d / f"img{i:03d}.jpg")
    return d


def dmx_run(tmp: Path, images: Path, address: str, *extra: str, axes: str = AXES,
            wait: bool = True):
    spec = tmp / "spec.yaml"
    spec.write_text(f"name: cluster\ndataset: {{path: {images}}}\nmodel: tiny\naxes: {axes}\n")
    cmd = [sys.executable, "-m", "dmx", "run", str(spec), "--out", str(tmp / "run"),
           "--address", address, "--quiet", *extra]
    # without the auth settings an embedded session put in this process's environment
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    if not wait:
        return subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def rows(run: Path) -> list[tuple]:
    return duckdb.connect().execute(
        f"SELECT cell_id, image_id, node FROM read_parquet('{run}/rows/*/*.parquet')").fetchall()


def node_label(node) -> str:
    return f"{platform.node()}/{node.node_id[:8]}"


def test_default_workers_fill_every_cpu_of_the_cluster_and_rows_name_their_nodes(
        cluster, photos: Path, tmp_path: Path):
    r = dmx_run(tmp_path, photos, cluster.address, "--chunk-size", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert m["executor"]["workers"] == 3                 # 1 + 2 CPUs, not the driver's cpu_count
    got = rows(tmp_path / "run")
    assert len(got) == len({(c, i) for c, i, _ in got}) == 4 * 24
    nodes = {n for _, _, n in got}
    assert len(nodes) > 1                                # actors spread over both nodes
    assert nodes <= set(m["nodes"])                      # each node's environment is on record
    for env in m["nodes"].values():
        assert env["cpu"]["model"] and "packages" in env and "gpu" in env


def test_workers_cap_limits_the_pool(cluster, photos: Path, tmp_path: Path):
    r = dmx_run(tmp_path, photos, cluster.address, "--workers", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert m["executor"]["workers"] == 1


def test_cuda_cells_run_on_the_gpu_node_and_are_judged_there(cluster, photos: Path,
                                                             tmp_path: Path):
    """A node declaring one GPU (a fake resource: this machine has none). The driver has no
    CUDA, yet the actors ask for GPUs, land on that node, and the node - not the driver -
    decides the cuda cell cannot run (torch sees no real GPU there)."""
    with without_ray_auth():
        gpu_node = cluster.add_node(num_cpus=2, num_gpus=1)
    try:
        r = dmx_run(tmp_path, photos, cluster.address, "--gpus-per-worker", "0.5",
                    axes="{decoder: [pil, opencv], backend: [torch], device: [cpu, cuda]}")
        assert r.returncode == 0, r.stderr[-2000:]
        m = json.loads((tmp_path / "run" / "manifest.json").read_text())
        assert m["executor"]["workers"] == 2 and m["executor"]["gpus_per_worker"] == 0.5
        assert {n for _, _, n in rows(tmp_path / "run")} == {node_label(gpu_node)}
        assert list(m["nodes"]) == [node_label(gpu_node)]   # probed where the work runs
        assert all("no CUDA GPU visible to torch" in v for v in m["skipped_cells"].values())
    finally:
        cluster.remove_node(gpu_node)


@pytest.mark.skipif(not shutil.which("nvidia-smi"), reason="needs a real CUDA GPU")
def test_cuda_cells_run_on_a_real_gpu(photos: Path, tmp_path: Path):
    spec = parse_spec({"name": "gpu", "dataset": {"path": str(photos)}, "model": "tiny",
                       "axes": {"backend": ["torch"], "device": ["cpu", "cuda"]}})
    s = run_spec(spec, RunOptions(out=str(tmp_path / "run"), executor="ray", progress=False))
    assert s.skipped_cells == 0 and s.errors == 0


def test_workers_write_their_part_files_and_send_the_driver_small_summaries(
        photo_dir: Path, tmp_path: Path, ray_session, monkeypatch):
    seen = []
    run = RayExecutor.run

    def spy(self, plan, chunks, on_summary):
        def check(summary):
            seen.append((len(pickle.dumps(summary)), all(Path(f).is_file() for f in summary.files)))
            on_summary(summary)
        run(self, plan, chunks, check)

    monkeypatch.setattr(RayExecutor, "run", spy)
    spec = parse_spec({"name": "own", "dataset": {"path": str(photo_dir)}, "model": "tiny",
                       "axes": {"decoder": ["pil", "opencv"], "backend": ["torch", "onnxruntime"]}})
    run_spec(spec, RunOptions(out=str(tmp_path / "run"), executor="ray", workers=2, chunk_size=4,
                              progress=False))
    assert seen and all(exists for _, exists in seen)     # written before the driver hears of it
    assert max(size for size, _ in seen) < 16_000         # bytes: counts and names, not rows


def test_a_node_removed_mid_run_the_run_completes_with_every_pair_once(cluster, photos: Path,
                                                                        tmp_path: Path):
    proc = dmx_run(tmp_path, photos, cluster.address, "--chunk-size", "1", wait=False)
    deadline = time.time() + 300
    while (len(list((tmp_path / "run").glob("rows/*/*.parquet"))) < 3 and time.time() < deadline
           and proc.poll() is None):
        time.sleep(0.05)
    cluster.remove_node(cluster.second)                 # the 2-CPU node: two of three workers
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    got = rows(tmp_path / "run")
    assert len(got) == len({(c, i) for c, i, _ in got}) == 4 * 24


@pytest.fixture(scope="module")
def no_auth_head(tmp_path_factory):
    """`ray start --head` without token auth, in a HOME that holds ~/.ray/auth_token (as any
    earlier local Ray leaves behind). Its own process group, so stopping it spares other Rays."""
    home = tmp_path_factory.mktemp("home")
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text("a-token-this-cluster-does-not-use")
    ray_tmp = Path(__import__("tempfile").mkdtemp(prefix="dmxauth", dir="/tmp"))
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")},
           "HOME": str(home), "RAY_TMPDIR": str(ray_tmp), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    port = "6411"
    head = subprocess.Popen([str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
                             "--port", port, "--num-cpus", "1", "--include-dashboard=false",
                             "--disable-usage-stats"], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env.pop("RAY_AUTH_MODE")
    yield f"127.0.0.1:{port}", env
    stop_process_group(head)
    shutil.rmtree(ray_tmp, ignore_errors=True)


def _run_with_env(tmp: Path, images: Path, address: str, env: dict) -> subprocess.CompletedProcess:
    spec = tmp / "spec.yaml"
    spec.write_text(f"name: auth\ndataset: {{path: {images}}}\nmodel: tiny\naxes: {AXES}\n")
    return subprocess.run([sys.executable, "-m", "dmx", "run", str(spec), "--out", str(tmp / "run"),
                           "--address", address, "--quiet"], capture_output=True, text=True,
                          env=env, timeout=600)


def test_a_token_file_in_home_does_not_switch_a_no_auth_cluster_to_token_mode(
        no_auth_head, photo_dir: Path, tmp_path: Path):
    address, env = no_auth_head
    r = _run_with_env(tmp_path, photo_dir, address, env)
    assert r.returncode == 0, r.stderr[-2000:]


def test_an_auth_mismatch_is_one_line_naming_what_to_set(no_auth_head, photo_dir: Path,
                                                         tmp_path: Path):
    address, env = no_auth_head
    r = _run_with_env(tmp_path, photo_dir, address, {**env, "RAY_AUTH_MODE": "token"})
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    line = [ln for ln in r.stderr.splitlines() if ln.startswith("dmx: error")]
    assert len(line) == 1 and "RAY_AUTH_MODE" in line[0], r.stderr[-2000:]
