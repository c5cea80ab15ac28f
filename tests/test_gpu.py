"""The device axis: CUDA cells run where a GPU is, and are skipped with a reason where none is."""
from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pytest
import torch

from dmx.matrix import expand, parse_spec
from dmx.runner.sweep import RunOptions, run_spec

SPEC = {"name": "gpu", "model": "tiny",
        "axes": {"backend": ["torch", "onnxruntime"], "device": ["cpu", "cuda"], "tf32": ["on", "off"]},
        "reference": {"backend": "torch", "device": "cpu"}}


def test_tf32_applies_only_to_torch_on_cuda_and_yaml_booleans_mean_on_off():
    spec = parse_spec({**SPEC, "dataset": {"path": "."},
                       "axes": {**SPEC["axes"], "tf32": [True, False]}})
    labels = sorted(c.label() for c in expand(spec))
    assert labels == sorted([
        "backend=torch device=cpu", "backend=torch device=cuda tf32=on",
        "backend=torch device=cuda tf32=off", "backend=onnxruntime device=cpu",
        "backend=onnxruntime device=cuda"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: cuda cells run")
def test_without_a_gpu_cuda_cells_are_skipped_with_the_reason_and_the_run_completes(
        photo_dir: Path, tmp_path: Path):
    spec = parse_spec({**SPEC, "dataset": {"path": str(photo_dir)}})
    out = tmp_path / "run"
    s = run_spec(spec, RunOptions(out=str(out), executor="local", progress=False))
    cells = duckdb.connect().execute(
        f"SELECT label, status, skip_reason FROM read_parquet('{out}/cells.parquet')").fetchall()
    skipped = {label: reason for label, status, reason in cells if status == "skipped"}
    assert set(skipped) == {"backend=torch device=cuda tf32=on", "backend=torch device=cuda tf32=off",
                            "backend=onnxruntime device=cuda"}
    assert all("cuda" in r.lower() for r in skipped.values())
    assert s.skipped_cells == 3 and s.rows == 5 * 7
    gpu = json.loads((out / "manifest.json").read_text())["environment"]["gpu"]
    assert gpu["available"] is False


def test_a_worker_that_runs_no_torch_cell_on_a_machine_without_a_gpu_driver_never_imports_torch():
    import os
    import subprocess
    import sys

    from dmx.results.environment import _GPU_NODES
    if any(os.path.exists(p) for p in _GPU_NODES):
        pytest.skip("this machine has a GPU driver: torch is asked about it")
    code = """
import sys
from dmx.runner.worker import Worker, node_environment
env = node_environment()
assert env["gpu"]["available"] is False, env["gpu"]
assert "torch" not in sys.modules, "the environment's GPU facts imported torch"
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
