"""Expansion of a spec into cells, and the reference cell."""
from __future__ import annotations

import hashlib
import itertools
import math
from dataclasses import dataclass
from typing import Iterator, Mapping

from .axes import AXES, Axis, DECODE, DEFAULT_LEVELS, INFER, PREPROCESS
from .errors import SpecError
from .spec import Spec


@dataclass(frozen=True)
class Cell:
    """One combination of levels. A factor is ``None`` where its axis does not apply."""

    cell_id: str
    factors: tuple[tuple[str, str | None], ...]

    def __getitem__(self, axis: str) -> str | None:
        return dict(self.factors).get(axis)

    def get(self, axis: str, default: str | None = None) -> str | None:
        v = dict(self.factors).get(axis)
        return default if v is None else v

    def key(self, stage: str) -> tuple[tuple[str, str | None], ...]:
        """The factors acting on one stage; equal keys mean the stage's work is shared."""
        stages = {DECODE: (DECODE,), PREPROCESS: (DECODE, PREPROCESS), INFER: (INFER,)}[stage]
        return tuple((a, v) for a, v in self.factors if AXES[a].stage in stages)

    def label(self) -> str:
        return " ".join(f"{a}={v}" for a, v in self.factors if v is not None)


def make_cell(factors: Mapping[str, str | None], order: tuple[str, ...]) -> Cell:
    """Build a cell, nulling axes that do not apply; the id hashes the non-null factors."""
    full = {a: factors.get(a) for a in order}
    context = {**DEFAULT_LEVELS, **{a: v for a, v in full.items() if v is not None}}
    for a in order:
        if full[a] is not None and not AXES[a].applies(context):
            full[a] = None
    items = tuple((a, full[a]) for a in order)
    text = ";".join(f"{a}={v}" for a, v in items if v is not None)
    return Cell(hashlib.sha1(text.encode()).hexdigest()[:10], items)


def _add(seen: dict[str, Cell], cell: Cell) -> None:
    """Keep ``cell`` under its id; the same factors twice are one cell (axes nulled where they
    do not apply make such repeats), two different cells under one 40-bit id are an error."""
    other = seen.setdefault(cell.cell_id, cell)
    if other.factors != cell.factors:
        raise SpecError("axes", f"cells {other.label()!r} and {cell.label()!r} hash to the same "
                                f"cell id {cell.cell_id}; change one level (e.g. its spelling)")


def _matches(cell: Cell, partial: Mapping[str, str]) -> bool:
    return all(cell[a] == v for a, v in partial.items())


# The default ``applies`` of an axis that applies to every cell (None if the registry changes).
_ALWAYS = getattr(getattr(Axis, "__dataclass_fields__", {}).get("applies"), "default", None)


def _product(spec: Spec) -> str:
    return f"{' x '.join(str(len(l)) for _, l in spec.axes)} = " \
           f"{math.prod(len(l) for _, l in spec.axes):,}"


def _too_many(spec: Spec, counted: int, complete: bool) -> SpecError:
    size = f"{counted:,}" if complete else f"at least {counted:,}"
    return SpecError("axes", f"the matrix has {size} cells (product of the levels "
                             f"{_product(spec)}); "
                             f"the limit is {spec.max_cells:,}: sweep fewer levels, exclude cells, "
                             "or raise it with --max-cells")


def expand(spec: Spec) -> list[Cell]:
    """All cells of the spec: the product of its axes, minus ``exclude``, plus ``include``.

    Raises SpecError when there are more than ``spec.max_cells``: expansion stops there, so a
    matrix of 10^12 combinations costs no more than one at the limit.
    """
    order = spec.axis_names
    # Axes that apply everywhere are never nulled, so their product is a lower bound on the
    # cells; an exclude removes at most the share of it that matches its levels on those axes.
    always = {a: len(lv) for a, lv in spec.axes
              if _ALWAYS is not None and getattr(AXES[a], "applies", None) is _ALWAYS}
    floor = math.prod(always.values())
    removed = sum(floor // math.prod(always[a] for a in ex if a in always) for ex in spec.exclude)
    if floor - removed > spec.max_cells:
        raise _too_many(spec, floor - removed, complete=False)
    seen: dict[str, Cell] = {}
    for n, combo in enumerate(itertools.product(*(levels for _, levels in spec.axes))):
        cell = make_cell(dict(zip(order, combo)), order)
        if n >= 10 * spec.max_cells and len(seen) < spec.max_cells:
            raise SpecError("axes", f"the matrix is a product of {_product(spec)} combinations, "
                                    f"too many to expand under the cell limit "
                                    f"({spec.max_cells:,}); sweep fewer levels or raise --max-cells")
        if any(_matches(cell, ex) for ex in spec.exclude):
            continue
        _add(seen, cell)
        if len(seen) > spec.max_cells:
            raise _too_many(spec, len(seen), complete=False)
    base = {a: levels[0] for a, levels in spec.axes}
    base.update(spec.reference)
    for inc in spec.include:
        _add(seen, make_cell({**base, **inc}, order))
    if len(seen) > spec.max_cells:
        raise _too_many(spec, len(seen), complete=True)
    return list(seen.values())


def reference_cell(spec: Spec, cells: list[Cell]) -> Cell:
    """The cell every other cell is compared to; axes the reference omits take their first level."""
    order = spec.axis_names
    factors = {a: levels[0] for a, levels in spec.axes}
    factors.update(spec.reference)
    ref = make_cell(factors, order)
    for c in cells:
        if c.cell_id == ref.cell_id:
            return c
    raise SpecError("reference", f"{ref.label()} is not a cell of the matrix (is it excluded?); "
                                 f"choose levels from the axes: "
                                 + "; ".join(f"{a}: {', '.join(l)}" for a, l in spec.axes))


def iter_stage_keys(cells: list[Cell], stage: str) -> Iterator[tuple]:
    """Distinct stage keys in first-seen order."""
    seen = set()
    for c in cells:
        k = c.key(stage)
        if k not in seen:
            seen.add(k)
            yield k
