"""The report's distribution panels are drawn from DuckDB aggregates (boxes, counts) and a
bounded sample of points, so a run of tens of millions of rows draws in bounded memory; the
numbers drawn are those of every row."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dmx.analysis import panels
from dmx.analysis.db import open_run
from dmx.matrix import parse_spec
from dmx.runner.sweep import RunOptions, run_spec


@pytest.fixture(scope="module")
def run(photo_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report-scale") / "run"
    spec = parse_spec({"name": "panels", "dataset": {"path": str(photo_dir)}, "model": "tiny",
                       "axes": {"decoder": ["pil", "opencv"], "exif": ["apply", "ignore"],
                                "resize": ["pil-bilinear", "cv2-linear", "cv2-area"]}})
    run_spec(spec, RunOptions(out=str(out), executor="local", progress=False))
    return out


@pytest.mark.parametrize("key,column,zero", [("cos_dist", "1 - out_cosine", panels.COS_ROUNDING),
                                             ("max_abs", "out_max_abs", 0.0)])
def test_the_boxes_and_counts_are_those_of_every_row(run: Path, key: str, column: str, zero: float):
    con = open_run(run)
    floor, stats, points = panels.level_stats(con, "resize", key, zero)
    rows = con.execute(f"SELECT resize, {column} FROM rows WHERE status = 'ok' AND NOT is_reference "
                       "AND out_cosine IS NOT NULL AND resize IS NOT NULL").fetchall()
    assert set(stats) == {lv for lv, _ in rows}
    for level, st in stats.items():
        v = np.array([x for lv, x in rows if lv == level and x is not None and np.isfinite(x)])
        shown = np.where(v > zero, v, floor)
        q1, med, q3 = np.percentile(shown, [25, 50, 75])
        assert (st["n"], st["zeros"]) == (v.size, int((v <= zero).sum()))
        assert np.allclose([st["q1"], st["med"], st["q3"]], [q1, med, q3], rtol=1e-9, atol=0)
        inside = shown[(shown >= q1 - 1.5 * (q3 - q1)) & (shown <= q3 + 1.5 * (q3 - q1))]
        assert np.isclose(st["whislo"], inside.min()) and np.isclose(st["whishi"], inside.max())
        assert len(points[level]) == min(v.size, panels.SAMPLE_POINTS)


def test_the_sample_of_points_is_bounded_per_level(run: Path, monkeypatch):
    monkeypatch.setattr(panels, "SAMPLE_POINTS", 3)
    _, stats, points = panels.level_stats(open_run(run), "exif", "cos_dist", panels.COS_ROUNDING)
    assert all(len(p) == min(3, stats[lv]["n"]) for lv, p in points.items())


def test_sampled_boxes_from_the_shared_sample_are_those_of_the_rows_hash_sample(run: Path,
                                                                                monkeypatch):
    """Every level above BOX_ROWS: the boxes come from the report's one shared sample table
    (``LevelSource``), and equal numpy's on exactly the rows the panel's own hash threshold
    keeps - the same whether the source serves one axis or all of them."""
    monkeypatch.setattr(panels, "BOX_ROWS", 5)
    monkeypatch.setattr(panels, "SHARED_SAMPLE_MAX", 1_000_000)   # the tiny run's shares are large
    con = open_run(run)
    zeros = {"cos_dist": panels.COS_ROUNDING, "max_abs": 0.0}
    shared = panels.LevelSource(con, ["decoder", "exif", "resize"], zeros)
    assert all(t is not None for t in shared.threshold.values())   # every axis sampled
    for axis in ("decoder", "exif", "resize"):
        for key, column in (("cos_dist", "1 - out_cosine"), ("max_abs", "out_max_abs")):
            floor, stats, points = panels.level_stats(con, axis, key, zeros[key], shared)
            alone = panels.level_stats(con, axis, key, zeros[key])
            assert stats == alone[1] and floor == alone[0]
            most = max(st["n"] for st in stats.values())
            keep = int(5 / most * 1_000_000)
            rows = con.execute(
                f"SELECT {axis}, {column} FROM rows WHERE status = 'ok' AND NOT is_reference "
                f"AND out_cosine IS NOT NULL AND hash(image_id, cell_id) % 1000000 < {keep}"
            ).fetchall()
            for level, st in stats.items():
                v = np.array([x for lv, x in rows if lv == level and x is not None
                              and np.isfinite(x)])
                if not v.size:
                    assert st.get("q1") is None
                    continue
                shown = np.where(v > zeros[key], v, floor)
                assert np.allclose([st["q1"], st["med"], st["q3"]],
                                   np.percentile(shown, [25, 50, 75]), rtol=1e-9, atol=0)


def test_diff_in_passes_of_cells_says_what_one_pass_says(run: Path, monkeypatch):
    """diff holds ~ROWS_PER_PASS / 2 rows of each run at a time: in a pass per cell its
    answer is the one of a single pass."""
    import dmx.analysis.queries as queries
    from dmx.analysis.diff import diff_runs
    one = diff_runs(run, run)
    monkeypatch.setattr(queries, "ROWS_PER_PASS", 2)
    assert diff_runs(run, run) == one and len(one.cells) > 1


def test_the_report_names_classes_from_the_run_without_importing_the_model(run: Path):
    import json
    import subprocess
    import sys

    from dmx.runner.models import get_model
    model = json.loads((run / "manifest.json").read_text())["model"]
    assert model["labels"] == list(get_model("tiny").labels), "the run records its class names"
    code = f"""
import json, sys
from dmx.analysis.pictures import class_labels
model = json.load(open({str(run / "manifest.json")!r}))["model"]
assert class_labels(model) == tuple(model["labels"])
assert "torch" not in sys.modules, "naming classes imported the model (and torch)"
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
