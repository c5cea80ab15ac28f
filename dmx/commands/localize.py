"""``dmx localize``: the first layer where a backend or precision diverges (torch, ONNX Runtime,
OpenVINO; layers joined by ONNX name), for a run's contrast or two ONNX files."""
from __future__ import annotations

import argparse
import json
import re
import sys

from .common import CliError, json_default

NAME = "localize"


def add_parser(sub) -> None:
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


def run(a: argparse.Namespace) -> int:
    from dmx.runner.localize import format_text, localize_models, localize_run
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
            from dmx.results.layers import write_layers
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
        print(json.dumps(res.to_json(), indent=2, default=json_default))
    else:
        print(format_text(res, title))
    return 0
