"""Planning a run grows like n log n and keeps nothing per image in the driver: the listing and
the chunk list are Parquet files built by DuckDB (``dmx.results.planning``)."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from dmx.matrix import DatasetSpec
from dmx.results.planning import ChunkReader, plan_chunks, scratch_dir
from dmx.results.store import chunk_id
from dmx.runner.dataset import collect


def _manifest(root: Path, photo: Path, n: int) -> Path:
    """``n`` distinct names (1,000 per folder, hard links to one real JPEG per folder: a file
    system allows ~65,000 links to a file) and their manifest."""
    lines = []
    for i in range(n):
        folder = root / f"f{i // 1000:04d}"
        if i % 1000 == 0:
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy(photo, folder / "original.jpeg")
        name = folder / f"img{i:07d}.jpg"
        os.link(folder / "original.jpeg", name)
        lines.append(f"{folder.name}/{name.name}")
    lines.reverse()                        # listed out of order: the plan sorts
    path = root / "list.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def _plan(manifest: Path, chunk: int = 64) -> tuple[float, object, Path]:
    scratch = scratch_dir()
    t = time.perf_counter()
    listing = collect(DatasetSpec(str(manifest), None, "."), scratch)
    index = plan_chunks(listing.images, chunk, scratch / "chunks.parquet")
    return time.perf_counter() - t, index, scratch


@pytest.fixture(scope="module")
def manifests(tmp_path_factory, photo_dir: Path) -> dict[int, Path]:
    photo = photo_dir / "chelsea_420.jpg"
    return {n: _manifest(tmp_path_factory.mktemp(f"planning-{n}"), photo, n) for n in (20_000, 200_000)}


def test_planning_200k_listed_images_grows_like_n_log_n(manifests):
    small, _, s1 = _plan(manifests[20_000])
    large, index, s2 = _plan(manifests[200_000])
    try:
        assert large / small < 15, f"20k: {small:.2f} s, 200k: {large:.2f} s"
        assert len(index) == -(-200_000 // 64) and int(index.count.sum()) == 200_000
    finally:
        shutil.rmtree(s1, ignore_errors=True)
        shutil.rmtree(s2, ignore_errors=True)


def test_the_chunk_list_covers_every_image_once_in_id_order_named_by_its_ids(manifests):
    _, index, scratch = _plan(manifests[20_000], chunk=100)
    try:
        table = pq.read_table(scratch / "chunks.parquet")
        ids = table["image_id"]
        assert table.num_rows == 20_000 == pc.count_distinct(ids).as_py()
        assert ids.to_pylist() == sorted(ids.to_pylist())      # plan order is id order here
        reader = ChunkReader(scratch / "chunks.parquet")
        for pos in (0, 1, len(index) // 2, len(index) - 1):     # across row groups
            rows = reader.rows(index.start[pos], index.count[pos])
            assert chunk_id(r[0] for r in rows) == index.ids[pos]
            assert all(Path(p).is_file() for _, _, p, _ in rows)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@pytest.mark.parametrize("name, says", [("missing", "does not exist"),
                                        ("notes.md", "is a file but not a manifest")])
def test_a_dataset_path_that_cannot_be_listed_is_one_line_before_ray_starts(tmp_path, name, says,
                                                                           monkeypatch):
    from dmx.matrix import parse_spec
    from dmx.matrix.errors import SpecError
    from dmx.runner import executors
    from dmx.runner.sweep import RunOptions, run_spec

    def started(*args, **kwargs):
        raise AssertionError("Ray was started for a dataset that cannot be listed")
    monkeypatch.setattr(executors.RayExecutor, "start", started)
    (tmp_path / "notes.md").write_text("not a manifest")
    spec = parse_spec({"name": "bad", "dataset": {"path": str(tmp_path / name)}, "model": "tiny",
                       "axes": {"decoder": ["pil"]}})
    with pytest.raises(SpecError, match=says):   # the listing runs while Ray starts; this check before
        run_spec(spec, RunOptions(out=str(tmp_path / "run"), progress=False))


def test_a_listing_that_fails_while_the_executor_starts_raises_its_own_error(tmp_path):
    from dmx.matrix import parse_spec
    from dmx.matrix.errors import SpecError
    from dmx.runner.sweep import RunOptions, run_spec
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    spec = parse_spec({"name": "empty", "dataset": {"path": str(tmp_path / "empty")},
                       "model": "tiny", "axes": {"decoder": ["pil"]}})
    with pytest.raises(SpecError, match="no images found"):
        run_spec(spec, RunOptions(out=str(tmp_path / "run"), executor="local", progress=False))
    assert not (tmp_path / "run" / "manifest.json").exists()
