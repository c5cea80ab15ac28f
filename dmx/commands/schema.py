"""``dmx schema [--spec]``: the Parquet row columns, or the JSON Schema of a spec file."""
from __future__ import annotations

import argparse
import json

NAME = "schema"


def add_parser(sub) -> None:
    p = sub.add_parser("schema", help="print the Parquet row columns (name, type, unit, meaning), "
                                      "or with --spec the JSON Schema of a spec file")
    p.add_argument("--spec", action="store_true",
                   help="print the JSON Schema of a matrix spec (for editors: yaml-language-server)")


def run(a: argparse.Namespace) -> int:
    if a.spec:
        from dmx.matrix.schema import spec_json_schema
        print(json.dumps(spec_json_schema(), indent=2))
        return 0
    from dmx.results.schema import columns_markdown
    print(columns_markdown())
    return 0
