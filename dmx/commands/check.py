"""``dmx check RUN``: the CI gate - exit 1 when a cell breaks a tolerance against the reference."""
from __future__ import annotations

import argparse
import json

from .common import EXIT_GATE, add_map_resamples, bounded_int

NAME = "check"


def add_parser(sub) -> None:
    p = sub.add_parser("check", help="CI gate: exit 1 when a cell breaks a tolerance against the reference")
    p.add_argument("run_dir")
    p.add_argument("--max-abs", type=float, default=None, metavar="LOGITS",
                   help="max abs output difference per image, in output units (default: not checked)")
    p.add_argument("--max-rel-l2", type=float, default=None, metavar="RATIO",
                   help="max ||out - ref|| / ||ref|| per image (default: 10 x torch.testing's rtol "
                        "of the precision the cell ran at; fp32 1.3e-5)")
    p.add_argument("--min-cosine", type=float, default=None,
                   help="min cosine similarity of the outputs per image (default 0.999; int8: none)")
    p.add_argument("--min-top1", type=float, default=None, metavar="FRACTION",
                   help="min share of images whose top-1 class equals the reference's (default 1.0)")
    p.add_argument("--scope", choices=("all", "same-input"), default=None,
                   help="all rows (default), or only rows whose model input equals the reference's")
    p.add_argument("--allow-lower-precision", action="store_true", default=None,
                   help="do not fail a cell that ran at a lower precision than it asked for")
    p.add_argument("--allow-errors", action="store_true", default=None,
                   help="do not fail a cell whose rows error where the reference's did not")
    p.add_argument("--max-reference-errors", type=bounded_int(0, 10**9), default=None, metavar="IMAGES",
                   help="images the reference cell may fail on (default 0); the other cells' rows "
                        "on them are not judged")
    p.add_argument("--max-accuracy-drop", type=float, default=None, metavar="POINTS",
                   help="fail a cell whose top-1 accuracy is lower than the reference's by more "
                        "than POINTS with 95%% confidence (needs dataset.labels; per cell: "
                        "check.max_accuracy_drop in the spec; docs/accuracy.md)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_map_resamples(p)


def run(a: argparse.Namespace) -> int:
    from dmx.analysis.check import check_run, render_check_text
    given = {"max_abs": a.max_abs, "max_rel_l2": a.max_rel_l2, "min_cosine": a.min_cosine,
             "min_top1_agreement": a.min_top1, "scope": a.scope,
             "allow_lower_precision": a.allow_lower_precision, "allow_errors": a.allow_errors,
             "max_reference_errors": a.max_reference_errors,
             "max_accuracy_drop": a.max_accuracy_drop}
    result = check_run(a.run_dir, {k: v for k, v in given.items() if v is not None},
                       map_resamples=a.map_resamples)
    if a.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(render_check_text(result))
    return 0 if result.passed else EXIT_GATE
