"""Divergence metrics on known inputs."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from runner.metrics import classification_divergence, input_divergence, output_divergence


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
