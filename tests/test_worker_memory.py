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


def test_equal_decodes_share_their_inputs_and_the_rows_are_those_of_separate_inputs(
        photo_dir, tmp_path, monkeypatch):
    """Pillow's and OpenCV's decodes of an ordinary JPEG are equal, so the later one shares the
    earlier one's preprocessed inputs; a CMYK JPEG (they differ by one) and EXIF applied or not
    (a rotated photo) decode differently and are preprocessed again. Every row but the timings
    is the same as when nothing is shared (``SHARE_KEEP_BYTES`` 0), including input divergence
    of fractional pixels (a torch resize) taken over from another cell's equal input."""
    import json
    import shutil

    import duckdb
    from PIL import Image

    from dmx.runner import worker
    d = tmp_path / "photos"
    shutil.copytree(photo_dir, d)
    Image.open(d / "chelsea_444.jpg").convert("CMYK").save(d / "cmyk.jpg", quality=90)
    spec = parse_spec({"name": "share", "dataset": {"path": str(d)}, "model": "tiny",
                       "axes": {"decoder": ["pil", "opencv"], "exif": ["apply", "ignore"],
                                "resize": ["pil-bilinear", "cv2-area", "torch-bilinear-aa"]}})
    timing = ("preprocess_ms", "decode_ms", "latency_ms", "run_id")

    def run(out):
        run_spec(spec, RunOptions(out=str(out), executor="local", progress=False))
        rows = duckdb.sql(f"SELECT * EXCLUDE ({', '.join(timing)}) FROM "
                          f"read_parquet('{out}/rows/**/*.parquet') ORDER BY cell_id, image_id")
        return rows.fetchall(), json.loads((out / "manifest.json").read_text())["counters"]

    shared, c = run(tmp_path / "shared")
    monkeypatch.setattr(worker, "SHARE_KEEP_BYTES", 0)
    alone, c0 = run(tmp_path / "alone")
    assert shared == alone and len(shared) == 8 * 12   # 8 files x 12 cells
    good = 5                                     # the 3 bad files decode in no variant
    assert c0["resizes"] == good * 4 * 3 and not c0.get("shared_resizes")
    assert c["resizes"] + c["shared_resizes"] == c0["resizes"]
    # 7 distinct decodes of the 5 photos: the 3 ordinary ones decode alike in all 4 variants;
    # the CMYK one differs between the libraries, the rotated one between EXIF applied or not
    assert c["resizes"] == 7 * 3 and c["decodes"] == c0["decodes"] == good * 4


def test_variants_whose_inputs_are_all_shared_share_their_columns_and_the_rows_stay(
        photo_dir, tmp_path, monkeypatch):
    """On ordinary JPEGs every OpenCV decode equals Pillow's, so OpenCV's preprocessing variants
    hold Pillow's inputs object for object and take their blocks of columns (``_twin``); the
    rows are those computed apart (``SHARE_KEEP_BYTES`` 0)."""
    import shutil

    import duckdb

    from dmx.runner import worker
    d = tmp_path / "ordinary"
    d.mkdir()
    for name in ("chelsea_420.jpg", "chelsea_444.jpg", "coffee_420.jpg"):
        shutil.copy(photo_dir / name, d / name)
    spec = parse_spec({"name": "twins", "dataset": {"path": str(d)}, "model": "tiny",
                       "axes": {"decoder": ["pil", "opencv"],
                                "resize": ["pil-bilinear", "torch-bilinear-aa"]}})
    twins = []
    real = worker._RowContext._twin

    def spy(self, pkey):
        t = real(self, pkey)
        twins.append(t != pkey)
        return t

    monkeypatch.setattr(worker._RowContext, "_twin", spy)

    def rows(out):
        run_spec(spec, RunOptions(out=str(out), executor="local", progress=False))
        return duckdb.sql(f"SELECT * EXCLUDE (preprocess_ms, decode_ms, latency_ms, run_id) FROM "
                          f"read_parquet('{out}/rows/**/*.parquet') ORDER BY cell_id, image_id").fetchall()

    shared = rows(tmp_path / "shared")
    assert any(twins)
    twins.clear()
    monkeypatch.setattr(worker, "SHARE_KEEP_BYTES", 0)
    alone = rows(tmp_path / "alone")
    assert not any(twins) and alone == shared and len(shared) == 3 * 4
