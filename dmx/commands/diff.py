"""``dmx diff RUN_A RUN_B``: compare two runs of one spec - cells that moved, environment changes."""
from __future__ import annotations

import argparse
import json

from .common import EXIT_GATE

NAME = "diff"


def add_parser(sub) -> None:
    p = sub.add_parser("diff", help="compare two runs of one spec: cells that moved, environment changes")
    p.add_argument("run_a", help="the baseline run directory")
    p.add_argument("run_b", help="the run to compare with it")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--fail-if-moved", action="store_true", help="exit 1 when any cell moved")


def run(a: argparse.Namespace) -> int:
    from dmx.analysis.diff import diff_runs, render_diff_text
    result = diff_runs(a.run_a, a.run_b)
    if a.json:
        print(json.dumps(result.to_json(), indent=2, default=str))
    else:
        print(render_diff_text(result))
    return EXIT_GATE if a.fail_if_moved and result.moved else 0
