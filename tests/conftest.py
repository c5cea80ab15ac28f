"""Shared fixtures: real JPEGs made by real encoders, a private dmx cache, one Ray session."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import runner.backends  # noqa: F401  (the backends register their axes, as dmx's CLI does)


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
    from runner.executors import ray_init
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
