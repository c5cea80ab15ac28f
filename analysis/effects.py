"""Factor shares for real (nested, unbalanced) designs: type-II sums of squares by least squares.

The response is a per-row metric (the ranking's cosine distance to the reference); predictors are
the cells' factor levels, so the fit works on per-cell sufficient statistics (count, mean, sum of
squares within the cell) rather than on every row: a weighted least-squares fit of the cell means
with weights n gives the same coefficients, and the row-level residual sum of squares is the
weighted one plus the within-cell sum of squares.

- **Nested axes.** An axis that is null in some cells (``openvino_hint`` on torch cells) is coded
  only where it applies: one indicator per non-base level, zero elsewhere. Its levels are compared
  within the cells it applies to; "does not apply" is never a level of its own (that difference
  belongs to the parent, e.g. ``backend``). Its ``within`` names the parent levels.
- **Main effects (type II).** SS(A) = RSS(all main effects but A) - RSS(all main effects): what A
  explains beyond every other factor; for a parent axis, the axes nested within it are left out
  of both fits (type II adjusts a term for the terms that do not contain it). Valid when ``exclude``, skipped cells and error rows
  unbalance the design; equals the classic eta² numerator on a balanced one.
- **Interactions.** SS(AB) = RSS(all main effects) - RSS(all main effects + the A x B product
  columns): what the pair explains beyond every main effect.
- **Shares.** SS / SS_total. Type-II terms are not orthogonal on unbalanced data and their sum can
  exceed what the cells explain; the shares are then scaled down together (``scale`` < 1) so that
  main effects plus interactions never sum above ``explained`` = 1 - within-cell SS / SS_total
  (the most any factor model of cell-level factors can explain), itself <= 1.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

EPS = 1e-12


@dataclass(frozen=True)
class CellStat:
    """One cell's levels and its metric's count, mean and within-cell sum of squares."""

    levels: Mapping[str, str | None]
    n: int
    mean: float
    ss_within: float


@dataclass
class Attribution:
    """Shares of the metric's total sum of squares (0-1), per factor and per pair of factors."""

    main: dict[str, float]
    interactions: list[dict[str, Any]]
    explained: float
    scale: float
    nested: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    ss_total: float = 0.0
    n: int = 0


def _coding(cells: Sequence[CellStat], axis: str, base: str | None) -> np.ndarray:
    """Indicator columns (cells x non-base levels) of ``axis``; null cells are 0 everywhere."""
    levels = sorted({str(c.levels.get(axis)) for c in cells if c.levels.get(axis) is not None})
    if base not in levels:
        base = levels[0]
    cols = [np.array([1.0 if c.levels.get(axis) is not None and str(c.levels[axis]) == lv else 0.0
                      for c in cells]) for lv in levels if lv != base]
    return np.stack(cols, axis=1) if cols else np.zeros((len(cells), 0))


def _rss(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    """Weighted residual sum of squares of y on [1, x] (rank deficiency allowed)."""
    sw = np.sqrt(w)
    design = np.concatenate([np.ones((len(y), 1)), x], axis=1) * sw[:, None]
    target = y * sw
    beta, *_ = np.linalg.lstsq(design, target, rcond=None)
    r = target - design @ beta
    return float(r @ r)


def nesting(cells: Sequence[CellStat], axis: str, axes: Sequence[str]) -> dict[str, list[str]]:
    """The parent levels an axis applies within: {other axis: its levels where ``axis`` is set},
    for every other axis whose levels alone decide whether ``axis`` applies."""
    on = [c for c in cells if c.levels.get(axis) is not None]
    off = [c for c in cells if c.levels.get(axis) is None]
    out: dict[str, list[str]] = {}
    for other in axes:
        if other == axis:
            continue
        inside = {str(c.levels.get(other)) for c in on}
        outside = {str(c.levels.get(other)) for c in off}
        if off and not inside & outside:
            out[other] = sorted(inside)
    return out


def attribute(cells: Sequence[CellStat], axes: Sequence[str],
              base: Mapping[str, str | None] | None = None, top: int = 5) -> Attribution:
    """Type-II shares of each varying axis and pair of axes (see the module docstring).
    ``base``: the reference's level per axis (the coding's base level; shares do not depend
    on it)."""
    cells = [c for c in cells if c.n > 0 and np.isfinite(c.mean)]
    base = base or {}
    varying = [a for a in axes
               if len({str(c.levels.get(a)) for c in cells if c.levels.get(a) is not None}) > 1]
    n = np.array([c.n for c in cells], float)
    y = np.array([c.mean for c in cells], float)
    within = float(sum(c.ss_within for c in cells))
    total_n = float(n.sum())
    if not cells or total_n == 0:
        return Attribution({}, [], 0.0, 1.0)
    grand = float((n * y).sum() / total_n)
    ss_total = float((n * (y - grand) ** 2).sum()) + within
    if not varying or ss_total <= EPS:
        return Attribution({a: 0.0 for a in varying}, [], 0.0, 1.0, ss_total=ss_total, n=int(total_n))
    coding = {a: _coding(cells, a, base.get(a)) for a in varying}
    nested = {a: nesting(cells, a, varying) for a in varying
              if any(c.levels.get(a) is None for c in cells)}

    def rss(terms: Sequence[np.ndarray]) -> float:
        x = np.concatenate(terms, axis=1) if terms else np.zeros((len(cells), 0))
        return _rss(x, y, n) + within

    full = rss([coding[a] for a in varying])
    # Type II: a term is adjusted for every term that does not contain it; an axis nested within
    # A (openvino_hint within backend) contains A, so SS(A) leaves A's nested axes out of both fits.
    children = {a: {x for x, parents in nested.items() if a in parents} for a in varying}

    def ss_main(a: str) -> float:
        kept = [b for b in varying if b != a and b not in children[a]]
        return max(0.0, rss([coding[b] for b in kept]) - rss([coding[b] for b in kept + [a]]))

    main = {a: ss_main(a) for a in varying}
    inter: list[dict[str, Any]] = []
    for a, b in itertools.combinations(varying, 2):
        prod = [coding[a][:, i] * coding[b][:, j] for i in range(coding[a].shape[1])
                for j in range(coding[b].shape[1])]
        prod = [p for p in prod if p.any()]
        ss = 0.0
        if prod:
            ss = max(0.0, full - rss([coding[c] for c in varying] + [np.stack(prod, axis=1)]))
        inter.append({"factors": [a, b], "ss": ss})
    explained = max(0.0, 1.0 - within / ss_total)
    raw = sum(main.values()) / ss_total + sum(i["ss"] for i in inter) / ss_total
    scale = min(1.0, explained / raw) if raw > EPS else 1.0
    shares = {a: main[a] / ss_total * scale for a in varying}
    interactions = [{"factors": i["factors"], "eta_squared": i["ss"] / ss_total * scale}
                    for i in inter]
    interactions.sort(key=lambda d: -d["eta_squared"])
    return Attribution(dict(sorted(shares.items(), key=lambda kv: -kv[1])), interactions[:top],
                       explained, scale, nested, ss_total, int(total_n))
