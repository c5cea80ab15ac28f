"""The torch-compile backend (one module, runner/backends/torch_compile.py): Inductor's outputs
next to eager's, its compile recorded like a conversion and cached across runs."""
from __future__ import annotations

import json
import os
from pathlib import Path

import duckdb
import pytest

from dmx.matrix import parse_spec
from dmx.matrix.axes import AXES
from dmx.runner.sweep import RunOptions, run_spec

SPEC = {"name": "compile", "model": "tiny",
        "axes": {"backend": ["torch", "torch-compile"], "threads": [1], "batch": [4]},
        "reference": {"backend": "torch"}}


@pytest.fixture(scope="module")
def two_runs(photo_dir: Path, tmp_path_factory) -> tuple[Path, Path]:
    """The same spec run twice: the first compiles, the second finds the compile cached."""
    root = tmp_path_factory.mktemp("compile")
    spec = parse_spec({**SPEC, "dataset": {"path": str(photo_dir)}})
    for name in ("first", "second"):
        run_spec(spec, RunOptions(out=str(root / name), executor="local", progress=False))
    return root / "first", root / "second"


def test_torch_compile_registers_itself_and_its_axis():
    assert "torch-compile" in AXES["backend"].levels
    assert AXES["compile_mode"].applies({"backend": "torch-compile"})
    assert not AXES["compile_mode"].applies({"backend": "torch"})


def test_compiled_model_agrees_with_eager_to_rounding(two_runs):
    first, _ = two_runs
    rows = duckdb.connect().execute(
        f"SELECT c.status, count(*), max(r.out_max_abs), bool_and(r.top1_agree), "
        f"any_value(r.precision_effective) FROM read_parquet('{first}/cells.parquet') c "
        f"JOIN read_parquet('{first}/rows/*/*.parquet') r USING (cell_id) "
        f"WHERE c.backend = 'torch-compile' AND r.status = 'ok' GROUP BY ALL").fetchall()
    assert len(rows) == 1
    status, n, max_abs, agree, eff = rows[0]
    assert status == "ok" and n == 4 and eff == "fp32"   # the four decodable photos
    assert max_abs < 1e-3 and agree


def test_compile_is_recorded_like_a_conversion_and_cached_across_runs(two_runs, private_cache: Path):
    first, second = (json.loads((p / "manifest.json").read_text()) for p in two_runs)
    key = "inductor:default:cpu:fp32:b4"
    assert first["model"]["conversion"][key]["cached"] is False
    assert first["model"]["conversion"][key]["seconds"] > 0
    assert second["model"]["conversion"][key]["cached"] is True
    cache = Path(first["model"]["conversion"][key]["inductor_cache"])
    assert cache.is_relative_to(private_cache) and any(cache.iterdir())
    info = next(v for v in second["backends"].values() if v["backend"] == "torch-compile")
    assert info["properties"]["inductor_cache_hit"] is True
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(cache)


@pytest.mark.slow
def test_a_node_without_the_drivers_inductor_cache_loads_the_shipped_compile(
        two_runs, private_cache: Path, photo_dir: Path, tmp_path: Path):
    """A worker node holds the product the driver published (fetched into its own cache) and
    nothing else of the driver's: no Inductor cache. Its workers load the compile from the
    product and compile nothing (before: the product named the driver's cache folder, and each
    node compiled from scratch)."""
    import shutil
    import subprocess
    import sys
    product = next((private_cache / "models").glob("*/inductor-cache.bin"))
    assert product.stat().st_size > 0          # Inductor's portable cache, not a folder's name
    node = tmp_path / "node-cache"
    shutil.copytree(product.parent, node / "models" / product.parent.name)
    assert not (node / "inductor").exists()
    spec = tmp_path / "spec.yaml"
    spec.write_text(json.dumps({**SPEC, "dataset": {"path": str(photo_dir)}}))
    out = tmp_path / "node-run"
    env = {**os.environ, "DMX_CACHE": str(node)}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    r = subprocess.run([sys.executable, "-m", "dmx", "run", str(spec), "--out", str(out),
                        "--executor", "local"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["model"]["conversion"]["inductor:default:cpu:fp32:b4"]["cached"] is True
    info = next(v for v in m["backends"].values() if v["backend"] == "torch-compile")
    assert info["properties"]["inductor_cache"] == str(node / "inductor")
    assert info["properties"]["inductor_cache_hit"] is True
