"""Divergence metrics on known inputs."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from dmx.runner.metrics import classification_divergence, input_divergence, output_divergence


def test_identical_inputs_have_zero_divergence_and_infinite_psnr():
    x = np.random.default_rng(0).integers(0, 256, (8, 8, 3)).astype(np.float32)
    d = input_divergence(x, x.copy())
    assert d == {"px_equal": True, "px_max_abs": 0.0, "px_mean_abs": 0.0,
                 "px_frac_diff": 0.0, "px_psnr": math.inf}


def test_one_changed_channel_counts_its_pixel_as_different():
    a = np.zeros((2, 2, 3), np.float32)
    b = a.copy()
    b[0, 0, 1] = 10
    d = input_divergence(b, a)
    assert d["px_frac_diff"] == 0.25
    assert d["px_max_abs"] == 10 and d["px_mean_abs"] == pytest.approx(10 / 12)
    assert d["px_psnr"] == pytest.approx(10 * math.log10(255 ** 2 / (100 / 12)))


def test_output_metrics_on_a_known_pair():
    ref = np.array([3.0, 4.0, 0.0])
    y = np.array([3.0, 4.0, 5.0])
    d = output_divergence(y, ref)
    assert d["out_max_abs"] == 5.0
    assert d["out_mean_abs"] == pytest.approx(5 / 3)
    assert d["out_rel_l2"] == pytest.approx(1.0)             # |(0,0,5)| / |(3,4,0)|
    assert d["out_cosine"] == pytest.approx(25 / (5 * math.sqrt(50)))
    assert d["out_sqnr_db"] == pytest.approx(0.0)


def test_top1_flip_and_top5_overlap():
    ref = np.arange(10, dtype=np.float32)          # top-5: 9 8 7 6 5
    y = ref.copy()
    y[0] = 100                                     # top-5: 0 9 8 7 6
    d = classification_divergence(y, ref)
    assert (d["top1"], d["top1_ref"], d["top1_agree"]) == (0, 9, False)
    assert d["top5_overlap"] == pytest.approx(4 / 5)
    assert d["out_kl"] > 0


@settings(max_examples=50, deadline=None)
@given(arrays(np.float32, 20, elements=st.floats(-50, 50, width=32)))
def test_kl_is_zero_and_labels_agree_for_identical_outputs(v):
    d = classification_divergence(v, v.copy())
    assert d["top1_agree"] and d["top5_overlap"] == 1.0
    assert d["out_kl"] == pytest.approx(0.0, abs=1e-12)


@settings(max_examples=50, deadline=None)
@given(arrays(np.float32, 16, elements=st.floats(-10, 10, width=32)),
       arrays(np.float32, 16, elements=st.floats(-10, 10, width=32)))
def test_cosine_is_bounded_and_symmetric(a, b):
    d1, d2 = output_divergence(a, b), output_divergence(b, a)
    assert -1.0 - 1e-9 <= d1["out_cosine"] <= 1.0 + 1e-9
    assert d1["out_cosine"] == pytest.approx(d2["out_cosine"])
    assert d1["out_max_abs"] == d2["out_max_abs"]


# --- Kendall tau-b ------------------------------------------------------------------------------

def _tau_b_by_pairs(x: np.ndarray, y: np.ndarray) -> float | None:
    """The definition, pair by pair (dmx's own implementation before scipy's)."""
    iu = np.triu_indices(x.size, k=1)
    sx = np.sign(x[:, None] - x[None, :])[iu]
    sy = np.sign(y[:, None] - y[None, :])[iu]
    n1, n2 = float(np.count_nonzero(sx)), float(np.count_nonzero(sy))
    if x.size < 2 or n1 == 0 or n2 == 0:
        return None
    return float(np.sum(sx * sy)) / math.sqrt(n1 * n2)


_scores = st.floats(-1e6, 1e6, allow_nan=False)
_tied_scores = st.sampled_from([0.0, 0.25, 0.5, 1.0])


@st.composite
def _paired(draw, elements):
    n = draw(st.integers(0, 40))
    return (draw(arrays(np.float64, n, elements=elements)),
            draw(arrays(np.float64, n, elements=elements)))


@settings(max_examples=300, deadline=None)
@given(st.one_of(_paired(_scores), _paired(_tied_scores)))
def test_kendall_tau_b_equals_the_pairwise_definition_on_random_and_tied_scores(xy):
    from dmx.runner.metrics import kendall_tau_b
    x, y = xy
    want, got = _tau_b_by_pairs(x, y), kendall_tau_b(x, y)
    if want is None:
        assert got is None
    else:
        assert got == pytest.approx(want, abs=4.5e-16)  # scipy rounds within 2 ulp of 1.0


@settings(max_examples=200, deadline=None)
@given(arrays(np.float64, st.integers(2, 60), elements=_tied_scores | _scores))
def test_kendall_tau_b_of_the_same_or_reversed_ranking_is_exactly_plus_or_minus_one(x):
    from dmx.runner.metrics import kendall_tau_b
    if np.all(x == x[0]):
        assert kendall_tau_b(x, x) is None
    else:
        assert kendall_tau_b(x, x.copy()) == 1.0   # det_rank_tau < 1 counts a reordered image
        assert kendall_tau_b(x, -x) == -1.0


def test_kendall_tau_b_is_none_for_one_pair_or_a_constant_vector():
    from dmx.runner.metrics import kendall_tau_b
    assert kendall_tau_b(np.array([]), np.array([])) is None
    assert kendall_tau_b(np.array([0.3]), np.array([0.7])) is None
    assert kendall_tau_b(np.array([0.5, 0.5, 0.5]), np.array([0.1, 0.2, 0.3])) is None
    assert kendall_tau_b(np.array([0.1, 0.2, 0.3]), np.array([2.0, 2.0, 2.0])) is None


def test_kendall_tau_b_counts_equal_infinite_scores_as_a_tie():
    from dmx.runner.metrics import kendall_tau_b
    x = np.array([np.inf, np.inf, 1.0])   # inf - inf was NaN pair by pair
    assert kendall_tau_b(x, np.array([3.0, 2.0, 1.0])) == pytest.approx(2 / math.sqrt(6))
    assert math.isnan(kendall_tau_b(np.array([np.nan, 1.0, 2.0]), np.array([1.0, 2.0, 3.0])))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 9), st.integers(1, 9), st.sampled_from([1, 3]),
       st.integers(0, 2 ** 32 - 1), st.floats(0.0, 1.0))
def test_input_divergence_of_a_stack_is_the_pairwise_value_for_value(n, h, w, c, seed, share):
    from dmx.runner.metrics import input_divergence_rows
    rng = np.random.default_rng(seed)
    x = (rng.integers(0, 256, (n, h, w, c)) + rng.random((n, h, w, c))).astype(np.float32)
    ref = x.copy()
    change = rng.random((n, h, w, c)) < share                # some pairs equal, some not
    ref[change] = rng.integers(0, 256, int(change.sum())).astype(np.float32)
    ref[0] = x[0]                                            # at least one identical pair
    rows = input_divergence_rows(x, ref)
    for i in range(n):
        one = input_divergence(x[i], ref[i])
        assert {k: (bool(v[i]) if k == "px_equal" else float(v[i])) for k, v in rows.items()} == one


def test_the_rows_input_divergence_is_the_same_in_blocks_of_any_size(photo_dir, tmp_path,
                                                                     monkeypatch):
    import duckdb

    from dmx.matrix import parse_spec
    from dmx.runner import worker
    from dmx.runner.sweep import RunOptions, run_spec
    spec = parse_spec({"name": "blocks", "dataset": {"path": str(photo_dir)}, "model": "tiny",
                       "axes": {"decoder": ["pil", "opencv"], "resize": ["pil-bilinear", "cv2-area"]}})
    cols = "cell_id, image_id, px_equal, px_max_abs, px_mean_abs, px_frac_diff, px_psnr"

    def rows(out):
        run_spec(spec, RunOptions(out=str(out), executor="local", progress=False))
        return duckdb.sql(f"SELECT {cols} FROM read_parquet('{out}/rows/**/*.parquet') "
                          "ORDER BY cell_id, image_id").fetchall()

    whole = rows(tmp_path / "whole")
    monkeypatch.setattr(worker, "_DIVERGENCE_BLOCK_BYTES", 1)      # one pair per block
    assert rows(tmp_path / "pairs") == whole
    monkeypatch.setattr(worker, "_REF_STACK_KEEP_BYTES", 0)        # the reference's stacks made again
    assert rows(tmp_path / "unkept") == whole
    assert any(r[3] not in (None, 0.0) for r in whole), "some inputs differ"
