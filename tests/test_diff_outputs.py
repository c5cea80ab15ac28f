"""``dmx diff`` compares the runs' outputs themselves (issue 21 point 8): a library upgrade that
moves every cell, the reference included, leaves each cell's divergence from its own reference
unchanged - for detectors and tensor models (no top-5) the old diff said "0 moved".

Runs are planted (``tests/planted.py``) with the ``out_digest`` row column (hex of sha256 over
the output tensor's bytes, 32 hex digits) that the worker writes.
"""
from __future__ import annotations

import hashlib
from pathlib import Path


from dmx.analysis.diff import diff_runs, render_diff_text
from dmx.cli import main

from planted import write_run

N = 6
LEVELS = [{"backend": "torch"}, {"backend": "onnxruntime"}, {"backend": "openvino"}]
DETECTOR = {"model": {"task": "detection"}}


def _digest(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]


def _run(root: Path, version: str, digests: bool = True) -> Path:
    """A detector run: every cell's raw head is 1e-4 from the reference's; ``version`` names
    the library that computed the outputs, so another version gives other output bytes."""
    def row(f: dict, i: int) -> dict:
        return {"out_cosine": 1 - 1e-8, "out_max_abs": 1e-4, "out_rel_l2": 1e-4,
                "out_digest": _digest(version, f["backend"], i)}
    def strip(d: dict) -> dict:
        return d if digests else {k: v for k, v in d.items() if k != "out_digest"}
    return write_run(root, ("backend",), LEVELS, lambda f, i: strip(row(f, i)), N,
                     every=lambda i: strip({"out_digest": _digest(version, "torch", i)}),
                     drop=() if digests else ("out_digest",),
                     manifest=DETECTOR | {"spec_digest": "same"})


def test_an_upgrade_that_moves_every_cell_and_the_reference_is_reported(tmp_path: Path):
    a, b = _run(tmp_path / "a", "torch 2.13"), _run(tmp_path / "b", "torch 2.14")
    d = diff_runs(a, b)
    assert len(d.moved) == len(LEVELS) and d.moved[0].is_reference
    assert all(c.outputs_changed == N for c in d.moved)


def test_the_first_thing_diff_says_is_that_the_reference_moved(tmp_path: Path):
    a, b = _run(tmp_path / "a", "torch 2.13"), _run(tmp_path / "b", "torch 2.14")
    first, second = render_diff_text(diff_runs(a, b)).splitlines()[:2]
    assert "3 of 3 cells moved" in first
    assert "reference" in second and "every cell" in second and "6 of 6 images" in second


def test_fail_if_moved_fails_on_such_an_upgrade(tmp_path: Path, capsys):
    a, b = _run(tmp_path / "a", "torch 2.13"), _run(tmp_path / "b", "torch 2.14")
    assert main(["diff", str(a), str(b), "--fail-if-moved"]) != 0


def test_the_same_outputs_do_not_move(tmp_path: Path):
    a, b = _run(tmp_path / "a", "torch 2.13"), _run(tmp_path / "b", "torch 2.13")
    d = diff_runs(a, b)
    assert d.moved == [] and d.outputs_compared


def test_runs_without_out_digest_are_diffed_as_before_and_say_so(tmp_path: Path):
    a, b = _run(tmp_path / "a", "torch 2.13"), _run(tmp_path / "b", "torch 2.14", digests=False)
    d = diff_runs(a, b)
    assert d.moved == [] and not d.outputs_compared
    assert "not compared bit for bit" in render_diff_text(d)
