"""A worker keeps one full-resolution decode alive at a time, not a chunk's worth."""
from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
from PIL import Image

from dmx.matrix import parse_spec
from dmx.runner.sweep import RunOptions, run_spec


def test_a_chunk_of_large_photos_never_holds_more_than_a_few_decodes(tmp_path: Path):
    import skimage.data
    images = tmp_path / "big"
    images.mkdir()
    w, h = 2000, 1500                                   # 9 MB per decoded RGB image
    for i, name in enumerate(["chelsea", "coffee", "astronaut", "rocket"] * 2):
        Image.fromarray(getattr(skimage.data, name)()).resize((w, h)).save(
            images / f"{i}.jpg", quality=85)
    spec = parse_spec({"name": "mem", "dataset": {"path": str(images)}, "model": "tiny",
                       "axes": {"decoder": ["pil", "opencv"], "exif": ["apply", "ignore"],
                                "resize": ["pil-bilinear", "cv2-area"], "backend": ["torch"]}})
    tracemalloc.start()
    try:
        run_spec(spec, RunOptions(out=str(tmp_path / "run"), executor="local", chunk_size=8,
                                  progress=False))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    one_decode = w * h * 3
    # 8 images x 4 decode variants held at once would be 32 decodes (288 MB)
    assert peak < 6 * one_decode, (peak / one_decode, np.round(peak / 2**20))
