"""``dmx explain RUN``: rank the factors that drive divergence in a run."""
from __future__ import annotations

import argparse
import json

from .common import add_map_resamples, json_default

NAME = "explain"


def add_parser(sub) -> None:
    p = sub.add_parser("explain", help="rank the factors that drive divergence in a run")
    p.add_argument("run_dir")
    p.add_argument("--format", choices=("text", "json", "markdown"), default="text")
    add_map_resamples(p)


def run(a: argparse.Namespace) -> int:
    from dmx.analysis.explain import explain_run
    from dmx.analysis.render import render_markdown, render_text
    e = explain_run(a.run_dir, map_resamples=a.map_resamples)
    if a.format == "json":
        print(json.dumps(e.to_json(), indent=2, default=json_default))
    elif a.format == "markdown":
        print(render_markdown(e))
    else:
        print(render_text(e))
    return 0
