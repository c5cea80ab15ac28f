"""A quiet console: library warnings go to the rows' decode_note (counted in the summary), Ray's
own lines stay off unless --verbose; the console shows dmx's lines only."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def _jpeg(path: Path, seed: int) -> bytes:
    rgb = (np.random.default_rng(seed).random((48, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(path, quality=90)
    return path.read_bytes()


@pytest.fixture(scope="module")
def broken_dir(photo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two good photos and files every library complains about in its own way."""
    d = tmp_path_factory.mktemp("broken")
    for name in ("chelsea_420.jpg", "coffee_420.jpg"):
        shutil.copy(photo_dir / name, d / name)
    data = _jpeg(d / "tmp.jpg", 1)
    (d / "tmp.jpg").unlink()
    # libjpeg: "Corrupt JPEG data: N extraneous bytes before marker 0xd9" (OpenCV prints it from C)
    sos = data.index(b"\xff\xda")
    (d / "extraneous.jpg").write_bytes(data[:sos] + b"\x01\x02\x03\x04\x05" + data[sos:])
    # Pillow: "Corrupt EXIF data. Expecting to read 12 bytes but only got 8." (a UserWarning)
    exif = b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x05\x00\x0f\x01\x02\x00\xff\x00\x00\x00"
    (d / "bad_exif.jpg").write_bytes(data[:2] + b"\xff\xe1" + (len(exif) + 2).to_bytes(2, "big")
                                     + exif + data[2:])
    (d / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (d / "not_an_image.jpg").write_text("text, not a JPEG")
    return d


def _dmx(args: list[str], env_cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DMX_CACHE": str(env_cache), "PYTHONPATH": str(REPO)}
    env.pop("DMX_VERBOSE", None)
    return subprocess.run([sys.executable, "-m", "dmx", *args], capture_output=True, text=True,
                          env=env, timeout=600, cwd=REPO)


def test_a_ray_sweep_over_broken_files_prints_dmx_lines_only(broken_dir: Path, tmp_path: Path,
                                                             private_cache: Path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"name: quiet\ndataset: {{path: {broken_dir}}}\nmodel: tiny\n"
                    "axes: {decoder: [pil, opencv], threads: [1]}\n")
    out = tmp_path / "run"
    res = _dmx(["run", str(spec), "--out", str(out), "--executor", "ray", "--workers", "1"],
               private_cache)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [ln for ln in (res.stdout + res.stderr).replace("\r", "\n").splitlines() if ln.strip()]
    assert lines and all(ln.startswith("dmx") for ln in lines), "\n".join(lines)
    assert any("decodes raised library warnings" in ln for ln in lines)
    assert any(re.search(r"on ray \(1 worker, up in \d+\.\d s\)", ln) for ln in lines), lines
    notes = dict(duckdb.connect().execute(
        f"SELECT decoder || ' ' || i.path, any_value(r.decode_note) FROM read_parquet('{out}/rows/*/*.parquet') r "
        f"JOIN read_parquet('{out}/images.parquet') i USING (image_id) GROUP BY ALL").fetchall())
    assert "Corrupt JPEG data" in str(notes[f"opencv {broken_dir / 'extraneous.jpg'}"])
    assert "Corrupt EXIF data" in str(notes[f"pil {broken_dir / 'bad_exif.jpg'}"])
