"""The ``dmx`` command. Library code raises typed errors; only this module turns them into one
line on stderr and an exit code (2 for bad input, 1 for a failed gate, 130 for Ctrl-C)."""
from __future__ import annotations

import argparse
import errno
import json
import os
import re
import sys
import typing
from pathlib import Path
from typing import Sequence

EXIT_GATE = 1
EXIT_USAGE = 2
EXIT_FAILED = 3  # the machine failed the run (disk full, a Ray process lost): resume it
EXIT_INTERRUPTED = 130
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _resume_command(spec_path: str, out: str, a: argparse.Namespace) -> str:
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
             getattr(sys.modules.get("runner.executors"), "WorkersLost", None)]
    return tuple(t for t in found if isinstance(t, type)) or (_NeverRaised,)


class _NeverRaised(Exception):
    """Stands in for Ray's errors when Ray is not loaded."""


class CliError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``dmx run: error: ...``), not usage + error."""

    def error(self, message: str) -> "typing.NoReturn":  # type: ignore[name-defined]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# Bounds of the numeric options, with the reason a user sees when they pass one beyond them.
MAX_WORKERS = 1024
MAX_BATCH = 4096  # as the spec's batch axis: 4096 x 3 x 224 x 224 float32 is 2.5 GB
MAX_CHUNK = 1_000_000


def _bounded_int(lo: int, hi: int, why: str = ""):
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


_USER_ERRORS = (("matrix.errors", "SpecError"), ("results.store", "RunDirError"),
                ("runner.convert", "ConversionError"), ("runner.executors", "ExecutorError"),
                ("runner.models.base", "ModelUnavailable"), ("runner.models.base", "UnknownModel"),
                ("runner.models.loading", "ModelLoadError"), ("analysis.check", "CheckError"),
                ("analysis.diff", "DiffError"), ("runner.envs", "EnvBuildError"),
                ("results.fs", "StorageError"), ("runner.localize.graph", "LocalizeError"))


def _user_errors() -> tuple[type[BaseException], ...]:
    """The typed errors that are the user's to fix. Only modules already imported can have
    raised one, so none is imported here: a bad spec is refused without loading torch."""
    found = [getattr(sys.modules[m], n, None) for m, n in _USER_ERRORS if m in sys.modules]
    return (CliError, *(t for t in found if isinstance(t, type)))


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--executor", choices=("ray", "local"), default="ray",
                   help="ray (default: embedded local Ray, or the cluster at --address/RAY_ADDRESS) "
                        "or local (in-process)")
    p.add_argument("--workers", type=_bounded_int(1, MAX_WORKERS), default=None,
                   help="at most this many workers (default: one per CPU the Ray cluster offers)")
    p.add_argument("--gpus-per-worker", type=float, default=None, metavar="G",
                   help="GPUs each worker asks Ray for when cells run on CUDA (default 1; "
                        "a fraction such as 0.25 packs four workers on a GPU)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS)")
    p.add_argument("--chunk-size", type=_bounded_int(1, MAX_CHUNK), default=None,
                   help="images per chunk (default: sized from the matrix)")
    p.add_argument("--batch", type=_bounded_int(1, MAX_BATCH, "a batch is held in memory at once"),
                   default=8, help=f"inference batch size (default 8, at most {MAX_BATCH})")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--verbose", action="store_true",
                   help="also show Ray's own log lines and the workers' output (off by default: "
                        "library warnings go to the rows' decode_note)")
    _add_max_cells(p)


def _add_max_cells(p: argparse.ArgumentParser) -> None:
    from matrix.spec import DEFAULT_MAX_CELLS
    p.add_argument("--max-cells", type=_bounded_int(1, 10**9), default=DEFAULT_MAX_CELLS,
                   help=f"refuse a matrix of more cells (default {DEFAULT_MAX_CELLS:,})")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="dmx", description="Sweep a matrix of image pipeline variants "
                                 "over a dataset and explain which factors make outputs diverge.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run a matrix spec into a run directory")
    p.add_argument("spec", help="matrix spec (YAML)")
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec key, e.g. -o backend=torch,openvino -o dataset.limit=10")
    p.add_argument("--resume", action="store_true", help="finish an interrupted run in --out")
    p.add_argument("--no-compact", action="store_true",
                   help="keep one part file per chunk (default: merge them into few files sorted "
                        "by cell when the run ends; see `dmx compact`)")
    _add_run_options(p)

    p = sub.add_parser("plan", help="print the expanded cells and the reference")
    p.add_argument("spec")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE")
    _add_max_cells(p)

    p = sub.add_parser("explain", help="rank the factors that drive divergence in a run")
    p.add_argument("run_dir")
    p.add_argument("--format", choices=("text", "json", "markdown"), default="text")

    p = sub.add_parser("sql", help="query a run with DuckDB (views rows, cells, images, contrasts, "
                                   "effects, interactions; layers once dmx localize ran)")
    p.add_argument("run_dir")
    p.add_argument("query", nargs="?", help="SQL; omit for an interactive prompt")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")

    p = sub.add_parser("demo", help="run the built-in demo on real photos and explain it")
    p.add_argument("--out", default="dmx-demo", help="folder for the demo images and run (default ./dmx-demo)")
    p.add_argument("--limit", type=_bounded_int(1, 10**9), default=None,
                   help="use only the first N images")
    _add_run_options(p)

    p = sub.add_parser("report", help="write one self-contained HTML page about a run")
    p.add_argument("run_dir")
    p.add_argument("-o", "--out", default=None, help="HTML file to write (default: RUN_DIR/report.html)")

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
    p.add_argument("--max-reference-errors", type=_bounded_int(0, 10**9), default=None, metavar="IMAGES",
                   help="images the reference cell may fail on (default 0); the other cells' rows "
                        "on them are not judged")
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = sub.add_parser("diff", help="compare two runs of one spec: cells that moved, environment changes")
    p.add_argument("run_a", help="the baseline run directory")
    p.add_argument("run_b", help="the run to compare with it")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--fail-if-moved", action="store_true", help="exit 1 when any cell moved")

    p = sub.add_parser("compact", help="merge a run's part files into few large Parquet files "
                                       "sorted by cell (fast to query; safe to interrupt)")
    p.add_argument("run_dir", help="run directory (local folder, s3:// or gs://)")

    _add_localize_parser(sub)
    _add_envs_parser(sub)
    p = sub.add_parser("schema", help="print the Parquet row columns (name, type, unit, meaning), "
                                      "or with --spec the JSON Schema of a spec file")
    p.add_argument("--spec", action="store_true",
                   help="print the JSON Schema of a matrix spec (for editors: yaml-language-server)")
    return ap


def _add_localize_parser(sub) -> None:
    p = sub.add_parser("localize", help="the first layer where a backend or precision diverges "
                                        "(torch, ONNX Runtime, OpenVINO; layers joined by ONNX name)")
    p.add_argument("run_dir", nargs="?", help="a run directory (omit with --models)")
    p.add_argument("--contrast", metavar="FACTOR=LEVEL",
                   help="the cell at this level against the reference (e.g. backend=openvino)")
    p.add_argument("--cell", metavar="CELL_ID", help="the cell to localize against the reference")
    p.add_argument("--images", metavar="N|PATH", default=None,
                   help="with RUN: how many of its images (default 8); with --models: an image "
                        "file or folder")
    p.add_argument("--models", nargs=2, metavar=("A.onnx", "B.onnx"),
                   help="two ONNX files of one graph: B against A (reference)")
    p.add_argument("--backend", choices=("onnxruntime", "openvino", "torch"), default=None,
                   help="--models: backend that runs B (default onnxruntime)")
    p.add_argument("--reference-backend", choices=("onnxruntime", "openvino", "torch"), default=None,
                   help="--models: backend that runs A (default: --backend)")
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16", "int8"), default=None,
                   help="--models: precision B runs at (torch casts to it; OpenVINO's hint follows it); "
                        "default fp32")
    p.add_argument("--openvino-hint", choices=("default", "f32", "bf16", "f16", "accuracy"), default=None,
                   help="--models: OpenVINO INFERENCE_PRECISION_HINT for B")
    p.add_argument("--preprocess", metavar="MODEL", default=None,
                   help="--models: feed images as this built-in model does (default: stretch to "
                        "the input size, ImageNet normalisation)")
    p.add_argument("--limit", type=int, default=None, help="--models: images to use (default 8)")
    p.add_argument("--tolerance", type=float, default=None, metavar="RATIO",
                   help="per-tensor rel-L2 tolerance (default by the precision that ran: fp32 1.3e-5, "
                        "fp16 1e-2, bf16 1.6e-1, int8 1e-1)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads on each side (default 1)")
    p.add_argument("--out", default=None, help="--models: folder to write layers/cell=models.parquet to")
    p.add_argument("--format", choices=("text", "json"), default="text")


def cmd_localize(a: argparse.Namespace) -> int:
    from runner.localize import format_text, localize_models, localize_run
    if a.threads < 1 or (a.tolerance is not None and not a.tolerance > 0) or (a.limit is not None and a.limit < 1):
        raise CliError("localize: --threads and --limit must be >= 1, --tolerance > 0")
    progress = None if a.format == "json" else (lambda msg: print(msg, file=sys.stderr))
    if a.models:
        if a.run_dir or a.contrast or a.cell:
            raise CliError("localize: give either RUN [--contrast|--cell] or --models A B, not both")
        if not a.images:
            raise CliError("localize --models needs --images PATH (an image file or folder)")
        res = localize_models(a.models[0], a.models[1], a.images, backend=a.backend or "onnxruntime",
                              reference_backend=a.reference_backend, precision=a.precision or "fp32",
                              openvino_hint=a.openvino_hint, n_images=a.limit or 8, preprocess=a.preprocess,
                              threads=a.threads, tolerance=a.tolerance, progress=progress)
        title = f"{a.models[1]} vs {a.models[0]}"
        if a.out:
            from results.layers import write_layers
            write_layers(a.out, "models", res.rows, res.to_json() | {"cell_id": "models"})
    else:
        if not a.run_dir:
            raise CliError("localize: give a run directory, or --models A.onnx B.onnx --images PATH")
        if bool(a.contrast) == bool(a.cell):
            raise CliError("localize: give exactly one of --contrast FACTOR=LEVEL and --cell CELL_ID")
        if a.backend or a.reference_backend or a.openvino_hint or a.preprocess or a.limit or a.out \
                or a.precision:
            raise CliError("localize RUN: the backends, preprocessing and images come from the run "
                           "(--images N); --backend/--reference-backend/--openvino-hint/--preprocess/"
                           "--limit/--out/--precision go with --models")
        n = 8
        if a.images is not None:
            if not re.fullmatch(r"[0-9]+", a.images) or int(a.images) < 1:
                raise CliError(f"localize RUN --images takes a number of images >= 1, got {a.images!r}")
            n = int(a.images)
        res, cell, path = localize_run(a.run_dir, contrast=a.contrast, cell_id=a.cell, n_images=n,
                                       threads=a.threads, tolerance=a.tolerance, progress=progress)
        title = f"cell {cell['cell_id']} ({cell['label']}) vs the reference; rows in {path}"
    if a.format == "json":
        print(json.dumps(res.to_json(), indent=2, default=_json_default))
    else:
        print(format_text(res, title))
    return 0


def _add_envs_parser(sub) -> None:
    p = sub.add_parser("envs", help="the environments of decoder package-version levels "
                                    "(pil[pillow==9.4.0]): list, build, prune")
    envs = p.add_subparsers(dest="envs_command", required=True)
    q = envs.add_parser("list", help="cached environments: path, requirements, exact versions, "
                                     "libjpeg, size (MB), last used")
    q.add_argument("--json", action="store_true", help="print JSON")
    q = envs.add_parser("build", help="build (or find) environments, once, with uv")
    q.add_argument("what", nargs="+", metavar="SPEC|REQ",
                   help="a spec file (builds its pil[...]/opencv[...] decoder levels), or "
                        "requirements for one environment, e.g. 'pillow==9.4.0' numpy")
    q = envs.add_parser("prune", help="remove cached environments (default: all)")
    q.add_argument("--unused-days", type=float, default=None, metavar="N",
                   help="remove only those not used for N days")


def _load_planned(a: argparse.Namespace):
    """The spec, checked whole before anything heavy is imported: schema, cell limit, reference."""
    from matrix import expand, load_spec, reference_cell
    spec = load_spec(a.spec, a.override, max_cells=a.max_cells)
    cells = expand(spec)
    return spec, cells, reference_cell(spec, cells)


def _check_out(out: str, flag: str = "--out") -> None:
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise CliError(f"{flag} {out} is a file; give a folder (dmx writes a run directory there)")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise CliError(f"{flag} {out}: {parent} is a file, not a folder")
            break


def cmd_run(a: argparse.Namespace) -> int:
    _check_out(a.out)
    spec, _, _ = _load_planned(a)
    return _run_and_report(spec, a, a.out, resume=a.resume, explain=False, spec_path=a.spec)


def _run_and_report(spec, a: argparse.Namespace, out: str, *, resume: bool, explain: bool,
                    spec_path: str) -> int:
    from runner.sweep import RunOptions, run_spec
    if getattr(a, "verbose", False):
        os.environ["DMX_VERBOSE"] = "1"   # read where Ray starts (runner/executors.py)
    elif a.executor == "ray":
        from runner.quiet_stderr import drop_ray_core_lines
        drop_ray_core_lines()             # Ray's C++ log lines stay off the console
    opts = RunOptions(out=out, executor=a.executor, workers=a.workers, address=a.address,
                      chunk_size=a.chunk_size, batch=a.batch, resume=resume, progress=not a.quiet,
                      gpus_per_worker=a.gpus_per_worker, compact=not getattr(a, "no_compact", False))
    resume_cmd = _resume_command(spec_path, out, a)
    if spec.model.weights:
        # Refused here, once, as one line - not as an error row per image in every worker.
        from runner.models.loading import load_weights
        load_weights(spec.model.weights)
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
    if opts.compact:
        _summarise(s.out)
    print(f"dmx: {s.rows} rows ({s.errors} errors, {s.skipped_cells} skipped cells) for {s.images} "
          f"images x {s.cells} cells in {s.wall_s:.1f} s -> {s.out}", file=sys.stderr)
    _print_not_read(s.not_read, s.out)
    c, m = s.counters, s.minimum
    print(f"dmx: work done (each at most once per image and variant): "
          f"{int(c.get('decodes', 0))}/{m['decodes']} decodes, "
          f"{int(c.get('resizes', 0))}/{m['resizes']} resizes, "
          f"{int(c.get('inferences', 0))} inferences for {m['inferences_without_reuse']} "
          f"image x cell inputs ({int(c.get('reuses', 0))} outputs reused), "
          f"{int(c.get('model_builds', 0))}/{m['model_builds']} model builds", file=sys.stderr)
    if c.get("decode_warnings"):
        print(f"dmx: {int(c['decode_warnings'])} decodes raised library warnings (corrupt data the "
              "decoder tolerated): see the rows' decode_note", file=sys.stderr)
    if explain:
        from analysis.explain import explain_run
        from analysis.render import render_text
        print(render_text(explain_run(out)))
    else:
        print(f"dmx: next: dmx explain {out}", file=sys.stderr)
    return 0


NOT_READ_SHOWN = 50


def _print_not_read(not_read, out: str) -> None:
    """One line per dataset entry that has no row (the first 50; all are in the manifest)."""
    if not not_read:
        return
    print(f"dmx: {len(not_read)} entries under the dataset not read (manifest.json not_read):",
          file=sys.stderr)
    for n in not_read[:NOT_READ_SHOWN]:
        print(f"dmx:   not read: {n.path}: {n.reason}", file=sys.stderr)
    if len(not_read) > NOT_READ_SHOWN:
        print(f"dmx:   ... and {len(not_read) - NOT_READ_SHOWN} more in {out}/manifest.json",
              file=sys.stderr)


def cmd_plan(a: argparse.Namespace) -> int:
    spec, cells, ref = _load_planned(a)
    print(f"spec {spec.name!r}: {len(cells)} cells; reference {ref.cell_id}: {ref.label()}")
    for c in cells:
        mark = "*" if c.cell_id == ref.cell_id else " "
        print(f"{mark} {c.cell_id}  {c.label()}")
    return 0


def cmd_explain(a: argparse.Namespace) -> int:
    from analysis.explain import explain_run
    from analysis.render import render_markdown, render_text
    e = explain_run(a.run_dir)
    if a.format == "json":
        print(json.dumps(e.to_json(), indent=2, default=_json_default))
    elif a.format == "markdown":
        print(render_markdown(e))
    else:
        print(render_text(e))
    return 0


def _json_default(v: object) -> object:
    if isinstance(v, float):
        return None
    return str(v)


def cmd_sql(a: argparse.Namespace) -> int:
    import duckdb
    from analysis.db import open_run
    from analysis.explain import explain_run, register_views
    con = open_run(a.run_dir)
    # The attribution views cost a full explain (seconds on millions of rows): only when used.
    if not a.query or re.search(r"\b(contrasts|effects|interactions)\b", a.query, re.I):
        register_views(con, explain_run(a.run_dir))
    if not a.query:
        return _sql_prompt(con, a.run_dir)
    try:
        rel = con.sql(a.query)
    except duckdb.Error as e:
        raise CliError(f"SQL: {str(e).splitlines()[0]}") from None
    if rel is None:
        return 0
    if a.format == "csv":
        import csv
        w = csv.writer(sys.stdout)
        w.writerow(rel.columns)
        w.writerows(rel.fetchall())
    elif a.format == "json":
        cols = rel.columns
        print(json.dumps([dict(zip(cols, r)) for r in rel.fetchall()], default=str, indent=1))
    else:
        rel.show(max_rows=200, max_width=200)
    return 0


def _sql_prompt(con, run_dir: str) -> int:
    import duckdb
    root = Path(run_dir).resolve()
    print(f"dmx sql: views rows, cells, images, contrasts, effects, interactions over {root}. End a statement with ';', quit with "
          f"Ctrl-D.\nIn the duckdb CLI: CREATE VIEW rows AS SELECT * FROM "
          f"read_parquet('{root}/rows/*/part-0.parquet', hive_partitioning=true);")
    if not sys.stdin.isatty():
        return 0
    buf = ""
    while True:
        try:
            line = input("dmx> " if not buf else "...> ")
        except EOFError:
            print()
            return 0
        buf += line + "\n"
        if buf.strip().endswith(";"):
            try:
                rel = con.sql(buf)
                if rel is not None:
                    rel.show(max_rows=50, max_width=200)
            except duckdb.Error as e:
                print(f"error: {str(e).splitlines()[0]}")
            buf = ""


def cmd_demo(a: argparse.Namespace) -> int:
    from importlib.resources import files

    from dmx.demo_data import DemoDirError, build_demo_images
    from matrix import parse_spec
    from matrix.yamlsafe import load_yaml_bounded
    _check_out(a.out)
    root = Path(a.out)
    images = root / "images"
    raw = load_yaml_bounded(files("dmx").joinpath("demo.yaml").read_bytes(), "demo.yaml")
    overrides = [f"dataset.limit={a.limit}"] if a.limit else []
    spec = parse_spec(raw, base_dir=str(root.resolve()), overrides=overrides,
                      max_cells=a.max_cells)
    run_dir = _demo_run_dir(root, spec.digest)
    print(f"dmx demo: building the demo images in {images} (real photos from matplotlib, "
          "scikit-image and scikit-learn, re-encoded by Pillow and OpenCV)", file=sys.stderr)
    try:
        build_demo_images(str(images))
    except DemoDirError as e:
        raise CliError(str(e)) from None
    resume = (run_dir / "manifest.json").is_file()
    if resume:
        print(f"dmx demo: {run_dir} holds this demo's run; finishing it (nothing is deleted)",
              file=sys.stderr)
    return _run_and_report(spec, a, str(run_dir), resume=resume, explain=True, spec_path="(demo)")


def _demo_run_dir(root: Path, digest: str) -> Path:
    """Where the demo's run goes: ``run`` when free or holding this very demo's run; else a
    folder named by the spec digest. Never a folder holding anything else: dmx deletes nothing."""
    from results import RunDir, RunDirError
    for cand in (root / "run", root / f"run-{digest[:8]}"):
        if not cand.exists() or (cand.is_dir() and not any(cand.iterdir())):
            return cand
        try:
            if RunDir(str(cand)).read_manifest().get("spec_digest") == digest:
                return cand
        except (RunDirError, OSError, ValueError):
            pass
    raise CliError(f"{root / 'run'} and {root / f'run-{digest[:8]}'} hold files that are not "
                   "this demo's run; dmx never deletes them: choose another --out")


def cmd_report(a: argparse.Namespace) -> int:
    import time
    from analysis.report import write_report
    from results.fs import is_remote
    t = time.perf_counter()
    if a.out is None and is_remote(a.run_dir):  # a run in an object store gets its report there
        import tempfile
        from results import RunDir
        run = RunDir(a.run_dir)
        with tempfile.TemporaryDirectory() as tmp:
            out = write_report(a.run_dir, Path(tmp) / "report.html")
            data = out.read_bytes()
        run.write_bytes("report.html", data)
        where, size = f"{run.uri}/report.html", len(data)
    else:
        out = write_report(a.run_dir, a.out or Path(a.run_dir) / "report.html")
        where, size = str(out), out.stat().st_size
    print(f"dmx: report written to {where} ({size / 1e6:.1f} MB in "
          f"{time.perf_counter() - t:.1f} s)", file=sys.stderr)
    return 0


def cmd_check(a: argparse.Namespace) -> int:
    from analysis.check import check_run, render_check_text
    given = {"max_abs": a.max_abs, "max_rel_l2": a.max_rel_l2, "min_cosine": a.min_cosine,
             "min_top1_agreement": a.min_top1, "scope": a.scope,
             "allow_lower_precision": a.allow_lower_precision, "allow_errors": a.allow_errors,
             "max_reference_errors": a.max_reference_errors}
    result = check_run(a.run_dir, {k: v for k, v in given.items() if v is not None})
    if a.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(render_check_text(result))
    return 0 if result.passed else EXIT_GATE


def cmd_diff(a: argparse.Namespace) -> int:
    from analysis.diff import diff_runs, render_diff_text
    result = diff_runs(a.run_a, a.run_b)
    if a.json:
        print(json.dumps(result.to_json(), indent=2, default=str))
    else:
        print(render_diff_text(result))
    return EXIT_GATE if a.fail_if_moved and result.moved else 0


def cmd_envs(a: argparse.Namespace) -> int:
    import time
    from runner.envs import ensure_env, iter_env_rows, list_envs, prune_envs
    if a.envs_command == "list":
        rows = list(iter_env_rows())
        if a.json:
            print(json.dumps(rows, indent=2))
            return 0
        for r in rows:
            print(f"{r['path']}\n  requirements {' '.join(r['requirements'])}\n"
                  f"  installed    {' '.join(f'{k}=={v}' for k, v in r['versions'].items())}\n"
                  f"  libjpeg      {r['libjpeg']}\n"
                  f"  {r['size_mb']} MB, built {r['built_at']}, last used {r['last_used']}")
        if not rows:
            print("dmx: no environments (they are built by `dmx envs build` or by a run)",
                  file=sys.stderr)
        return 0
    if a.envs_command == "build":
        spec_file = Path(a.what[0])
        if len(a.what) == 1 and spec_file.suffix in (".yaml", ".yml"):
            from matrix import load_spec
            from runner.decoders import DecoderUnavailable
            from runner.decoders.isolated import is_isolated_label, requirements_for
            spec = load_spec(spec_file)
            labels = [lb for lb in (spec.levels("decoder") if "decoder" in spec.axis_names else ())
                      if is_isolated_label(lb)]
            if not labels:
                raise CliError(f"{spec_file} has no decoder package-version level "
                               "(e.g. {name: pil, package: \"pillow==9.4.0\"})")
            try:
                sets = [requirements_for(lb) for lb in labels]
            except DecoderUnavailable as e:
                raise CliError(str(e)) from None
        else:
            sets = [list(a.what)]
        for reqs in sets:
            t = time.perf_counter()
            e = ensure_env(reqs)
            print(f"{'built ' if e.built else 'cached'} {e.path} in "
                  f"{time.perf_counter() - t:.2f} s: {' '.join(e.requirements)} -> "
                  f"{' '.join(f'{k}=={v}' for k, v in e.versions.items())}; {e.libjpeg_summary()}")
        return 0
    keep = None
    if a.unused_days is not None:
        cutoff = time.time() - a.unused_days * 86400
        keep = {e.key for e in list_envs() if e.last_used >= cutoff}
    removed = prune_envs(keep)
    print(f"dmx: removed {len(removed)} environment folder(s)", file=sys.stderr)
    return 0


def _summarise(out: str) -> None:
    """Keep explain's aggregates beside the freshly compacted rows (analysis/summary.py)."""
    import duckdb

    from analysis.summary import write_summary
    from results.store import RunDirError
    try:
        write_summary(out)
    except RunDirError:          # no readable rows: explain will say so itself
        pass
    except (OSError, duckdb.Error) as e:   # the rows are safe; explain scans them instead
        print(f"dmx: warning: explain's summary was not written ({type(e).__name__}: "
              f"{str(e).splitlines()[0] if str(e) else ''}); explain will read the rows",
              file=sys.stderr)


def cmd_compact(a: argparse.Namespace) -> int:
    import time
    from results.compact import compact_run
    t = time.perf_counter()
    c = compact_run(a.run_dir)
    _summarise(a.run_dir)
    print(f"dmx: {a.run_dir}: {c.files_before} file(s) -> {c.files_after} ({c.rows} rows of "
          f"{c.chunks} chunks, sorted by cell) in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    return 0


def cmd_schema(a: argparse.Namespace) -> int:
    if a.spec:
        from matrix.schema import spec_json_schema
        print(json.dumps(spec_json_schema(), indent=2))
        return 0
    from results.schema import columns_markdown
    print(columns_markdown())
    return 0


COMMANDS = {"run": cmd_run, "plan": cmd_plan, "explain": cmd_explain, "sql": cmd_sql,
            "demo": cmd_demo, "report": cmd_report, "check": cmd_check, "diff": cmd_diff,
            "envs": cmd_envs, "schema": cmd_schema, "compact": cmd_compact,
            "localize": cmd_localize}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import runner.backends  # noqa: F401  (each backend registers its axes before a spec is read)
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
    try:
        return COMMANDS[args.command](args)
    except _user_errors() as e:
        print(f"dmx: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\ndmx: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return 0
