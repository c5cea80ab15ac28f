"""Runs written by hand with the real schema, so the truth behind every number is known.

``write_run`` lays out a run directory as ``dmx run`` does (``rows/chunk=*/part-0.parquet``,
``cells.parquet``, ``images.parquet``, ``manifest.json``); each row starts from an "identical to
the reference" default and takes what ``row(factors, image)`` returns on top.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pyarrow as pa

from dmx.matrix import make_cell
from dmx.results import IMAGE_SCHEMA, RunDir, cell_schema, row_schema, write_parquet_atomic

Row = Callable[[dict[str, str], int], dict[str, Any]]

IDENTICAL = {"status": "ok", "shape_match": True, "px_equal": True, "px_mean_abs": 0.0,
             "out_cosine": 1.0, "out_max_abs": 0.0, "out_rel_l2": 0.0, "top1": 3, "top1_ref": 3,
             "top1_agree": True, "precision_effective": "fp32"}


def image_id(i: int) -> str:
    return f"img{i:02d}.jpg"


def write_run(root: Path, axes: tuple[str, ...], levels: list[dict[str, str]], row: Row,
              n_images: int, *, chunks: Callable[[int], int] = lambda i: 0,
              image_props: Callable[[int], dict[str, Any]] = lambda i: {},
              every: Callable[[int], dict[str, Any]] = lambda i: {},
              extra: list[pa.Field] = (), manifest: dict[str, Any] | None = None,
              drop: tuple[str, ...] = ()) -> Path:
    """A run whose first cell in ``levels`` is the reference; rows of image i go to chunk
    ``chunks(i)`` and take ``every(i)`` in every cell (the reference's too); ``extra`` adds
    columns the schema lacks; ``drop`` leaves schema columns out (a run of an older dmx)."""
    run = RunDir(root)
    cells = [make_cell(f, axes) for f in levels]
    ref = cells[0]
    schema = row_schema(axes)
    for name in drop:
        schema = schema.remove(schema.get_field_index(name))
    for f in extra:
        if f.name not in schema.names:
            schema = schema.append(f)
    by_chunk: dict[int, list[dict[str, Any]]] = {}
    for c in cells:
        factors = {a: v for a, v in c.factors}
        for i in range(n_images):
            base = {"run_id": "planted", "cell_id": c.cell_id, "image_id": image_id(i), **factors,
                    "is_reference": c is ref, **IDENTICAL, **every(i)}
            by_chunk.setdefault(chunks(i), []).append(base | ({} if c is ref else row(factors, i)))
    root.mkdir(parents=True, exist_ok=True)
    for chunk, rows in by_chunk.items():
        write_parquet_atomic(pa.Table.from_pylist(rows, schema=schema), run.part_path(chunk))
    write_parquet_atomic(pa.Table.from_pylist(
        [{"cell_id": c.cell_id, **dict(c.factors), "is_reference": c is ref, "status": "ok",
          "label": c.label()} for c in cells], schema=cell_schema(axes)), root / "cells.parquet")
    write_parquet_atomic(pa.Table.from_pylist(
        [{"image_id": image_id(i), "format": "JPEG", "subsampling": "4:2:0", "width": 640,
          "height": 480, "color_mode": "RGB", **image_props(i)} for i in range(n_images)],
        schema=IMAGE_SCHEMA), root / "images.parquet")
    run.write_manifest({"run_id": root.name, "spec": {"name": "planted"}, "images": n_images,
                        "reference": ref.label(), "reference_cell": ref.cell_id, "counters": {},
                        **(manifest or {})})
    return root
