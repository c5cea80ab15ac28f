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
    import torch  # noqa: F401 - imported before the count (as the rest of the suite has it),
    # not during the run: the driver imports it in a thread, and its objects are no decode
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


def test_the_remembered_headers_are_bounded_in_images_and_bytes_and_spare_a_parse(monkeypatch):
    from dmx.runner.decoders import base
    base.forget_headers()
    parses = []
    monkeypatch.setattr(base, "parse_source_header", lambda data: parses.append(1) or ("RGB", None))
    monkeypatch.setattr(base, "_MEMO_BYTES", 10_000)
    files = [bytes([i]) * 3000 for i in range(200)]          # 3 KB each: 3 fit in the bound
    for i, data in enumerate(files):
        base.remember_header(data, ("L", i))
        assert len(base._memo) <= base._MEMO_IMAGES
        assert base._memo_bytes[0] == sum(len(v[0]) for v in base._memo.values()) <= 10_000
    assert base.source_header(files[-1]) == ("L", 199) and not parses   # remembered: no parse
    assert base.source_header(files[0]) == ("RGB", None) and parses == [1]   # forgotten: parsed
    huge = b"x" * 50_000                                      # past the bound alone: still kept
    base.remember_header(huge, ("RGB", 1))
    assert list(base._memo) == [id(huge)] and base.source_header(huge) == ("RGB", 1)
    base.forget_headers()
    assert not base._memo and base._memo_bytes[0] == 0


def test_the_rows_are_the_same_whatever_the_size_of_the_header_groups(photo_dir, tmp_path,
                                                                      monkeypatch):
    import duckdb

    from dmx.runner import worker
    spec = parse_spec({"name": "groups", "dataset": {"path": str(photo_dir)}, "model": "tiny",
                       "axes": {"decoder": ["pil", "opencv"], "exif": ["apply", "ignore"],
                                "resize": ["pil-bilinear", "cv2-area"]}})
    cols = ("cell_id, image_id, status, error, decoded_h, decoded_w, decode_note, px_max_abs, "
            "out_digest, top5")

    def rows(out):
        run_spec(spec, RunOptions(out=str(out), executor="local", progress=False))
        return (duckdb.sql(f"SELECT {cols} FROM read_parquet('{out}/rows/**/*.parquet') "
                           "ORDER BY cell_id, image_id").fetchall(),
                duckdb.sql(f"SELECT * EXCLUDE (path) FROM read_parquet('{out}/images*.parquet') "
                           "ORDER BY image_id").fetchall())

    grouped = rows(tmp_path / "grouped")
    monkeypatch.setattr(worker, "GROUP_IMAGES", 1)            # image by image, as before
    assert rows(tmp_path / "one") == grouped
    monkeypatch.setattr(worker, "GROUP_IMAGES", 3)
    monkeypatch.setattr(worker, "GROUP_BYTES", 1)            # by bytes: one image per group
    assert rows(tmp_path / "bytes") == grouped
    assert len(grouped[0]) > 8 and any(r[2] == "ok" for r in grouped[0])
