"""``dmx plan SPEC``: print the expanded cells and the reference, without running anything."""
from __future__ import annotations

import argparse

from .common import add_max_cells, load_planned

NAME = "plan"


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="print the expanded cells and the reference")
    p.add_argument("spec")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE")
    add_max_cells(p)


def run(a: argparse.Namespace) -> int:
    spec, cells, ref = load_planned(a)
    print(f"spec {spec.name!r}: {len(cells)} cells; reference {ref.cell_id}: {ref.label()}")
    for c in cells:
        mark = "*" if c.cell_id == ref.cell_id else " "
        print(f"{mark} {c.cell_id}  {c.label()}")
    return 0
