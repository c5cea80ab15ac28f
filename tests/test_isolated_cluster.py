"""A cluster whose worker nodes share nothing with the driver (issue 23).

Three Ray nodes on this machine: a head with no CPUs (the driver attaches to it) and two worker
nodes, each a `ray start` in its own mount and PID namespaces with private tmpfs over /tmp,
~/.cache and ~/.ray and over dmx's checkout (``cluster_nodes.IsolatedNode``). The dataset and
the run directory are on moto's S3 server, the only storage every node reaches. dmx is not
installed on the nodes: its packages arrive by the runtime environment; converted models
(the ONNX export the onnxruntime cells run) arrive through the run directory.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster_nodes import (BUCKET, REPO, Head, IsolatedNode, clean_env, moto_s3,
                           namespaces_permitted, s3_keys, upload_dir)

AXES = "{decoder: [pil, opencv], backend: [torch, onnxruntime]}"
N_IMAGES = 16

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="isolated nodes need root (mount namespaces)"),
              pytest.mark.slow(reason="a 3-node cluster of isolated nodes (~85 s)")]


@pytest.fixture(scope="module")
def s3():
    why = namespaces_permitted() if os.geteuid() == 0 else "not root"
    if why:
        pytest.skip(why)
    try:
        with moto_s3() as (fs, env):
            yield fs, env
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def photos(photo_dir: Path, s3, tmp_path_factory) -> str:
    """16 real JPEGs in S3 (copies of the photo fixtures under distinct names)."""
    fs, _ = s3
    d = tmp_path_factory.mktemp("iso-photos")
    good = sorted(photo_dir.glob("*.jpg"))
    for i in range(N_IMAGES):
        shutil.copy(good[i % len(good)], d / f"img{i:03d}.jpg")
    upload_dir(fs, d, "photos")
    return f"s3://{BUCKET}/photos"


@pytest.fixture(scope="module")
def cluster(s3, private_cache: Path, tmp_path_factory):
    """The head (no CPUs) and two isolated worker nodes with one CPU each."""
    _, aws = s3
    logs = tmp_path_factory.mktemp("node-logs")
    head = Head(clean_env(**aws))
    # what a node must never see: dmx's source, the driver's cache, this test's files
    hidden = [str(REPO / "runner"), str(private_cache), str(Path.home() / ".cache" / "dmx"),
              str(logs)]
    nodes = [IsolatedNode(head.address, clean_env(**aws), hidden, log=logs / f"node{i}.log")
             for i in range(2)]
    try:
        head.wait_nodes(3)
        yield head, nodes, hidden, logs
    finally:
        for n in nodes:
            n.stop()
        head.stop()


def dmx_run(tmp: Path, dataset: str, out: str, address: str, aws: dict, *extra: str,
            wait: bool = True, axes: str = AXES):
    spec = tmp / "spec.yaml"
    spec.write_text(f"name: isolated\ndataset: {{path: {dataset}}}\nmodel: tiny\naxes: {axes}\n")
    cmd = [sys.executable, "-m", "dmx", "run", str(spec), "--out", out, "--address", address,
           *extra]
    env = clean_env(**aws, DMX_CACHE=str(tmp / "driver-cache"))
    env.pop("RAY_AUTH_MODE")
    if not wait:
        return subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def run_rows(fs, out: str, columns: tuple[str, ...] = (
        "cell_id", "image_id", "status", "error_stage", "error", "node")) -> list[tuple]:
    import pyarrow.dataset as ds
    prefix = out.split("://", 1)[1]
    table = ds.dataset(f"{prefix}/rows", filesystem=fs, format="parquet",
                       partitioning="hive").to_table(columns=list(columns))
    return list(zip(*(table[c].to_pylist() for c in table.column_names)))


def manifest(fs, out: str) -> dict:
    with fs.open_input_stream(out.split("://", 1)[1] + "/manifest.json") as f:
        return json.loads(f.read())


def worker_labels(head: Head) -> set[str]:
    """The ``node`` labels (host/first 8 hex of the node id) of the non-head nodes."""
    import platform
    return {f"{platform.node()}/{n['NodeID'][:8]}" for n in head.wait_nodes(3)
            if not n["Resources"].get("node:__internal_head__")}


def test_a_run_on_nodes_that_share_nothing_completes_on_the_worker_nodes(
        s3, photos: str, cluster, tmp_path: Path):
    fs, aws = s3
    head, nodes, hidden, _ = cluster
    for n in nodes:
        assert "dmx-node: isolated" in n.output()        # none of ``hidden`` exists there
    out = f"s3://{BUCKET}/runs/isolated"
    r = dmx_run(tmp_path, photos, out, head.address, aws, "--chunk-size", "2")
    print(r.stderr)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = run_rows(fs, out)
    pairs = {(c, i) for c, i, *_ in rows}
    assert len(rows) == len(pairs) == 4 * N_IMAGES       # every (cell, image) exactly once
    errors = [(s, st, e) for _, _, s, st, e, _ in rows if s != "ok"]
    assert not errors, errors[:3]                       # every model built on the bare nodes
    assert {n for *_, n in rows} <= worker_labels(head)  # no row from the head or the driver
    m = manifest(fs, out)
    assert set(m["nodes"]) <= worker_labels(head)
    published = m["model"]["artifacts"]
    assert published and all(p["location"].startswith(f"{out}/artifacts/") for p in published.values())
    for env in m["nodes"].values():                     # the driver's dmx, by its code digest
        assert env["dmx_code"] == m["environment"]["dmx_code"]
    assert not m.get("version_mismatches")
    assert m["runtime_env"].split(";")[0] == "py_modules dmx"   # one package: dmx.runner, ... inside
    print({k: v["files"] for k, v in published.items()}, sorted(m["nodes"]), sorted({n for *_, n in rows}))


def test_a_node_killed_mid_run_loses_nothing_and_quarantines_nothing(
        s3, photos: str, cluster, tmp_path: Path):
    fs, aws = s3
    head, nodes, hidden, logs = cluster
    out = f"s3://{BUCKET}/runs/killed"
    proc = dmx_run(tmp_path, photos, out, head.address, aws, "--chunk-size", "1", wait=False)
    deadline = time.time() + 300
    while (sum(k.startswith("rows/") for k in s3_keys(fs, "runs/killed")) < 2
           and time.time() < deadline and proc.poll() is None):
        time.sleep(0.2)
    nodes[0].kill()                                     # preempted: every process at once
    replacement = IsolatedNode(head.address, clean_env(**aws), hidden, log=logs / "node-new.log")
    nodes[0] = replacement                              # the fixture stops it
    _, err = proc.communicate(timeout=600)
    print(err)
    assert proc.returncode == 0, err[-3000:]
    rows = run_rows(fs, out)
    assert len(rows) == len({(c, i) for c, i, *_ in rows}) == 4 * N_IMAGES
    crashed = [r for r in rows if r[3] == "worker-crash"]
    assert not crashed, crashed[:3]                     # a lost node is no image's fault
    assert all(s == "ok" for _, _, s, *_ in rows)


def test_a_local_dataset_the_nodes_cannot_read_is_one_line_naming_the_node(
        s3, cluster, photo_dir: Path, tmp_path: Path):
    """Before: every image of every chunk became a `read` error row on the nodes."""
    _, aws = s3
    head, *_ = cluster
    r = dmx_run(tmp_path, str(photo_dir), f"s3://{BUCKET}/runs/local-dataset", head.address, aws)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("dmx: error")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert str(photo_dir) in lines[0] and "cannot read" in lines[0]
    assert any(label in lines[0] for label in worker_labels(head))


def test_without_a_runtime_env_bare_nodes_cannot_start_a_worker_and_dmx_says_why(
        s3, photos: str, cluster, tmp_path: Path):
    _, aws = s3
    head, *_ = cluster
    r = dmx_run(tmp_path, photos, f"s3://{BUCKET}/runs/no-env", head.address, aws,
                "--runtime-env", "none")
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("dmx: error")]
    assert len(lines) == 1 and "No module named" in lines[0] and "--runtime-env" in lines[0], r.stderr[-2000:]


PIN = "pillow==9.4.0"          # as tests/test_envs.py: a manylinux wheel for CPython 3.11
PINNED = f"pil[{PIN}]"         # the decoder level's label, as the rows' ``decoder`` names it
#: what uv or the env builder prints when there is no uv or no package index to reach
NO_INDEX = ("uv is not installed", "failed to fetch", "error sending request", "dns error",
            "connection refused", "network is unreachable", "did not finish within")


def env_json_on(node: IsolatedNode, key: str) -> Path:
    """``env.json`` of env ``key`` in the node's own dmx cache (``~/.cache/dmx``, a tmpfs of its
    mount namespace), read from outside through /proc/<pid>/root, which resolves paths in the
    mount namespace of that process."""
    return Path(f"/proc/{node.proc.pid}/root") / Path.home().relative_to("/") / ".cache" / \
        "dmx" / "envs" / key / "env.json"


@pytest.mark.slow(reason="a uv environment built on each isolated node, from the package index")
def test_a_decoder_package_version_is_built_on_the_worker_nodes_not_on_the_driver(
        s3, photos: str, cluster, tmp_path: Path):
    import PIL

    from dmx.runner.decoders.isolated import requirements_for
    from dmx.runner.envs import env_key
    pytest.importorskip("uv", reason="uv builds the environments (pip install uv)")
    fs, aws = s3
    head, nodes, _, _ = cluster
    key = env_key(requirements_for(PINNED))
    driver_envs = tmp_path / "driver-cache" / "envs"     # dmx_run's DMX_CACHE for the driver
    out = f"s3://{BUCKET}/runs/pinned-decoder"
    r = dmx_run(tmp_path, photos, out, head.address, aws, "--chunk-size", "2",
                axes=f'{{decoder: [pil, {{name: pil, package: "{PIN}"}}], backend: [torch]}}')
    print(r.stderr)
    rows = run_rows(fs, out, ("decoder", "image_id", "status", "error", "decoder_version", "node")
                    ) if r.returncode == 0 else []
    build_errors = [e for e in [r.stderr if r.returncode else "", *(e for *_, e, _, _ in rows)]
                    if e and "cannot build a Python environment" in e]
    if any(m in e.lower() for e in build_errors for m in NO_INDEX):
        pytest.skip(f"no uv or no package index for {PIN}: {build_errors[0][-500:]}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(rows) == 2 * N_IMAGES
    pinned = [(s, e, v) for d, _, s, e, v, _ in rows if d == PINNED]
    assert len(pinned) == N_IMAGES
    assert all(s == "ok" for s, _, _ in pinned), pinned[:3]          # no env-build error rows
    assert {v for *_, v in pinned} == {"pillow 9.4.0"}               # the pinned Pillow ran
    assert {v for d, *_, v, _ in rows if d == "pil"} == {f"pillow {PIL.__version__}"}
    ran_on = {n for *_, n in rows}
    assert ran_on <= worker_labels(head)                 # no row from the head or the driver
    # every node that ran rows built the env in its own cache (a tmpfs the driver never sees)
    built = [json.loads(p.read_text()) for n in nodes if (p := env_json_on(n, key)).is_file()]
    assert len(built) >= len(ran_on), [str(env_json_on(n, key)) for n in nodes]
    assert all(b["versions"]["pillow"] == "9.4.0" for b in built)
    print({"built on nodes": [(b["built_at"], b["build_s"]) for b in built], "rows from": ran_on})
    # and the driver built nothing: the package version is the nodes' business
    on_driver = sorted(p.name for p in driver_envs.glob("*")) if driver_envs.is_dir() else []
    assert key not in on_driver, f"the driver built {PIN} in {driver_envs}: {on_driver}"
