"""Shared fixtures: real JPEGs made by real encoders, a private dmx cache, one Ray session."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# dmx's subpackages are dmx.runner, dmx.matrix, dmx.results, dmx.analysis. The repo root on
# sys.path (``python -m pytest`` puts it there) would make this checkout's runner/ importable as a
# top-level ``runner`` too: a second copy of every module (two registries, classes that are not
# each other's). Refuse it, naming the import to write; same-named PyPI packages stay importable.
class _NoTopLevelSubpackages:
    @staticmethod
    def find_spec(fullname, path=None, target=None):
        if path is None and fullname in ("runner", "matrix", "results", "analysis"):
            import importlib.machinery
            spec = importlib.machinery.PathFinder.find_spec(fullname)
            here = Path(__file__).resolve().parents[1]
            if spec and spec.origin and Path(spec.origin).resolve().parent.parent == here:
                raise ImportError(f"import dmx.{fullname}, not {fullname}: {fullname}/ is "
                                  f"dmx's subpackage (pyproject.toml's package-dir)")
        return None


sys.meta_path.insert(0, _NoTopLevelSubpackages)

import dmx.runner.backends  # noqa: F401  (the backends register their axes, as dmx's CLI does)


# The slow tests, marked here so that `pytest -m "not slow"` is a loop of a couple of minutes; the
# README's test command and CI (.ci/run) run everything. Seconds are one run's on 2 cores
# (2026-12-02); the whole suite took ~600 s of test time.
SLOW_FILES = {
    "test_cluster.py": "Ray clusters started per test (117 s)",
    "test_faults.py": "killed Ray workers, raylets and drivers, an attached cluster (169 s)",
    "test_torch_compile.py": "torch.compile with Inductor (21 s)",
    "test_envs.py": "uv environments: a build is seconds with uv's cache warm, a download cold",
    "test_console.py": "a Ray sweep in a subprocess (12 s)",
    "test_isolated_cluster.py": "Ray nodes in their own mount and pid namespaces",
    "test_jobs.py": "a Ray head with its job server",
    "test_slurm.py": "a Slurm cluster started by the test",
    "test_io_faults.py": "moto S3 behind a fault-injecting proxy (75 s)",
    "test_planning.py": "listings of 20,000 and 200,000 images (27 s)",
    "test_worker_sizing.py": "a Ray cluster in a subprocess",
    "test_resume_identity.py": "six dmx runs in subprocesses",
}
SLOW_TESTS = {
    "test_report_renders_in_headless_chromium": "Chromium",
    "test_ray_processes_killed_mid_run_are_one_line_with_the_resume_command": "Ray run (65 s)",
    "test_ray_workers_read_images_from_s3_themselves": "Ray run (18 s)",
    "test_ray_run_gives_the_same_rows_as_the_local_run": "Ray run",
    "test_memory_stays_flat_with_depth": "fresh processes localizing 400-tensor chains (19 s)",
    "test_demo_keeps_a_users_files_in_out_run_and_runs_beside_them": "two demo runs (16 s)",
}
SLOW_FIXTURES = {"ray_session": "an embedded Ray (ray.init 6-12 s)",
                 "s3": "a moto S3 server and runs through it (test_object_storage: 25 s)"}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: clusters, Ray runs, uv environments, Chromium, "
                                       "torch.compile, an S3 server; deselect with -m 'not slow'")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        why = (SLOW_FILES.get(item.path.name)
               or SLOW_TESTS.get(getattr(item, "originalname", item.name))
               or next((SLOW_FIXTURES[f] for f in getattr(item, "fixturenames", ())
                        if f in SLOW_FIXTURES), None))
        if why:
            item.add_marker(pytest.mark.slow(reason=why))


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Conversions cached under a session temp dir, so tests never touch ~/.cache/dmx."""
    path = tmp_path_factory.mktemp("dmx-cache")
    os.environ["DMX_CACHE"] = str(path)
    return path


def _photo(name: str) -> np.ndarray:
    """A real photograph shipped with scikit-image (RGB uint8)."""
    import skimage.data
    img = getattr(skimage.data, name)()
    return img if img.ndim == 3 else np.stack([img] * 3, axis=-1)


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Small real JPEGs: photos at 4:2:0 and 4:4:4, an EXIF-rotated one, and three bad files."""
    d = tmp_path_factory.mktemp("photos")
    chelsea = Image.fromarray(_photo("chelsea")).resize((150, 100))
    coffee = Image.fromarray(_photo("coffee")).resize((120, 80))
    chelsea.save(d / "chelsea_420.jpg", quality=90, subsampling=2)
    chelsea.save(d / "chelsea_444.jpg", quality=90, subsampling=0)
    coffee.save(d / "coffee_420.jpg", quality=90, subsampling=2)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    coffee.transpose(Image.Transpose.ROTATE_90).save(d / "coffee_exif6.jpg", quality=90, exif=exif)
    bad = d / "bad"
    bad.mkdir()
    data = (d / "chelsea_420.jpg").read_bytes()
    (bad / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "not_an_image.jpg").write_text("this is text, not a JPEG")
    return d


@pytest.fixture(scope="session")
def ray_session():
    """One embedded Ray for the whole test session (ray.init costs 6-12 s here)."""
    from dmx.runner.executors import ray_init
    ray_init(None, 2)
    import ray
    yield ray
    ray.shutdown()


def stop_process_group(proc, grace_s: float = 3.0) -> None:
    """Stop a `ray start --block` head started in its own process group: SIGTERM, then SIGKILL
    for the whole group after ``grace_s`` (Ray's graceful stop of a head took ~30 s here)."""
    import signal
    import subprocess
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
