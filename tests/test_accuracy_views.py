"""Accuracy views, explain's accuracy section and the accuracy gate on planted rows: rows
written with the real schema whose correctness per (cell, image) is known by construction."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dmx.analysis.check import CheckError, check_run, drop_limit, render_check_text, resolve_tolerances
from dmx.analysis.db import open_run
from dmx.analysis.explain import explain_run
from dmx.analysis.paired import accuracy_gate, paired_accuracy, paired_from_counts, unchanged_bound
from dmx.analysis.render import render_text
from planted import write_run

AXES = ("decoder", "resize")
LEVELS = [{"decoder": "pil", "resize": "pil-bilinear"}, {"decoder": "pil", "resize": "cv2-linear"},
          {"decoder": "opencv", "resize": "pil-bilinear"}]
N = 60
OFF = {"max_rel_l2": None, "min_cosine": None, "min_top1_agreement": None}


def ref_right(i: int) -> bool:
    return i % 3 != 0


def labelled(i: int) -> bool:
    return i < 50                      # img50..img59 have no label


FLIPPED = [i for i in range(50) if ref_right(i)][:15]


def planted_correct(f: dict[str, str], i: int) -> bool | None:
    """cv2-linear: 15 right->wrong (the first right images), 2 wrong->right (img00, img03);
    opencv: an error on img01 (a right image: out of the pair, reported), else the reference's."""
    if not labelled(i):
        return None
    right = ref_right(i)
    if f["resize"] == "cv2-linear":
        if right and i in FLIPPED:
            return False
        if i in (0, 3):
            return True
    if f["decoder"] == "opencv" and i == 1:
        return None
    return right


def _row(f: dict[str, str], i: int) -> dict:
    c = planted_correct(f, i)
    if f["decoder"] == "opencv" and i == 1:
        return {"status": "error", "error_stage": "decode", "error": "planted", "correct_top1": None,
                "correct_top5": None, "out_cosine": None, "top1": None, "top1_agree": None}
    return {"correct_top1": c, "correct_top5": None if c is None else True,
            "out_cosine": 0.99 if f["resize"] == "cv2-linear" else 1.0}


def _every(i: int) -> dict:
    return {"label": (i % 10) if labelled(i) else None,
            "correct_top1": ref_right(i) if labelled(i) else None,
            "correct_top5": True if labelled(i) else None}


@pytest.fixture()
def run(tmp_path: Path) -> Path:
    return write_run(tmp_path / "run", AXES, LEVELS, _row, N, every=_every)


def _arrays(f: dict[str, str]) -> tuple[list, list]:
    cell = [planted_correct(f, i) for i in range(N)]
    ref = [ref_right(i) if labelled(i) else None for i in range(N)]
    return cell, ref


def test_the_contrasts_view_equals_the_paired_statistics_on_per_image_arrays(run: Path):
    con = open_run(run)
    got = {r[0]: r[1:] for r in con.sql(
        "SELECT cell, n, accuracy_ref, accuracy, delta, ci_low, ci_high, right_to_wrong, "
        "wrong_to_right, p_value, n_unpaired FROM accuracy_contrasts").fetchall()}
    for f in LEVELS[1:]:
        want = paired_accuracy(*_arrays(f))
        label = " ".join(f"{a}={f[a]}" for a in AXES)
        n, acc_ref, acc, delta, lo, hi, rw, wr, p, unpaired = got[label]
        assert (n, rw, wr) == (want.n, want.right_to_wrong, want.wrong_to_right)
        assert (acc_ref, acc, delta, lo, hi, p) == pytest.approx(
            (want.acc_ref, want.acc_cell, want.delta, want.ci_low, want.ci_high, want.p_value))
        assert unpaired == (1 if f["decoder"] == "opencv" else 0)
    assert got["decoder=pil resize=cv2-linear"][6:8] == (15, 2)


def test_the_accuracy_view_counts_labelled_and_judged_rows_per_cell(run: Path):
    con = open_run(run)
    rows = {r[0]: r[1:] for r in con.sql(
        "SELECT cell, n_labelled, n, top1_right, top1, top5 FROM accuracy").fetchall()}
    ref_k = sum(ref_right(i) for i in range(50))
    assert rows["decoder=pil resize=pil-bilinear"] == (50, 50, ref_k, pytest.approx(100 * ref_k / 50),
                                                       100.0)
    # the error row is labelled but not judged
    assert rows["decoder=opencv resize=pil-bilinear"][:2] == (50, 49)


def test_explain_matches_the_view_from_stored_summaries_and_from_the_rows(run: Path):
    from dmx.analysis.aggregates import write_summary
    from dmx.analysis.summary import Summary
    live = explain_run(run)
    write_summary(run)
    con = open_run(run)
    from dmx.results.store import RunDir
    assert Summary(con, RunDir(run)).valid
    stored = explain_run(run)
    key = lambda e: [(c.cell_id, c.acc_n, c.acc_delta, c.acc_ci_low, c.acc_ci_high,  # noqa: E731
                      c.acc_right_to_wrong, c.acc_wrong_to_right, c.acc_p) for c in e.contrasts]
    assert key(live) == key(stored) and any(c.acc_n for c in live.contrasts)
    assert live.accuracy["shares"] == stored.accuracy["shares"]


def test_a_run_without_labels_has_no_accuracy_section(tmp_path: Path):
    bare = write_run(tmp_path / "bare", AXES, LEVELS, lambda f, i: {}, 10)
    e = explain_run(bare)
    assert e.accuracy is None and all(c.acc_n == 0 for c in e.contrasts)
    assert "Accuracy against ground truth" not in render_text(e)


def test_no_changed_image_at_small_n_is_not_a_conclusive_pass():
    """0 of 8 images changed: the bootstrap's interval is [0, 0], yet a drop of 37 points is not
    ruled out by 8 images; the gate passed this as conclusive (a drop beyond 0.1 ruled out)."""
    r = paired_from_counts(8, 3, 0, 0)
    assert (r.ci_low, r.ci_high) == (0.0, 0.0)
    gate = accuracy_gate(r, max_drop=0.1)
    assert gate.status == "pass" and not gate.conclusive
    assert f"a drop up to {unchanged_bound(8):.2f} pts is not ruled out at n = 8" in gate.message
    assert unchanged_bound(8) == pytest.approx(100 * (1 - 0.025 ** (1 / 8)))
    assert accuracy_gate(paired_from_counts(50_000, 35_000, 0, 0), 0.1).conclusive


def test_the_gate_fails_the_planted_drop_and_states_the_bound(run: Path):
    r = check_run(run, OFF | {"max_accuracy_drop": 1.0, "allow_errors": True})
    assert [f.check for f in r.failures] == ["max_accuracy_drop"]
    f = r.failures[0]
    want = paired_accuracy(*_arrays(LEVELS[1]))
    assert f.cell == "decoder=pil resize=cv2-linear" and f.seen == pytest.approx(-want.ci_high)
    text = render_check_text(r)
    assert f"a drop beyond 1.00 pts with 95% confidence (at least {-want.ci_high:.2f} pts" in text
    assert "ACCURACY decoder=opencv resize=pil-bilinear" in text


def test_a_run_without_labels_never_passes_an_accuracy_gate(tmp_path: Path):
    bare = write_run(tmp_path / "bare", AXES, LEVELS, lambda f, i: {}, 10)
    r = check_run(bare, OFF | {"max_accuracy_drop": 1.0})
    assert not r.passed and {f.check for f in r.failures} == {"accuracy_not_judged"}
    assert "no ground truth" in render_check_text(r)
    assert check_run(bare, OFF).passed       # without the key, accuracy is not asked for


def test_per_cell_limits_take_the_most_specific_selector(run: Path):
    cell = {"cell_id": "abc", "decoder": "opencv", "resize": "cv2-linear"}
    axes = list(AXES)
    limits = {"*": 1.0, "decoder=opencv": 2.0, "decoder=opencv resize=cv2-linear": 3.0}
    assert drop_limit(limits, cell, axes) == 3.0
    assert drop_limit({"*": 1.0, "decoder=opencv": 2.0}, cell, axes) == 2.0
    assert drop_limit({"abc": 9.0, "decoder=opencv resize=cv2-linear": 3.0}, cell, axes) == 9.0
    assert drop_limit({"decoder=pil": 2.0}, cell, axes) is None
    assert drop_limit(0.5, cell, axes) == 0.5
    loose = check_run(run, OFF | {"allow_errors": True,
                                  "max_accuracy_drop": {"*": 1.0, "resize=cv2-linear": 40.0}})
    assert loose.passed, render_check_text(loose)


def test_a_selector_that_names_no_cell_is_an_error(run: Path):
    with pytest.raises(CheckError, match="'resize=cv2-linaer' names no cell"):
        check_run(run, OFF | {"max_accuracy_drop": {"resize=cv2-linaer": 1.0}})


@pytest.mark.parametrize("value", [-0.1, 101, "1", True, {}, {"*": -1}, float("nan")])
def test_a_bad_accuracy_limit_is_refused(value):
    with pytest.raises(CheckError, match="max_accuracy_drop"):
        resolve_tolerances({"max_accuracy_drop": value})


def test_the_reports_ranking_shows_explains_accuracy_change(run: Path):
    from dmx.analysis.report import build_report
    e = explain_run(run)
    c = next(c for c in e.contrasts if c.level == "cv2-linear")
    html = build_report(run)
    section = html[html.index('<section id="ranking">'):]
    section = section[:section.index("</section>")]
    assert "top-1 change [95% CI]" in section
    assert (f"{c.acc_delta:+.2f} [{c.acc_ci_low:+.2f}, {c.acc_ci_high:+.2f}] pts (n = {c.acc_n}, "
            f"15 right-&gt;wrong, 2 wrong-&gt;right") in section


def test_shares_of_correctness_are_type_ii_shares_of_the_0_1_response(run: Path):
    from dmx.analysis.effects import CellStat, attribute
    e = explain_run(run)
    stats = []
    for f in LEVELS:
        y = np.array([v for v in (planted_correct(f, i) if f != LEVELS[0] else
                                  (ref_right(i) if labelled(i) else None) for i in range(N))
                      if v is not None], float)
        stats.append(CellStat(f, len(y), y.mean(), ((y - y.mean()) ** 2).sum()))
    want = attribute(stats, list(AXES), LEVELS[0])
    assert e.accuracy["shares"] == pytest.approx(want.main)
