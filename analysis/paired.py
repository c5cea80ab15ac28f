"""Paired accuracy statistics: a cell against the reference cell on the same images.

Pure functions, arrays in and numbers out. Accuracies and their changes are in **points**
(percentage points: 71.23 % -> 71.68 % is +0.45 points). Inputs are per-image correctness of the
cell and of the reference, aligned by image; an image missing on either side (no label, an error
row: null in an Arrow array) is left out of the pair, so both accuracies are over the same images.

- the change's interval is a paired bootstrap over images (percentile, seeded). Each image's
  difference is -1, 0 or +1, so a resample of n images is fully described by how many
  right->wrong and wrong->right images it drew: a multinomial draw, exactly the distribution of
  the index bootstrap, at a cost independent of n (2,000 resamples take ~1 ms at any n);
- McNemar's exact test is the two-sided binomial test of right->wrong against wrong->right
  (p = 0.5): the same value as ``scipy.stats.binomtest(b, b + c)``;
- the gate fails a cell only when its drop is beyond the limit *with confidence*: the interval's
  upper bound (the smallest drop it allows) is itself a drop beyond the limit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["GATE_STATUSES", "AccuracyGate", "PairedAccuracy", "accuracy_gate", "accuracy_points",
           "bootstrap_delta_interval", "discordant_counts", "format_p", "indistinguishable_from_zero", "interval_from_counts", "unchanged_bound",
           "mcnemar_exact_p", "paired_accuracy", "paired_correct", "paired_from_counts", "verdict"]

#: ``fail``: a drop beyond the limit with confidence; ``pass``: not shown to be; ``not_judged``:
#: no image was judged on both sides (a gate never passes what it could not judge).
GATE_STATUSES = ("pass", "fail", "not_judged")


def _bool_and_valid(x: Any) -> tuple[np.ndarray, np.ndarray]:
    """(values, valid) from a numpy bool array, a sequence with None, or an Arrow array."""
    if hasattr(x, "to_numpy") and hasattr(x, "is_valid"):  # pyarrow Array / ChunkedArray
        import pyarrow.compute as pc

        valid = np.asarray(pc.is_valid(x).to_numpy(zero_copy_only=False), bool)
        return np.asarray(pc.fill_null(x, False).to_numpy(zero_copy_only=False), bool), valid
    arr = np.asarray(x)
    if arr.dtype == object:
        valid = np.array([v is not None for v in arr.ravel()], bool)
        return np.array([bool(v) if v is not None else False for v in arr.ravel()], bool), valid
    if arr.dtype.kind == "f":
        return np.nan_to_num(arr) != 0, ~np.isnan(arr)
    return arr.astype(bool), np.ones(arr.shape, bool)


def paired_correct(cell_correct: Any, ref_correct: Any) -> tuple[np.ndarray, np.ndarray]:
    """Both correctness vectors cut to the images judged on both sides (bool arrays)."""
    c, cv = _bool_and_valid(cell_correct)
    r, rv = _bool_and_valid(ref_correct)
    if c.shape != r.shape or c.ndim != 1:
        raise ValueError(f"cell and reference need one value per image, got {c.shape} and {r.shape}")
    keep = cv & rv
    return c[keep], r[keep]


def accuracy_points(correct: Any) -> float:
    """Share of correct images in points (0-100); NaN with no image. Nulls are left out."""
    v, valid = _bool_and_valid(correct)
    n = int(valid.sum())
    return float("nan") if n == 0 else 100.0 * int((v & valid).sum()) / n


def discordant_counts(cell_correct: Any, ref_correct: Any) -> tuple[int, int]:
    """(right->wrong, wrong->right): images the reference got right and the cell wrong, and
    the other way round."""
    c, r = paired_correct(cell_correct, ref_correct)
    return int((r & ~c).sum()), int((~r & c).sum())


def mcnemar_exact_p(right_to_wrong: int, wrong_to_right: int) -> float:
    """Two-sided exact McNemar p-value: binomial test of one discordant count among both at 0.5.

    With p = 0.5 the binomial is symmetric, so the two-sided value is twice the smaller tail
    (capped at 1); no discordant pair gives 1.
    """
    b, c = int(right_to_wrong), int(wrong_to_right)
    if b < 0 or c < 0:
        raise ValueError(f"counts must be >= 0, got {b} and {c}")
    n = b + c
    if n == 0 or b == c:
        return 1.0
    from scipy.stats import binom

    return float(min(1.0, 2.0 * binom.cdf(min(b, c), n, 0.5)))


def bootstrap_delta_interval(cell_correct: Any, ref_correct: Any, resamples: int = 2000,
                             seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval (points) of cell minus reference accuracy, paired bootstrap over images.

    Equivalent to resampling image indices with replacement ``resamples`` times (see the module
    note); deterministic for a given ``seed``. (nan, nan) with no image.
    """
    c, r = paired_correct(cell_correct, ref_correct)
    return _interval(len(c), int((r & ~c).sum()), int((~r & c).sum()), resamples, seed, level)


def interval_from_counts(n: int, right_to_wrong: int, wrong_to_right: int, resamples: int = 2000,
                         seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """The paired bootstrap interval (points) from the counts alone: n paired images, of which
    ``right_to_wrong`` and ``wrong_to_right`` are discordant (the interval depends on nothing
    else); the same numbers as ``bootstrap_delta_interval`` on the images."""
    if min(n, right_to_wrong, wrong_to_right) < 0 or right_to_wrong + wrong_to_right > n:
        raise ValueError(f"inconsistent counts: n={n}, right_to_wrong={right_to_wrong}, "
                         f"wrong_to_right={wrong_to_right}")
    return _interval(int(n), int(right_to_wrong), int(wrong_to_right), resamples, seed, level)


def _interval(n: int, rw: int, wr: int, resamples: int, seed: int, level: float
              ) -> tuple[float, float]:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if n == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n, [rw / n, wr / n, (n - rw - wr) / n], size=resamples)
    deltas = 100.0 * (draws[:, 1] - draws[:, 0]) / n
    lo, hi = np.quantile(deltas, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


@dataclass(frozen=True)
class PairedAccuracy:
    """A cell against the reference on the same ``n`` images; accuracies and changes in points."""

    n: int
    acc_cell: float
    acc_ref: float
    delta: float
    ci_low: float
    ci_high: float
    right_to_wrong: int
    wrong_to_right: int
    p_value: float
    level: float = 0.95
    resamples: int = 2000
    seed: int = 0

    @property
    def indistinguishable(self) -> bool:
        """The interval contains 0: no change can be told from noise at this n."""
        return indistinguishable_from_zero(self.ci_low, self.ci_high)

    def text(self) -> str:
        """``-0.41 pts [-0.66, -0.17], 52 right->wrong, 11 wrong->right, p = 3e-7``."""
        if self.n == 0:
            return "no image judged on both sides"
        return (f"{self.delta:+.2f} pts [{self.ci_low:+.2f}, {self.ci_high:+.2f}], "
                f"{self.right_to_wrong} right->wrong, {self.wrong_to_right} wrong->right, "
                f"p = {format_p(self.p_value)}")


def paired_accuracy(cell_correct: Any, ref_correct: Any, *, resamples: int = 2000,
                    seed: int = 0, level: float = 0.95) -> PairedAccuracy:
    """Accuracy of the cell and the reference, the change (points) with its paired bootstrap
    interval, the discordant counts and McNemar's exact p, over the images judged on both."""
    c, r = paired_correct(cell_correct, ref_correct)
    return paired_from_counts(len(c), int(r.sum()), int((r & ~c).sum()), int((~r & c).sum()),
                              resamples=resamples, seed=seed, level=level)


def paired_from_counts(n: int, ref_right: int, right_to_wrong: int, wrong_to_right: int, *,
                       resamples: int = 2000, seed: int = 0, level: float = 0.95
                       ) -> PairedAccuracy:
    """``paired_accuracy`` from four counts over the n paired images (what one SQL aggregate
    per cell gives: no per-image array leaves DuckDB); the same result, bit for bit."""
    n, ref_right, rw, wr = int(n), int(ref_right), int(right_to_wrong), int(wrong_to_right)
    if min(n, ref_right, rw, wr) < 0 or rw > ref_right or wr > n - ref_right:
        raise ValueError(f"inconsistent counts: n={n}, ref_right={ref_right}, "
                         f"right_to_wrong={rw}, wrong_to_right={wr}")
    lo, hi = _interval(n, rw, wr, resamples, seed, level)
    pts = (lambda k: 100.0 * k / n) if n else (lambda k: float("nan"))
    return PairedAccuracy(n=n, acc_cell=pts(ref_right - rw + wr), acc_ref=pts(ref_right),
                          delta=pts(wr - rw), ci_low=lo, ci_high=hi, right_to_wrong=rw,
                          wrong_to_right=wr, p_value=mcnemar_exact_p(rw, wr), level=level,
                          resamples=resamples, seed=seed)


def unchanged_bound(n: int, level: float = 0.95) -> float:
    """Points: the largest change (either way) not ruled out when none of ``n`` paired images
    changed. The bootstrap interval is then [0, 0] - it resamples no discordant image - but
    the discordant rate is only known to be below the exact (Clopper-Pearson) upper bound of
    0 of n, 1 - ((1 - level) / 2) ** (1 / n): 37 points at n = 8, 0.74 at n = 500."""
    if n <= 0:
        return float("nan")
    return 100.0 * (1.0 - ((1.0 - level) / 2.0) ** (1.0 / n))


def indistinguishable_from_zero(ci_low: float, ci_high: float) -> bool:
    """The interval [ci_low, ci_high] contains 0 (False for a NaN interval: nothing judged)."""
    return bool(ci_low <= 0.0 <= ci_high)


def verdict(r: PairedAccuracy) -> str:
    """One phrase for a contrast: ``indistinguishable from zero at n = 20``, ``a drop``,
    ``a gain``, or ``not judged``."""
    if r.n == 0 or math.isnan(r.ci_low):
        return "not judged (no image labelled and judged on both sides)"
    if r.indistinguishable:
        return f"indistinguishable from zero at n = {r.n}"
    return ("a drop" if r.ci_high < 0 else "a gain") + f" ({r.level:.0%} interval excludes 0)"


@dataclass(frozen=True)
class AccuracyGate:
    """A gate's decision on one cell. ``drop`` and ``bound`` in points, positive = worse:
    ``bound`` is the smallest drop the interval allows (-ci_high). ``conclusive`` is False when
    the interval straddles the limit (the cell passes, but a drop beyond it is not ruled out)."""

    status: str
    drop: float
    bound: float
    limit: float
    conclusive: bool
    message: str


def accuracy_gate(r: PairedAccuracy, max_drop: float) -> AccuracyGate:
    """Fail when the drop is beyond ``max_drop`` points with confidence (bound > limit)."""
    if max_drop < 0 or math.isnan(max_drop):
        raise ValueError(f"max_drop is a drop in points, >= 0; got {max_drop}")
    if r.n == 0 or math.isnan(r.ci_high):
        return AccuracyGate("not_judged", float("nan"), float("nan"), max_drop, False,
                            "accuracy not judged: no image labelled and judged on both sides")
    drop, bound, worst = -r.delta, -r.ci_high, -r.ci_low
    lvl = f"{r.level:.0%}"
    if bound > max_drop:
        return AccuracyGate("fail", drop, bound, max_drop, True,
                            f"accuracy {r.text()}: a drop beyond {max_drop:.2f} pts with {lvl} "
                            f"confidence (at least {bound:.2f} pts, n = {r.n})")
    if r.right_to_wrong + r.wrong_to_right == 0:   # [0, 0] knows nothing beyond 0 of n changed
        worst = max(worst, unchanged_bound(r.n, r.level))
    conclusive = worst <= max_drop
    tail = "" if conclusive else (f"; a drop up to {worst:.2f} pts is not ruled out at n = {r.n}")
    return AccuracyGate("pass", drop, bound, max_drop, conclusive,
                        f"accuracy {r.text()}: no drop beyond {max_drop:.2f} pts shown{tail}")


def format_p(p: float) -> str:
    """A p-value as people write it: ``1``, ``0.032``, ``3e-7``."""
    if math.isnan(p):
        return "nan"
    if p >= 0.001:
        return f"{p:.2g}" if p < 1 else "1"
    mant, exp = f"{p:.0e}".split("e")
    return f"{mant}e{int(exp)}"
