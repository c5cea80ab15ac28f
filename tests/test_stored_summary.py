"""``check`` and ``report`` answer from the summary kept beside a compacted run (as ``explain``
does), and say exactly what they say from the rows: the same verdict at the run's own
tolerances, at other limits (only the cells whose worst value breaks them are counted again)
and in either scope; the same panels. A row file rewritten in place, even at the same size,
voids the summary."""
from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from dmx.analysis import check, panels, report
from dmx.analysis.aggregates import write_summary
from dmx.analysis.check import check_run
from dmx.analysis.db import open_run
from dmx.analysis.summary import Summary
from dmx.matrix import parse_spec
from dmx.results.store import RunDir
from dmx.runner.sweep import RunOptions, run_spec

AXES = {"decoder": ["pil", "opencv"], "resize": ["pil-bilinear", "cv2-linear"],
        "backend": ["torch", "onnxruntime"]}


@pytest.fixture(scope="module")
def bare(photo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run with error rows (three bad files) and cells that diverge (resize) or hardly
    (backend), compacted, without a summary."""
    out = tmp_path_factory.mktemp("stored") / "run"
    spec = parse_spec({"name": "stored", "dataset": {"path": str(photo_dir)}, "model": "tiny",
                       "axes": AXES, "check": {"min_cosine": 0.9999}})
    run_spec(spec, RunOptions(out=str(out), executor="local", progress=False))
    assert not (out / "summary").exists()
    return out


@pytest.fixture(scope="module")
def summarised(bare: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = Path(shutil.copytree(bare, tmp_path_factory.mktemp("summarised") / "run"))
    write_summary(out)
    assert Summary(open_run(out), RunDir(out)).valid
    return out


TOLERANCES = [None, {"max_abs": 1e-9}, {"max_rel_l2": 1e-12, "min_cosine": 0.9999999},
              {"max_rel_l2": 10.0, "min_cosine": 0.0, "min_top1_agreement": 0.5},
              {"scope": "same-input"}, {"scope": "same-input", "max_abs": 1e-9},
              {"allow_errors": True, "max_reference_errors": 3}]


@pytest.mark.parametrize("tolerances", TOLERANCES, ids=lambda t: str(t))
def test_check_from_the_summary_says_what_the_rows_say(bare: Path, summarised: Path,
                                                        tolerances: dict | None):
    from_rows, stored = check_run(bare, tolerances).to_json(), check_run(summarised, tolerances).to_json()
    assert stored == from_rows
    assert stored["rows_judged"] > 0


def test_check_counts_from_the_rows_only_the_cells_whose_worst_value_breaks_a_changed_limit(
        summarised: Path, monkeypatch):
    counted: list[list[tuple[str, str | None]]] = []
    real = check._cell_stats

    def spy(con, limits, same_input):
        counted.append(sorted(limits, key=str))
        return real(con, limits, same_input)

    monkeypatch.setattr(check, "_cell_stats", spy)
    default = check_run(summarised)
    assert counted == [] and not default.passed     # the spec's 0.9999 cosine breaks the resize
    loose = check_run(summarised, {"max_rel_l2": 10.0, "min_cosine": 0.0})
    assert counted == []                            # nothing breaks: nothing to count
    assert not {f.check for f in loose.failures} & {"max_rel_l2", "min_cosine", "max_abs"}
    strict = check_run(summarised, {"max_abs": 1e-9})
    assert len(counted) == 1
    breaking = {f.cell_id for f in strict.failures if f.check == "max_abs"}
    assert breaking and {cell for cell, _ in counted[0]} == breaking


def test_a_limit_changed_but_not_broken_reads_zero_rows_beyond_it():
    s = {"max_abs": 0.5, "rel_l2": float("nan"), "cosine": -2.0}
    assert check._breaks("max_abs", s, 0.4) and not check._breaks("max_abs", s, 0.5)
    assert check._breaks("max_rel_l2", s, 100.0), "NaN breaks every limit"
    assert check._breaks("min_cosine", s, 0.0), "-2 marks a NaN cosine"
    assert not check._breaks("max_abs", s, None)


def test_the_report_panels_kept_in_the_summary_are_those_drawn_from_the_rows(summarised: Path):
    con = open_run(summarised)
    axes = panels.varying_axes(con)
    live = panels.panels(con, axes)
    kept = Summary(con, RunDir(summarised))
    back = panels.panels_from_tables(kept.table("report_levels"), kept.table("report_points"))
    assert set(back) == {a for a in axes if live[a]["cos_dist"][1]}
    for axis, per_key in back.items():
        for key, (floor, stats, points) in per_key.items():
            floor_l, stats_l, points_l = live[axis][key]
            assert floor == floor_l and stats == stats_l
            assert {lv: sorted(map(tuple, p)) for lv, p in points.items()} == \
                   {lv: sorted(map(tuple, p)) for lv, p in points_l.items()}
    def by_pair(rows: list[dict]) -> dict:
        return {(d["a"], d["la"], d["b"], d["lb"]): (d["n"], pytest.approx(d["mean"], rel=1e-12))
                for d in rows}

    assert by_pair(kept.table("report_pairs").to_pylist()) == by_pair(panels.level_pair_means(con, axes))


def test_the_report_of_a_summarised_run_draws_without_scanning_for_its_panels(
        summarised: Path, monkeypatch):
    def scan(*_a, **_k):
        raise AssertionError("scanned the rows for a panel the summary keeps")

    monkeypatch.setattr(report, "panels", scan)
    monkeypatch.setattr(report, "level_pair_means", scan)
    html = report.build_report(summarised)
    assert 'id="chart-distributions"' in html and 'id="chart-interactions"' in html


def test_a_row_file_rewritten_at_the_same_size_voids_the_summary(summarised: Path, tmp_path: Path):
    run = Path(shutil.copytree(summarised, tmp_path / "run"))
    assert Summary(open_run(run), RunDir(run)).valid, "a copy that keeps the times keeps the summary"
    part = next(p for p in (run / "rows").rglob("*.parquet"))
    plain = {"compression": "none", "use_dictionary": False}   # fixed-width values: same size
    t = pq.read_table(part)
    pq.write_table(t, part, **plain)
    write_summary(run)
    size = part.stat().st_size
    assert Summary(open_run(run), RunDir(run)).valid
    i = t.schema.get_field_index("out_max_abs")
    t = t.set_column(i, t.schema.field(i), pc.if_else(pc.is_valid(t["out_max_abs"]),
                                                      pa.scalar(7.0), t["out_max_abs"]))
    pq.write_table(t, part, **plain)
    assert part.stat().st_size == size
    assert not Summary(open_run(run), RunDir(run)).valid
    worst = {f.seen for f in check_run(run, {"max_abs": 1.0}).failures if f.check == "max_abs"}
    assert worst == {7.0}, "the rewritten values are judged"


def test_a_stored_table_the_key_does_not_name_is_never_read_and_is_removed(summarised: Path,
                                                                          tmp_path: Path):
    run = Path(shutil.copytree(summarised, tmp_path / "run"))
    pq.write_table(pa.table({"x": [1]}), run / "summary" / "made_up.parquet")
    kept = Summary(open_run(run), RunDir(run))
    assert kept.valid and kept.table("made_up") is None, "a table left by another summary"
    assert kept.table("cell_precision") is not None
    write_summary(run)
    assert not (run / "summary" / "made_up.parquet").exists()
    assert Summary(open_run(run), RunDir(run)).table("cell_precision") is not None


def test_rows_rewritten_while_the_summary_is_computed_void_it(summarised: Path, tmp_path: Path,
                                                              monkeypatch):
    from dmx.analysis import aggregates
    run = Path(shutil.copytree(summarised, tmp_path / "run"))
    real = aggregates.query_tables

    def then_rewrite(con, location):
        tables = real(con, location)
        part = next(p for p in (run / "rows").rglob("*.parquet"))
        t = pq.read_table(part)
        i = t.schema.get_field_index("out_max_abs")
        pq.write_table(t.set_column(i, t.schema.field(i), pc.if_else(
            pc.is_valid(t["out_max_abs"]), pa.scalar(7.0), t["out_max_abs"])), part)
        return tables

    monkeypatch.setattr(aggregates, "query_tables", then_rewrite)
    write_summary(run)
    assert not Summary(open_run(run), RunDir(run)).valid, "tables of the rows before the rewrite"
    worst = {f.seen for f in check_run(run, {"max_abs": 1.0}).failures if f.check == "max_abs"}
    assert worst == {7.0}


@pytest.mark.parametrize("name", ["db.py", "axes.py", "check.py"])
def test_the_summary_key_changes_with_the_code_that_computes_its_tables(name: str, monkeypatch):
    from dmx.analysis import summary
    before = summary._code_digest()
    real = Path.read_text

    def edited(self, *a, **k):
        text = real(self, *a, **k)
        return text + "\n# edited\n" if self.name == name else text

    monkeypatch.setattr(Path, "read_text", edited)
    assert summary._code_digest() != before


def test_a_summary_that_fails_is_a_warning_and_compact_still_succeeds(summarised: Path,
                                                                     tmp_path: Path, monkeypatch,
                                                                     capsys):
    import argparse

    from dmx.analysis import aggregates
    from dmx.commands import compact

    def broken(*_a, **_k):
        raise ValueError("a defect in a summary query")

    run = _without_summary(summarised, tmp_path / "run")
    monkeypatch.setattr(aggregates, "write_summary", broken)
    assert compact.run(argparse.Namespace(run_dir=str(run))) == 0
    err = capsys.readouterr().err
    assert "warning: the run's summary was not written (ValueError: a defect" in err
    assert "Traceback" not in err
    assert check_run(run).rows_judged > 0, "the rows are there to read"


def _without_summary(run: Path, dest: Path) -> Path:
    return Path(shutil.copytree(run, dest, ignore=shutil.ignore_patterns("summary")))


def test_diff_joins_only_the_cells_whose_rows_differ_and_says_what_the_join_says(
        bare: Path, summarised: Path, tmp_path: Path, monkeypatch):
    from dmx.analysis import diff
    changed = Path(shutil.copytree(summarised, tmp_path / "changed"))
    cells = pq.read_table(changed / "cells.parquet").to_pylist()
    moved = next(c["cell_id"] for c in cells if not c["is_reference"] and c["status"] == "ok")
    for part in (changed / "rows").rglob("*.parquet"):
        t = pq.read_table(part)
        i = t.schema.get_field_index("out_max_abs")
        mine = pc.equal(t["cell_id"], moved)
        t = t.set_column(i, t.schema.field(i), pc.if_else(mine, pc.add(t["out_max_abs"], 0.5),
                                                          t["out_max_abs"]))
        pq.write_table(t, part)
    write_summary(changed)
    changed_bare = _without_summary(changed, tmp_path / "changed-bare")

    joined: list[set[str]] = []
    real = diff._diff_cells

    def spy(con_a, con_b, skip=frozenset()):
        out = real(con_a, con_b, skip)
        joined.append({d["cell_id"] for d in out})
        return out

    monkeypatch.setattr(diff, "_diff_cells", spy)
    same = diff.diff_runs(summarised, summarised)
    assert joined == [set()] and not same.moved      # a run against itself: nothing joined
    assert same.to_json()["cells_compared"] == len(cells)
    assert [c for c in same.cells] == [c for c in diff.diff_runs(bare, bare).cells]
    joined.clear()
    stored = diff.diff_runs(summarised, changed)
    assert joined[0] == {moved}                      # only the rewritten cell was joined
    from_rows = diff.diff_runs(bare, changed_bare)
    assert len(joined[1]) == len(cells)
    assert stored.cells == from_rows.cells
    assert [c.cell_id for c in stored.moved] == [moved]


def test_outputs_swapped_between_two_images_are_a_change_the_digest_sees(summarised: Path,
                                                                          tmp_path: Path):
    """Only out_digest moves (as for the reference cell, whose divergences are 0 by
    construction), swapped between two images: the cell's digest must differ."""
    from dmx.analysis import diff
    swapped = Path(shutil.copytree(summarised, tmp_path / "swapped"))
    ref = next(c["cell_id"] for c in pq.read_table(swapped / "cells.parquet").to_pylist()
               if c["is_reference"])
    (part,) = [p for p in (swapped / "rows").rglob("*.parquet")
               if ref in pq.read_table(p, columns=["cell_id"])["cell_id"].to_pylist()]
    t = pq.read_table(part)
    rows = [i for i, (c, d) in enumerate(zip(t["cell_id"].to_pylist(), t["out_digest"].to_pylist()))
            if c == ref and d is not None]
    values = t["out_digest"].to_pylist()
    a, b = next((x, y) for x in rows for y in rows if values[x] != values[y])
    values[a], values[b] = values[b], values[a]
    i = t.schema.get_field_index("out_digest")
    pq.write_table(t.set_column(i, t.schema.field(i), pa.array(values, pa.string())), part)
    write_summary(swapped)
    cell = next(c for c in diff.diff_runs(summarised, swapped).cells if c.cell_id == ref)
    assert cell.outputs_changed == 2


@pytest.fixture(scope="module")
def uncompacted(photo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("told") / "run"
    spec = parse_spec({"name": "told", "dataset": {"path": str(photo_dir)}, "model": "tiny",
                       "axes": {"resize": ["pil-bilinear", "cv2-linear"]}})
    run_spec(spec, RunOptions(out=str(out), executor="local", progress=False, compact=False))
    return out


@pytest.mark.parametrize("told,compacted,summary", [("", False, False), ("rows\n", True, False),
                                                     ("rows\nsummary\n", True, True)])
def test_the_compaction_child_does_what_it_is_told_and_nothing_more(uncompacted: Path, tmp_path: Path,
                                                                    told: str, compacted: bool,
                                                                    summary: bool):
    """``dmx run``'s compaction child (``dmx compact RUN --when-told``): untold (the run failed
    or was interrupted) it touches nothing; told "rows" it compacts them (the run merges its
    image facts meanwhile); told "summary" as well, it writes the summary."""
    import subprocess
    import sys
    out = Path(shutil.copytree(uncompacted, tmp_path / "run"))
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    r = subprocess.run([sys.executable, "-m", "dmx", "compact", str(out), "--when-told"],
                       input=told, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert bool(list(out.glob("rows/chunk=compacted-*"))) == compacted
    assert (out / "summary").exists() == summary
    if not compacted:
        assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    else:
        assert check_run(out).rows_judged > 0
