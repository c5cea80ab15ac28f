"""``dmx run SPEC --out DIR``: sweep a matrix spec into a run directory. Also the sweep and its
console summary that ``dmx demo`` shares."""
from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import sys
from pathlib import Path

from .common import EXIT_FAILED, EXIT_INTERRUPTED, add_run_options, check_out, load_planned

NAME = "run"
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
NOT_READ_SHOWN = 50


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="run a matrix spec into a run directory")
    p.add_argument("spec", help="matrix spec (YAML)")
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec key, e.g. -o backend=torch,openvino -o dataset.limit=10")
    p.add_argument("--resume", action="store_true", help="finish an interrupted run in --out")
    p.add_argument("--no-compact", action="store_true",
                   help="keep one part file per chunk (default: merge them into few files sorted "
                        "by cell when the run ends; see `dmx compact`)")
    add_run_options(p)


def run(a: argparse.Namespace) -> int:
    check_out(a.out)
    spec, _, _ = load_planned(a)
    return run_and_report(spec, a, a.out, resume=a.resume, explain=False, spec_path=a.spec)


def resume_command(spec_path: str, out: str, a: argparse.Namespace) -> str:
    """The command that finishes this run: the same spec, overrides and executor, --resume."""
    import shlex
    if spec_path == "(demo)":
        return f"dmx demo --out {shlex.quote(str(Path(out).parent))}"
    parts = ["dmx", "run", spec_path, "--out", out]
    for ov in getattr(a, "override", None) or []:
        parts += ["-o", ov]
    if getattr(a, "executor", "ray") != "ray":
        parts += ["--executor", a.executor]
    if getattr(a, "address", None):
        parts += ["--address", a.address]
    if getattr(a, "runtime_env", "auto") != "auto":
        parts += ["--runtime-env", a.runtime_env]
    return " ".join(shlex.quote(p) for p in parts) + " --resume"


def _disk_full(e: BaseException) -> OSError | None:
    """The no-space error behind ``e`` (itself, its cause, or a Ray task error's cause)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno in _DISK_FULL:
            return x
        todo += [getattr(x, "cause", None), x.__cause__, x.__context__]
    return None


def _lost_worker_errors() -> tuple[type[BaseException], ...]:
    """Ray's errors: a worker, actor, node or system process that died, or a task that failed
    (only when Ray is loaded; no Ray error can be raised otherwise)."""
    found = [getattr(sys.modules.get("ray.exceptions"), "RayError", None),
             getattr(sys.modules.get("dmx.runner.executors"), "WorkersLost", None)]
    return tuple(t for t in found if isinstance(t, type)) or (_NeverRaised,)


class _NeverRaised(Exception):
    """Stands in for Ray's errors when Ray is not loaded."""


def run_and_report(spec, a: argparse.Namespace, out: str, *, resume: bool, explain: bool,
                   spec_path: str) -> int:
    """Sweep ``spec`` into ``out`` and print the summary; a lost worker or a full disk is one
    line with the resume command (exit 3), Ctrl-C exit 130."""
    from dmx.runner.sweep import RunOptions
    if getattr(a, "verbose", False):
        os.environ["DMX_VERBOSE"] = "1"   # read where Ray starts (runner/executors.py)
    elif a.executor == "ray":
        from dmx.runner.quiet_stderr import drop_ray_core_lines
        drop_ray_core_lines()             # Ray's C++ log lines stay off the console
    # Compaction and explain's summary run in a child process (``dmx compact``) once the rows
    # are written: their DuckDB memory is not the driver's, whose RSS stays flat with the run.
    compact = not getattr(a, "no_compact", False)
    opts = RunOptions(out=out, executor=a.executor, workers=a.workers, address=a.address,
                      chunk_size=a.chunk_size, batch=a.batch, resume=resume, progress=not a.quiet,
                      gpus_per_worker=a.gpus_per_worker,
                      threads_per_worker=getattr(a, "threads_per_worker", 1), compact=False,
                      runtime_env=getattr(a, "runtime_env", "auto"),
                      chunk_deadline_s=getattr(a, "chunk_deadline", None),
                      node_wait_s=getattr(a, "wait_for_nodes", None))
    if a.executor == "ray":
        from dmx.runner.runtime_env import parse
        parse(getattr(a, "runtime_env", "auto"))   # a bad --runtime-env: one line, before Ray
    resume_cmd = resume_command(spec_path, out, a)
    if spec.model.weights:
        # Refused here, once, as one line - not as an error row per image in every worker.
        from dmx.runner.models.loading import load_weights
        load_weights(spec.model.weights)
    if spec.dataset.labels is not None:
        # Read and mapped here, once: an unmapped label is one line before the model converts.
        from dmx.runner.labels import check_spec_labels
        check_spec_labels(spec)
    # started now, so that its imports (~0.5 s) overlap Ray's start; it compacts the rows when
    # they are all written, while this process merges the image facts, then writes the summary
    compactor = _Compactor(out) if compact else None
    if compactor is not None:
        opts = dataclasses.replace(opts, rows_written=compactor.start_rows)
    try:
        return _run_and_report(spec, opts, a, out, resume_cmd, compactor, explain)
    finally:
        if compactor is not None:
            compactor.cancel()


def _run_and_report(spec, opts, a, out: str, resume_cmd: str, compactor: "_Compactor | None",
                    explain: bool) -> int:
    from dmx.runner.sweep import run_spec
    try:
        s = run_spec(spec, opts)
    except KeyboardInterrupt:
        print(f"\ndmx: interrupted; finished chunks are saved. Resume with:\n"
              f"  {resume_cmd}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - only the two failures below; others re-raised
        full = _disk_full(e)
        if full is not None:
            print(f"dmx: error: no space left writing {out} ({full.strerror or full}); finished "
                  f"chunks are saved. Free space, then resume with: {resume_cmd}", file=sys.stderr)
            return EXIT_FAILED
        if not isinstance(e, _lost_worker_errors()):
            raise
        why = getattr(e, "cause", None) or e  # a task's own error, where Ray wraps one
        first = (str(why).strip().splitlines() or [""])[0].split(";")[0][:200]
        print(f"dmx: error: the Ray run failed - a worker or Ray system process was lost "
              f"({type(why).__name__}: {first}); finished chunks are saved. Resume with: "
              f"{resume_cmd}", file=sys.stderr)
        return EXIT_FAILED
    if s.unwritten:
        print(f"dmx: error: {len(s.unwritten)} chunk(s) of {s.out} could not be written (see "
              f"above); the other chunks are saved. Resume with: {resume_cmd}", file=sys.stderr)
        return EXIT_FAILED
    if compactor is not None:   # Ray's own shutdown (~1.5-3 s of waiting on its processes) overlaps it
        compactor.finish(quiet=a.quiet, meanwhile=_shutdown_ray if a.executor == "ray" else None)
    print(f"dmx: {s.rows} rows ({s.errors} errors, {s.skipped_cells} skipped cells) for {s.images} "
          f"images x {s.cells} cells in {s.wall_s:.1f} s -> {s.out}", file=sys.stderr)
    _print_not_read(s.not_read, s.not_read_count, s.out)
    c, m = s.counters, s.minimum
    print(f"dmx: work done (each at most once per image and variant): "
          f"{int(c.get('decodes', 0))}/{m['decodes']} decodes, "
          f"{int(c.get('resizes', 0))}/{m['resizes']} resizes"
          f"{_shared(c.get('shared_resizes'))}, "
          f"{int(c.get('inferences', 0))} inferences for {m['inferences_without_reuse']} "
          f"image x cell inputs ({int(c.get('reuses', 0))} outputs reused), "
          f"{int(c.get('model_builds', 0))}/{m['model_builds']} model builds", file=sys.stderr)
    if c.get("decode_warnings"):
        print(f"dmx: {int(c['decode_warnings'])} decodes raised library warnings (corrupt data the "
              "decoder tolerated): see the rows' decode_note", file=sys.stderr)
    if explain:
        from dmx.analysis.explain import explain_run
        from dmx.analysis.render import render_text
        print(render_text(explain_run(out)))
    else:
        print(f"dmx: next: dmx explain {out}", file=sys.stderr)
    return 0


class _Compactor:
    """``dmx compact OUT`` in a fresh process, started before the run: told "rows" once every
    chunk's rows are written (``start_rows``: it compacts them), then "summary" once the run's
    image facts and manifest are (``finish``: it writes the summary); an untold child exits
    touching nothing, one told only "rows" leaves the rows compacted (``cancel``)."""

    def __init__(self, out: str) -> None:
        import subprocess
        self.out = out
        self.child = subprocess.Popen([sys.executable, "-m", "dmx", "compact", out, "--when-told"],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
        self.told = False

    def _tell(self, word: str) -> None:
        try:
            self.child.stdin.write(word + "\n")
            self.child.stdin.flush()
        except OSError:   # it has ended already (e.g. its imports failed): its stderr says why
            pass

    def start_rows(self) -> None:
        if not self.told:
            self._tell("rows")
            self.told = True

    def finish(self, quiet: bool, meanwhile=None) -> None:
        """Compact (if not told yet) and summarise now, ``meanwhile()`` run here while it works;
        a failure is one warning (the rows stand)."""
        child = self.child
        self.start_rows()
        self._tell("summary")
        try:
            if meanwhile is not None:
                meanwhile()
        finally:
            _, err = child.communicate()
        lines = [ln for ln in err.splitlines() if ln.strip()]
        if child.returncode != 0:
            print(f"dmx: warning: compaction did not finish ({lines[-1] if lines else child.returncode}); "
                  f"the rows stand as part files: run `dmx compact {self.out}` to retry", file=sys.stderr)
        elif not quiet:
            for ln in lines:
                print(ln, file=sys.stderr)

    def cancel(self) -> None:
        """End the child if it was not told to go (closing its stdin ends it untouched)."""
        if self.child.returncode is None:
            try:
                self.child.communicate()
            except OSError:
                self.child.wait()


def _shutdown_ray() -> None:
    """End this process's Ray session now (the run is over) rather than at exit."""
    import ray
    if ray.is_initialized():
        ray.shutdown()


def _shared(n) -> str:
    return f" (+{int(n)} taken over from equal decodes)" if n else ""


def _print_not_read(not_read, count: int, out: str) -> None:
    """One line per dataset entry that has no row (the first ones; all are in not_read.parquet)."""
    if not count:
        return
    print(f"dmx: {count} entries under the dataset not read ({out}/not_read.parquet):",
          file=sys.stderr)
    for n in not_read[:NOT_READ_SHOWN]:
        print(f"dmx:   not read: {n.path}: {n.reason}", file=sys.stderr)
    if count > len(not_read[:NOT_READ_SHOWN]):
        print(f"dmx:   ... and {count - len(not_read[:NOT_READ_SHOWN])} more in "
              f"{out}/not_read.parquet", file=sys.stderr)
