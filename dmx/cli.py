"""The ``dmx`` command: builds the parser from the command modules (``dmx/commands/``) and
dispatches. Library code raises typed errors; only here do they become one line on stderr and an
exit code (2 for bad input, 1 for a failed gate, 3 for a failed machine, 130 for Ctrl-C)."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from .commands import COMMANDS
from .commands.common import (EXIT_FAILED, EXIT_GATE, EXIT_INTERRUPTED,  # noqa: F401 (API)
                              EXIT_USAGE, CliError, Parser)

_USER_ERRORS = (("dmx.matrix.errors", "SpecError"), ("dmx.results.store", "RunDirError"),
                ("dmx.runner.convert", "ConversionError"), ("dmx.runner.executors", "ExecutorError"),
                ("dmx.runner.models.base", "ModelUnavailable"), ("dmx.runner.models.base", "UnknownModel"),
                ("dmx.runner.models.loading", "ModelLoadError"), ("dmx.analysis.check", "CheckError"),
                ("dmx.analysis.diff", "DiffError"), ("dmx.runner.envs", "EnvBuildError"),
                ("dmx.results.fs", "StorageError"), ("dmx.runner.localize.graph", "LocalizeError"),
                ("dmx.runner.label_classes", "LabelError"), ("dmx.runner.runtime_env", "RuntimeEnvError"),
                ("dmx.runner.artifacts", "ArtifactError"))


def _user_errors() -> tuple[type[BaseException], ...]:
    """The typed errors that are the user's to fix. Only modules already imported can have
    raised one, so none is imported here: a bad spec is refused without loading torch."""
    found = [getattr(sys.modules[m], n, None) for m, n in _USER_ERRORS if m in sys.modules]
    return (CliError, *(t for t in found if isinstance(t, type)))


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="dmx", description="Sweep a matrix of image pipeline variants "
                                        "over a dataset and explain which factors make outputs diverge.")
    sub = ap.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import dmx.runner.backends  # noqa: F401  (each backend registers its axes before a spec is read)
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
    handlers = {c.NAME: c.run for c in COMMANDS}
    try:
        return handlers[args.command](args)
    except _user_errors() as e:
        print(f"dmx: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\ndmx: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return 0


def entry() -> None:
    """The ``dmx`` console command (and ``python -m dmx``): ``main``, then ``exit_now``."""
    exit_now(main())


def exit_now(code: int | None) -> None:
    """Exit as the interpreter does - other non-daemon threads joined, atexit handlers run (Ray's
    shutdown, logging, temporary files, decoder servers), stdout and stderr flushed - but without
    its teardown of every module: with torch imported that teardown alone took 0.69 s, with Ray
    0.2-0.4 s more (~1 s after the last line of every ``dmx run``). Nothing dmx writes waits on
    it: files are closed where they are written."""
    import atexit
    import threading
    # what the interpreter's exit runs first: the threading module's exit hooks (they stop idle
    # ThreadPoolExecutor workers, which a plain join would wait on forever), then the joins
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):   # a closed pipe (`dmx ... | head`): nothing more to say
            pass
    os._exit(int(code or 0))
