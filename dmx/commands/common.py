"""What every command shares: exit codes, the one-line user error, the argparse pieces, and the
checks several commands make before anything heavy is imported."""
from __future__ import annotations

import argparse
import sys
import typing
from pathlib import Path

EXIT_GATE = 1
EXIT_USAGE = 2
EXIT_FAILED = 3  # the machine failed the run (disk full, a Ray process lost): resume it
EXIT_INTERRUPTED = 130

# Bounds of the numeric options, with the reason a user sees when they pass one beyond them.
MAX_WORKERS = 1024
MAX_BATCH = 4096  # as the spec's batch axis: 4096 x 3 x 224 x 224 float32 is 2.5 GB
MAX_CHUNK = 1_000_000


class CliError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``dmx run: error: ...``), not usage + error."""

    def error(self, message: str) -> "typing.NoReturn":  # type: ignore[name-defined]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def bounded_int(lo: int, hi: int, why: str = ""):
    """An argparse type: an integer from ``lo`` to ``hi``; anything else is a one-line error."""
    def parse(text: str) -> int:
        try:
            v = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(
                f"must be a positive integer, got {v}" if lo == 1 else f"must be at least {lo}, got {v}")
        if v > hi:
            raise argparse.ArgumentTypeError(f"must be at most {hi:,}{f' ({why})' if why else ''}, got {v:,}")
        return v
    parse.__name__ = "integer"
    return parse


def _positive_seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return v


def _seconds(text: str) -> float:
    """A number of seconds, 0 or more (0: do not wait)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 or a positive number of seconds, got {text}")
    return v


def add_run_options(p: argparse.ArgumentParser) -> None:
    """The options of a sweep (``dmx run`` and ``dmx demo``)."""
    p.add_argument("--executor", choices=("ray", "local"), default="ray",
                   help="ray (default: embedded local Ray, or the cluster at --address/RAY_ADDRESS) "
                        "or local (in-process)")
    p.add_argument("--workers", type=bounded_int(1, MAX_WORKERS), default=None,
                   help="at most this many workers (default: one per CPU the Ray cluster offers)")
    p.add_argument("--threads-per-worker", type=bounded_int(1, 256), default=1, metavar="T",
                   help="intra-op threads (and Ray CPUs) per worker: fewer workers, each with more "
                        "threads (default 1: one worker per CPU, as far as memory allows)")
    p.add_argument("--gpus-per-worker", type=float, default=None, metavar="G",
                   help="GPUs each worker asks Ray for when cells run on CUDA (default 1; "
                        "a fraction such as 0.25 packs four workers on a GPU)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS)")
    p.add_argument("--runtime-env", default="auto", metavar="ENV",
                   help="what Ray gives the workers on a cluster: auto (default: dmx's own "
                        "packages by py_modules), none (the nodes have dmx installed), or a Ray "
                        "runtime_env as JSON or a .json/.yaml file (pip/uv requirements, "
                        "env_vars, py_modules...; \"pip\": \"pinned\" = dmx's requirements at "
                        "this machine's versions)")
    p.add_argument("--chunk-deadline", type=_positive_seconds, default=None, metavar="S",
                   help="seconds a chunk may run before its worker is killed as hung and the "
                        "chunk rescheduled (default: 10x the slowest per-image time so far x "
                        "its images, at least 300)")
    p.add_argument("--wait-for-nodes", type=_seconds, default=None, metavar="S",
                   help="when no node of the cluster can run a worker (all preempted, scaled to "
                        "zero), wait this long for one to join before stopping with finished "
                        "chunks saved (default: 300 on a cluster, 0 on the embedded Ray)")
    p.add_argument("--chunk-size", type=bounded_int(1, MAX_CHUNK), default=None,
                   help="images per chunk (default: sized from the matrix)")
    p.add_argument("--batch", type=bounded_int(1, MAX_BATCH, "a batch is held in memory at once"),
                   default=8, help=f"inference batch size (default 8, at most {MAX_BATCH})")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--verbose", action="store_true",
                   help="also show Ray's own log lines and the workers' output (off by default: "
                        "library warnings go to the rows' decode_note)")
    add_max_cells(p)


def add_max_cells(p: argparse.ArgumentParser) -> None:
    from dmx.matrix.spec import DEFAULT_MAX_CELLS
    p.add_argument("--max-cells", type=bounded_int(1, 10**9), default=DEFAULT_MAX_CELLS,
                   help=f"refuse a matrix of more cells (default {DEFAULT_MAX_CELLS:,})")


def load_planned(a: argparse.Namespace):
    """The spec, checked whole before anything heavy is imported: schema, cell limit, reference."""
    from dmx.matrix import expand, load_spec, reference_cell
    spec = load_spec(a.spec, a.override, max_cells=a.max_cells)
    cells = expand(spec)
    return spec, cells, reference_cell(spec, cells)


def check_out(out: str, flag: str = "--out") -> None:
    """Refuse an output path that is a file, or lies under one."""
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise CliError(f"{flag} {out} is a file; give a folder (dmx writes a run directory there)")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise CliError(f"{flag} {out}: {parent} is a file, not a folder")
            break


def json_default(v: object) -> object:
    """``json.dumps`` fallback for values JSON has no type for: their str() (a float: null)."""
    if isinstance(v, float):
        return None
    return str(v)


def summarise(out: str) -> None:
    """Keep the run's aggregates (``summary/``) beside the freshly compacted rows. They only
    make explain, check, report and diff faster: whatever fails here (a full disk, a DuckDB
    error, a defect) is a one-line warning, and the commands read the rows instead - never a
    compaction that looks failed, since the rows are compacted and safe by now."""
    from dmx.analysis.aggregates import write_summary
    from dmx.results.store import RunDirError
    try:
        write_summary(out)
    except RunDirError:          # no readable rows: explain will say so itself
        pass
    except Exception as e:  # noqa: BLE001 - the summary is optional; the rows are safe
        print(f"dmx: warning: the run's summary was not written ({type(e).__name__}: "
              f"{str(e).splitlines()[0] if str(e) else ''}); explain, check, report and diff "
              "will read the rows", file=sys.stderr)


def add_map_resamples(p) -> None:
    """``--map-resamples N``: the paired bootstrap's resamples for a detector's mAP change against
    the reference (commands that read detection ground truth; docs/accuracy.md for the cost)."""
    p.add_argument("--map-resamples", type=bounded_int(1, 100_000), default=200, metavar="N",
                   help="bootstrap resamples for a detector's mAP change (default 200; each costs "
                        "one COCOeval.accumulate per side)")
