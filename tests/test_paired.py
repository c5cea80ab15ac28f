"""Paired accuracy statistics on planted truth: a factor that flips exactly k known images."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import binomtest

from dmx.analysis.paired import (accuracy_gate, accuracy_points, bootstrap_delta_interval,
                             discordant_counts, format_p, mcnemar_exact_p, paired_accuracy,
                             paired_from_counts, verdict)
from dmx.runner.labels import correct_at_k

N_CLASSES = 10


def planted_set(n: int, accuracy: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels and reference logits (n, classes) whose top-1 is right on round(accuracy * n)
    known images (the first ones) and wrong on the rest, each with a clear margin."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, N_CLASSES, n)
    logits = rng.normal(0, 0.1, (n, N_CLASSES))
    right = np.arange(n) < round(accuracy * n)
    winner = np.where(right, labels, (labels + 1 + rng.integers(0, N_CLASSES - 1, n)) % N_CLASSES)
    logits[np.arange(n), winner] += 5.0
    return labels, logits


def correct(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    top = np.argsort(-logits, axis=1)[:, :5]
    return np.asarray(correct_at_k(top, pa.array(labels))[0].to_pylist(), bool)


def flip_right_to_wrong(logits: np.ndarray, labels: np.ndarray, images: np.ndarray) -> np.ndarray:
    """A factor level that pushes the label's logit below another class on ``images`` only."""
    out = logits.copy()
    out[images, labels[images]] -= 10.0
    return out


@pytest.mark.parametrize("k", [1, 7, 40])
def test_factor_flipping_k_images_reports_exactly_k_right_to_wrong_and_the_planted_change(k):
    n = 2000
    labels, ref_logits = planted_set(n, 0.7)
    flipped = np.random.default_rng(k).choice(round(0.7 * n), k, replace=False)  # right ones
    cell = correct(flip_right_to_wrong(ref_logits, labels, flipped), labels)
    ref = correct(ref_logits, labels)
    r = paired_accuracy(cell, ref, resamples=2000, seed=1)
    assert (r.right_to_wrong, r.wrong_to_right) == (k, 0)
    assert r.acc_ref == pytest.approx(70.0)
    planted = -100.0 * k / n
    assert r.delta == pytest.approx(planted) and r.delta < 0
    assert r.ci_low <= planted <= r.ci_high
    assert r.p_value == pytest.approx(binomtest(k, k, 0.5).pvalue, rel=1e-12)


def test_factor_flipping_both_ways_counts_each_direction():
    labels, ref_logits = planted_set(1000, 0.6)
    cell_logits = flip_right_to_wrong(ref_logits, labels, np.arange(0, 30))
    cell_logits[np.arange(900, 912), labels[900:912]] += 20.0  # 12 wrong ones made right
    r = paired_accuracy(correct(cell_logits, labels), correct(ref_logits, labels))
    assert (r.right_to_wrong, r.wrong_to_right) == (30, 12)
    assert r.delta == pytest.approx(-1.8)
    assert r.text().startswith("-1.80 pts [") and "30 right->wrong, 12 wrong->right, p = " in r.text()


def test_factor_that_changes_no_prediction_has_an_interval_at_zero_and_passes_the_gate():
    labels, ref_logits = planted_set(500, 0.75)
    noisy = ref_logits + np.random.default_rng(3).normal(0, 1e-3, ref_logits.shape)
    r = paired_accuracy(correct(noisy, labels), correct(ref_logits, labels))
    assert (r.right_to_wrong, r.wrong_to_right, r.delta) == (0, 0, 0.0)
    assert (r.ci_low, r.ci_high) == (0.0, 0.0) and r.indistinguishable
    assert r.p_value == 1.0
    assert verdict(r) == "indistinguishable from zero at n = 500"
    assert accuracy_gate(r, max_drop=0.0).status == "pass"


def test_balanced_noise_is_indistinguishable_from_zero_and_never_fails_a_tight_gate():
    labels, ref_logits = planted_set(2000, 0.7)
    cell_logits = flip_right_to_wrong(ref_logits, labels, np.arange(0, 9))
    cell_logits[np.arange(1990, 2000), labels[1990:2000]] += 20.0
    r = paired_accuracy(correct(cell_logits, labels), correct(ref_logits, labels))
    assert (r.right_to_wrong, r.wrong_to_right) == (9, 10)
    assert r.indistinguishable and "indistinguishable" in verdict(r)
    assert accuracy_gate(r, max_drop=0.1).status == "pass"


def test_gate_fails_a_real_drop_beyond_the_limit_and_states_the_bound():
    labels, ref_logits = planted_set(5000, 0.7)
    cell = correct(flip_right_to_wrong(ref_logits, labels, np.arange(0, 150)), labels)  # -3 pts
    r = paired_accuracy(cell, correct(ref_logits, labels))
    gate = accuracy_gate(r, max_drop=1.0)
    assert gate.status == "fail" and gate.conclusive
    assert gate.bound == pytest.approx(-r.ci_high) and gate.bound > 1.0
    assert f"at least {gate.bound:.2f} pts" in gate.message and "beyond 1.00 pts" in gate.message


def test_gate_passes_but_says_so_when_the_interval_straddles_the_limit():
    labels, ref_logits = planted_set(200, 0.7)
    cell = correct(flip_right_to_wrong(ref_logits, labels, np.arange(0, 2)), labels)  # -1 pt
    gate = accuracy_gate(paired_accuracy(cell, correct(ref_logits, labels)), max_drop=1.0)
    assert gate.status == "pass" and not gate.conclusive
    assert "not ruled out at n = 200" in gate.message


def test_gate_does_not_pass_what_it_could_not_judge():
    r = paired_accuracy(pa.array([None, None], pa.bool_()), pa.array([True, False]))
    assert r.n == 0
    assert accuracy_gate(r, max_drop=1.0).status == "not_judged"
    assert verdict(r).startswith("not judged")


def test_images_missing_on_either_side_leave_the_pair():
    cell = pa.array([True, None, False, True], pa.bool_())
    ref = pa.array([True, True, True, None], pa.bool_())
    assert discordant_counts(cell, ref) == (1, 0)
    r = paired_accuracy(cell, ref)
    assert (r.n, r.acc_cell, r.acc_ref) == (2, 50.0, 100.0)
    assert accuracy_points(cell) == pytest.approx(200 / 3)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 3000), st.integers(0, 3000))
def test_mcnemar_exact_p_equals_scipy_binomtest_on_the_same_counts(b, c):
    expected = 1.0 if b + c == 0 else binomtest(b, b + c, 0.5).pvalue
    assert mcnemar_exact_p(b, c) == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_multinomial_bootstrap_matches_resampling_image_indices():
    rng = np.random.default_rng(5)
    ref = rng.random(400) < 0.7
    cell = ref.copy()
    cell[np.flatnonzero(ref)[:30]] = False
    cell[np.flatnonzero(~ref)[:10]] = True
    idx = rng.integers(0, 400, (20000, 400))
    direct = 100.0 * (cell[idx].mean(axis=1) - ref[idx].mean(axis=1))
    lo, hi = bootstrap_delta_interval(cell, ref, resamples=20000, seed=9)
    assert lo == pytest.approx(np.quantile(direct, 0.025), abs=0.3)
    assert hi == pytest.approx(np.quantile(direct, 0.975), abs=0.3)


@settings(max_examples=40, deadline=None)
@given(st.integers(50, 3000), st.data())
def test_interval_contains_the_observed_change_and_is_seeded(n, data):
    rw = data.draw(st.integers(0, n // 4))
    wr = data.draw(st.integers(0, n // 4))
    ref = np.zeros(n, bool)
    ref[: rw + n // 2] = True
    cell = ref.copy()
    cell[:rw] = False
    cell[n - wr:] = True
    r = paired_accuracy(cell, ref, resamples=500, seed=2)
    assert (r.right_to_wrong, r.wrong_to_right) == (rw, wr)
    assert r.ci_low <= r.delta <= r.ci_high
    assert paired_accuracy(cell, ref, resamples=500, seed=2) == r


def test_p_values_are_written_as_people_write_them():
    assert [format_p(p) for p in (1.0, 0.0321, 3.2e-7)] == ["1", "0.032", "3e-7"]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=300))
def test_counts_from_sql_give_the_same_result_as_per_image_arrays(pairs):
    cell = np.array([c for c, _ in pairs])
    ref = np.array([r for _, r in pairs])
    rw, wr = discordant_counts(cell, ref)
    assert paired_from_counts(len(pairs), int(ref.sum()), rw, wr) == paired_accuracy(cell, ref)
