"""One module per ``dmx`` command: its argparse arguments (``add_parser``) and its handler
(``run``) side by side. ``dmx/cli.py`` only builds the parser from this list and dispatches.

Adding a command is one module here plus its line in ``COMMANDS`` (the order is ``dmx --help``'s).
Modules import only the standard library at the top: the heavy libraries (torch, Ray, DuckDB)
are imported inside handlers, so a bad spec is refused before any of them loads.
"""
from __future__ import annotations

from . import (check, compact, demo, diff, envs, explain, localize, plan, report, run, schema,
               sql)

COMMANDS = (run, plan, explain, sql, demo, report, check, diff, compact, localize, envs, schema)
