"""Every entry under a dataset is accounted for: a row per image, or a ``not_read`` line saying why.

Real files on disk: symlinks (to an image, dangling, in a loop, to a folder above), a FIFO, a
README, and the same photo as JPEG, PNG, GIF (animated: first frame), BMP, TIFF and WebP.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import duckdb
import numpy as np
import pytest
from PIL import Image

from dmx.cli import main
from dmx.matrix import DatasetSpec
import dmx.runner.dataset as dataset

FORMATS = {"photo.jpg": "JPEG", "photo.png": "PNG", "photo.bmp": "BMP", "photo.tiff": "TIFF",
           "photo.webp": "WEBP", "photo.gif": "GIF"}


@pytest.fixture(scope="module")
def hostile_dir(tmp_path_factory, photo_dir: Path) -> Path:
    d = tmp_path_factory.mktemp("hostile-files")
    img = Image.open(photo_dir / "chelsea_444.jpg").convert("RGB").resize((48, 32))
    for name, fmt in FORMATS.items():
        if fmt == "GIF":  # animated: the first frame is the image
            img.save(d / name, format=fmt, save_all=True,
                     append_images=[img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)])
        else:
            img.save(d / name, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    (d / "sub").mkdir()
    img.save(d / "sub" / "inner.png")
    os.symlink("photo.jpg", d / "again.jpg")             # a second name for an image
    os.symlink("missing.jpg", d / "dangling.jpg")        # points nowhere
    os.symlink("loop_b.jpg", d / "loop_a.jpg")           # a -> b -> a
    os.symlink("loop_a.jpg", d / "loop_b.jpg")
    os.symlink("..", d / "sub" / "up")                   # a folder loop
    os.mkfifo(d / "pipe.jpg")                            # not a regular file
    (d / "README.md").write_text("not an image")
    return d


EXPECTED_NOT_READ = {"again.jpg": "duplicate of photo.jpg", "dangling.jpg": "dangling symlink",
                     "loop_a.jpg": "symlink loop", "loop_b.jpg": "symlink loop",
                     "sub/up/": "symlink loop", "pipe.jpg": "not a regular file",
                     "README.md": "unsupported suffix .md"}


def test_listing_accounts_for_every_entry_and_reads_each_file_once(hostile_dir: Path):
    listing = dataset.scan_dataset(DatasetSpec(str(hostile_dir), None, "."))
    ids = [r.image_id for r in listing.images]
    assert ids == sorted(set(ids)) == sorted([*FORMATS, "sub/inner.png"])
    assert len({os.path.realpath(r.path) for r in listing.images}) == len(ids)
    got = {n.path: n.reason for n in listing.not_read}
    assert set(got) == set(EXPECTED_NOT_READ)
    for path, why in EXPECTED_NOT_READ.items():
        assert why in got[path], (path, got[path])
    # every entry of the folder tree is an image or a not_read line
    entries = {str(Path(root, n).relative_to(hostile_dir)) for root, dirs, files in
               os.walk(hostile_dir) for n in files + [d for d in dirs if os.path.islink(Path(root, d))]}
    accounted = set(ids) | {p.rstrip("/") for p in got}
    assert entries == accounted


def test_a_link_to_an_image_outside_the_dataset_keeps_the_name_given(tmp_path: Path, photo_dir: Path):
    d = tmp_path / "ds"
    d.mkdir()
    os.symlink(photo_dir / "coffee_420.jpg", d / "mine.jpg")
    listing = dataset.scan_dataset(DatasetSpec(str(d), None, "."))
    assert [r.image_id for r in listing.images] == ["mine.jpg"] and not listing.not_read


@pytest.fixture(scope="module")
def hostile_run(hostile_dir: Path, tmp_path_factory) -> tuple[Path, str]:
    import contextlib
    out = tmp_path_factory.mktemp("hostile-run") / "run"
    spec = out.parent / "spec.yaml"
    spec.write_text(f"name: files\ndataset: {{path: '{hostile_dir}'}}\nmodel: tiny\n"
                    "axes: {decoder: [pil, opencv]}\n")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["run", str(spec), "--out", str(out), "--executor", "local", "--quiet"])
    assert code == 0, err.getvalue()
    return out, err.getvalue()


def test_a_run_has_one_row_per_cell_and_image_and_records_what_it_did_not_read(hostile_run):
    out, stderr = hostile_run
    con = duckdb.connect()
    rows = con.execute(f"SELECT count(*), count(DISTINCT (cell_id, image_id)), "
                       f"count(DISTINCT image_id) FROM read_parquet('{out}/rows/*/*.parquet')").fetchone()
    assert rows == (2 * 7, 2 * 7, 7)
    manifest = json.loads((out / "manifest.json").read_text())
    assert {n["path"] for n in manifest["not_read"]} == set(EXPECTED_NOT_READ)
    for path in EXPECTED_NOT_READ:
        assert f"not read: {path}: " in stderr


def test_gif_bmp_tiff_webp_png_are_read_like_jpeg_by_pil_and_opencv(hostile_run):
    out, _ = hostile_run
    con = duckdb.connect()
    rows = con.execute(f"SELECT decoder, image_id, status, error FROM "
                       f"read_parquet('{out}/rows/*/*.parquet') ORDER BY ALL").fetchall()
    assert {(d, i) for d, i, s, _ in rows if s == "ok"} == \
        {(d, i) for d in ("pil", "opencv") for i in [*FORMATS, "sub/inner.png"]}, rows


def test_the_gif_row_is_the_first_frame(hostile_dir: Path):
    from dmx.runner.decoders import decode_options, get_decoder
    data = (hostile_dir / "photo.gif").read_bytes()
    first = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    for name in ("pil", "opencv"):
        px = get_decoder(name).decode(data, decode_options({"decoder": name}))
        assert px.shape == first.shape and np.array_equal(px, first), name


def test_a_decoder_that_cannot_read_a_format_gives_an_error_row_with_a_reason(hostile_dir: Path):
    pytest.importorskip("simplejpeg")
    from dmx.runner.decoders import DecodeError, decode_options, get_decoder
    with pytest.raises(DecodeError) as e:
        get_decoder("simplejpeg").decode((hostile_dir / "photo.png").read_bytes(),
                                         decode_options({"decoder": "simplejpeg"}))
    assert str(e.value).startswith("simplejpeg")


def test_a_glob_and_a_manifest_account_for_links_and_repeats_too(hostile_dir: Path, tmp_path: Path):
    listing = dataset.scan_dataset(DatasetSpec(str(hostile_dir / "*.jpg"), None, "."))
    assert [r.image_id for r in listing.images] == ["photo.jpg"]
    assert {n.path for n in listing.not_read} == {"again.jpg", "dangling.jpg", "loop_a.jpg",
                                                 "loop_b.jpg", "pipe.jpg"}
    lst = tmp_path / "list.txt"
    lst.write_text(f"{hostile_dir}/photo.png\n{hostile_dir}/photo.png\n{hostile_dir}/again.jpg\n"
                   f"{hostile_dir}/photo.jpg\n")
    listing = dataset.scan_dataset(DatasetSpec(str(lst), None, "."))
    assert sorted(Path(r.image_id).name for r in listing.images) == ["photo.jpg", "photo.png"]
    assert sorted((Path(n.path).name, n.reason.split(" ")[0]) for n in listing.not_read) == \
        [("again.jpg", "duplicate"), ("photo.png", "listed")]
