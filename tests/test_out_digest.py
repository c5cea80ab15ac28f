"""Every row carries a digest of its output, so ``dmx diff`` sees a change that moves every cell,
the reference included - real runs of a real model, one of them with its weights nudged."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from dmx.analysis.db import open_run
from dmx.matrix import parse_spec
from dmx.runner.sweep import RunOptions, run_spec

TINY_INPUT = {"size": 32, "resize": 32, "mode": "stretch", "mean": [0.5, 0.5, 0.5],
              "std": [0.5, 0.5, 0.5]}
AXES = {"decoder": ["pil", "opencv"], "resize": ["pil-bilinear", "cv2-linear"]}
REFERENCE = {"decoder": "pil", "resize": "pil-bilinear"}


def tiny():
    """The tiny CNN as a spec-named factory."""
    from dmx.runner.models.tiny import build
    return build()


def tiny_nudged():
    """The tiny CNN with its last layer's bias moved by 1e-4: every output moves a little, no
    top-1 class changes - what a library upgrade often does."""
    import torch

    from dmx.runner.models.tiny import build
    m = build()
    with torch.no_grad():
        m.classifier.bias += 1e-4
    return m


def _run(images: Path, out: Path, factory: str) -> Path:
    spec = parse_spec({"name": "digest", "dataset": {"path": str(images)},
                       "model": {"torch": f"test_out_digest:{factory}", "input": TINY_INPUT},
                       "axes": AXES, "reference": REFERENCE})
    run_spec(spec, RunOptions(out=str(out), executor="local", progress=False))
    return out


def test_rows_carry_one_digest_per_distinct_output(photo_dir: Path, tmp_path: Path):
    run = _run(photo_dir, tmp_path / "a", "tiny")
    con = open_run(run)
    missing, = con.execute("SELECT count(*) FROM rows WHERE status = 'ok' AND out_digest IS NULL").fetchone()
    assert missing == 0
    # a reused output is the same output: same digest as the cell it was reused from
    bad, = con.execute("""
        SELECT count(*) FROM (SELECT image_id, count(DISTINCT out_digest) AS d,
                                     count(DISTINCT px_max_abs) AS p, bool_and(px_equal) AS same
                              FROM rows WHERE status = 'ok' GROUP BY image_id)
        WHERE same AND d > 1""").fetchone()
    assert bad == 0


def test_diff_reports_a_change_that_moves_every_cell_and_the_reference(photo_dir: Path,
                                                                      tmp_path: Path):
    a = _run(photo_dir, tmp_path / "a", "tiny")
    b = _run(photo_dir, tmp_path / "b", "tiny_nudged")
    same = subprocess.run([sys.executable, "-m", "dmx", "diff", str(a), str(a), "--fail-if-moved"],
                          capture_output=True, text=True)
    assert same.returncode == 0, same.stdout + same.stderr
    moved = subprocess.run([sys.executable, "-m", "dmx", "diff", str(a), str(b), "--fail-if-moved"],
                           capture_output=True, text=True)
    assert moved.returncode != 0, moved.stdout + moved.stderr
    assert "reference" in moved.stdout and "4 of 4 cells moved" in moved.stdout, moved.stdout
