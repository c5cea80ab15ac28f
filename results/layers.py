"""``dmx localize``'s output in a run directory: one row per (image, tensor) of one contrast.

Layout::

    DIR/layers/cell=CELL_ID.parquet   rows below, for the contrast reference -> CELL_ID
    DIR/layers/cell=CELL_ID.json      the summary (first divergent tensor, instrumentation check)

Tensors are never stored: each is reduced to these numbers where it is computed.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa

from .store import _atomic_write_bytes, write_parquet_atomic

# (name, type, unit, meaning)
LAYER_COLUMNS: tuple[tuple[str, pa.DataType, str, str], ...] = (
    ("image_id", pa.string(), "", "image the tensors were computed on"),
    ("cell_id", pa.string(), "", "the variant cell (the reference is the run's reference cell; "
                                 "`models` for dmx localize --models)"),
    ("tensor", pa.string(), "", "ONNX tensor name (the join key between the two sides)"),
    ("node", pa.string(), "", "ONNX node that makes the tensor (reference graph)"),
    ("op_type", pa.string(), "", "ONNX operator of that node"),
    ("topo_index", pa.int32(), "", "index of the node in the reference graph's topological order"),
    ("shape", pa.list_(pa.int64()), "", "tensor shape (batch 1)"),
    ("max_abs", pa.float64(), "tensor units", "max |variant - reference|"),
    ("mean_abs", pa.float64(), "tensor units", "mean |variant - reference|"),
    ("rel_l2", pa.float64(), "ratio", "||variant - reference|| / ||reference||"),
    ("cosine", pa.float64(), "-1..1", "cosine similarity of variant and reference tensor"),
    ("sqnr_db", pa.float64(), "dB", "10 log10(||ref||^2 / ||variant - ref||^2), inf when equal"),
    ("introduced_rel_l2", pa.float64(), "ratio", "rel L2 of the variant's node re-run alone on the "
                                                 "reference's inputs (null: not re-run)"),
    ("observable", pa.bool_(), "", "the variant exposes a tensor of this name (false: fused or "
                                   "folded away, or absent from its graph)"),
    ("note", pa.string(), "", "why not observable, or how it was observed"),
)
LAYER_SCHEMA = pa.schema([pa.field(n, t) for n, t, _, _ in LAYER_COLUMNS])
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


def layers_dir(run_root: str | Path) -> Path:
    return Path(run_root) / "layers"


def layers_paths(run_root: str | Path, cell_id: str) -> tuple[Path, Path]:
    """(rows Parquet, summary JSON) of one localized contrast."""
    safe = _SAFE.sub("_", cell_id)
    d = layers_dir(run_root)
    return d / f"cell={safe}.parquet", d / f"cell={safe}.json"


def write_layers(run_root: str | Path, cell_id: str, rows: Iterable[dict[str, Any]],
                 summary: dict[str, Any]) -> Path:
    """Write the rows, then the summary (each atomically): a summary marks the contrast as
    localized, so it never exists without its rows."""
    table = pa.Table.from_pylist([{k: r.get(k) for k in LAYER_SCHEMA.names} for r in rows],
                                 schema=LAYER_SCHEMA)
    parquet, js = layers_paths(run_root, cell_id)
    write_parquet_atomic(table, parquet)
    _atomic_write_bytes(js, json.dumps(summary, indent=1, default=_json_default).encode())
    return parquet


def read_summaries(run_root: str | Path) -> list[dict[str, Any]]:
    """Every localized contrast's summary in a run (empty when none)."""
    d = layers_dir(run_root)
    out = []
    for p in sorted(d.glob("cell=*.json")) if d.is_dir() else []:
        try:
            out.append(json.loads(p.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError):
            continue
    return out


def _json_default(v: Any) -> Any:
    if isinstance(v, float):
        return None
    return str(v)
