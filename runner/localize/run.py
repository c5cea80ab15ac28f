"""``dmx localize RUN``: localize one contrast of a run (reference cell -> one cell).

Reads the run's manifest, cells and images with pyarrow (runner/ does not query DuckDB), runs
the model files the sweep ran (from dmx's cache) on the images where the cell diverged most in
the run, and writes ``RUN/layers/cell=ID.parquet``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dmx.matrix.axes import AXES, INFER
from dmx.results.layers import write_layers
from dmx.results.store import RunDir
from dmx.runner.backends import InferSetting, ModelArtifacts

from .api import image_inputs, make_side
from .engine import DEFAULT_BUDGET, LocalizeResult, localize
from .graph import LocalizeError

_CELL_META = {"cell_id", "is_reference", "status", "skip_reason", "label"}


def _cells(run: RunDir) -> tuple[list[dict[str, Any]], list[str]]:
    path = run.root / "cells.parquet"
    if not path.is_file():
        raise LocalizeError(f"{run.root} has no cells.parquet (the run never started)")
    cells = pq.read_table(path).to_pylist()
    axes = [k for k in (cells[0] if cells else {}) if k not in _CELL_META]
    return cells, axes


def pick_cell(cells: list[dict[str, Any]], axes: list[str], ref: dict[str, Any],
              contrast: str | None, cell_id: str | None) -> dict[str, Any]:
    """The cell named by ``--cell`` or by ``--contrast FACTOR=LEVEL`` (the cell at that level
    whose input pipeline is the reference's and whose other model settings differ least)."""
    if cell_id:
        found = [c for c in cells if c["cell_id"] == cell_id]
        if not found:
            raise LocalizeError(f"--cell {cell_id}: no such cell in this run")
        return found[0]
    if not contrast or "=" not in contrast:
        raise LocalizeError("give --contrast FACTOR=LEVEL (e.g. backend=openvino) or --cell CELL_ID")
    factor, level = (s.strip() for s in contrast.split("=", 1))
    if factor not in axes:
        raise LocalizeError(f"--contrast {contrast}: the run has no axis {factor!r} "
                            f"(axes: {', '.join(axes)})")
    if factor in AXES and AXES[factor].stage != INFER:
        raise LocalizeError(f"--contrast {contrast}: {factor} changes the model input, not the model; "
                            "localize compares models layer by layer on the same input "
                            "(backend, precision, conversion, hints)")
    same_input = [c for c in cells if c.get(factor) == level and not c["is_reference"]
                  and c["status"] == "ok"
                  and all(c.get(a) == ref.get(a) for a in axes if a in AXES and AXES[a].stage != INFER)]
    if not same_input:
        levels = sorted({str(c.get(factor)) for c in cells if c["status"] == "ok"})
        raise LocalizeError(f"--contrast {contrast}: no cell at that level with the reference's input "
                            f"(levels of {factor}: {', '.join(levels)})")

    def distance(c: dict[str, Any]) -> int:
        return sum(c.get(a) != ref.get(a) for a in axes)
    best = min(distance(c) for c in same_input)
    ties = [c for c in same_input if distance(c) == best]
    if len(ties) > 1:
        raise LocalizeError(f"--contrast {contrast} matches {len(ties)} cells: "
                            + "; ".join(f"{c['cell_id']} ({c['label']})" for c in ties)
                            + ". Pick one with --cell, or contrast on the factor that tells them apart")
    return ties[0]


def _images(run: RunDir) -> list[tuple[str, str]]:
    p = run.root / "images.parquet"
    if p.is_file():
        rows = pq.read_table(p, columns=["image_id", "path", "error"]).to_pylist()
    else:
        rows = []
        for part in sorted((run.root / "_images").glob("chunk=*.parquet")):
            rows += pq.read_table(part, columns=["image_id", "path", "error"]).to_pylist()
    return sorted((r["image_id"], r["path"]) for r in rows if not r["error"] and r["path"])


def worst_first(run: RunDir, cell_id: str) -> list[tuple[str, float]]:
    """(image_id, cosine distance) of the cell's ok rows, the most divergent first (NaN/Inf
    outputs first of all, then by cosine distance, max abs, image id)."""
    files = run.row_files()
    if not files:
        return []
    t = pq.ParquetDataset(files, filesystem=run.fs, filters=[("cell_id", "=", cell_id),
                                                             ("status", "=", "ok")]).read(
        columns=["image_id", "out_cosine", "out_max_abs"])
    t = t.filter(pc.is_valid(t["out_cosine"]))
    d = pc.subtract(pa.scalar(1.0), t["out_cosine"])
    bad = pc.or_(pc.is_nan(d), pc.invert(pc.is_finite(pc.fill_null(t["out_max_abs"], 0.0))))
    d = pc.if_else(bad, pa.scalar(float("inf")), d)
    t = t.append_column("d", d)
    t = t.sort_by([("d", "descending"), ("out_max_abs", "descending"), ("image_id", "ascending")])
    return list(zip(t["image_id"].to_pylist(), t["d"].to_pylist()))


def _ordered(images: list[tuple[str, str]], worst: list[tuple[str, float]]) -> list[tuple[str, str]]:
    """The run's images, those where the cell diverged most first (the rest by id)."""
    path = dict(images)
    ranked = [(i, path[i]) for i, _ in worst if i in path]
    seen = {i for i, _ in ranked}
    return ranked + [x for x in images if x[0] not in seen]


def _artifacts(manifest: dict[str, Any]) -> tuple[ModelArtifacts, Any]:
    from dmx.runner.models.base import Preprocess
    m = manifest.get("model") or {}
    pre = Preprocess(**m["preprocess"])
    art = ModelArtifacts(name=m.get("name", "model"), task=m.get("task", "classification"),
                         torch_factory=m.get("torch_factory"), weights=m.get("weights"),
                         files=dict(m.get("files") or {}), conversion_notes=m.get("conversion") or {},
                         input_shape=(3, pre.crop, pre.crop))
    return art, pre


def _onnx_graph(art: ModelArtifacts, conversion: str | None) -> str:
    """The fp32 ONNX file that names the layers (the torch side runs it through the interpreter):
    the export the other side's model came from, so that tensor names match."""
    exporter = conversion if conversion in ("onnx-dynamo", "onnx-legacy") else "onnx-dynamo"
    for key in (f"onnx:{exporter}", "onnx:onnx-dynamo", "onnx:onnx-legacy", f"ort:{exporter}:fp32"):
        if art.files.get(key):
            return art.files[key]
    raise LocalizeError("the run has no ONNX file of the model (it ran no ONNX Runtime or OpenVINO "
                        "cell); localize names layers by the ONNX graph")


def side_path(art: ModelArtifacts, setting: InferSetting, other: InferSetting) -> str:
    if setting.backend == "torch":
        path = _onnx_graph(art, setting.conversion or other.conversion)
    else:
        path = art.file_for(setting)
        if path is None:
            raise LocalizeError(f"no model file for {setting.backend} {setting.precision}: "
                                f"{art.missing_reason(setting)}")
    if not Path(path).is_file():
        raise LocalizeError(f"{path}: the model file this run used is gone (dmx's cache was "
                            "cleared?); run the spec again to remake it")
    return path


def _which_images(inputs: list[tuple[str, Any]], dist: dict[str, float]) -> str:
    used = [i for i, _ in inputs]
    if not dist:
        return (f"images: the first {len(used)} by id (the run's rows carry no output divergence "
                f"for this cell): {', '.join(used)}")
    seen = [dist[i] for i in used if i in dist]
    span = f" (cosine distance {_g(max(seen))} to {_g(min(seen))})" if seen else ""
    return (f"images: the {len(used)} where this cell diverges most in the run{span}: "
            f"{', '.join(used)}")


def _g(v: float) -> str:
    return "NaN/Inf" if v == float("inf") else f"{v:.3g}"


def localize_run(run_dir: str, *, contrast: str | None = None, cell_id: str | None = None,
                 n_images: int = 8, threads: int = 1, tolerance: float | None = None,
                 budget_bytes: int = DEFAULT_BUDGET,
                 progress: Callable[[str], None] | None = None) -> tuple[LocalizeResult, dict[str, Any], Path]:
    """Localize reference -> the chosen cell on the ``n_images`` images where that cell diverged
    most in the run (said in the result's notes); writes the layer rows into the run and returns
    (result, cell, parquet path)."""
    run = RunDir(run_dir)
    manifest = run.read_manifest()
    cells, axes = _cells(run)
    ref = next((c for c in cells if c["is_reference"]), None)
    if ref is None:
        raise LocalizeError(f"{run_dir}: no reference cell in cells.parquet")
    cell = pick_cell(cells, axes, ref, contrast, cell_id)
    if cell["is_reference"]:
        raise LocalizeError(f"cell {cell['cell_id']} is the reference: nothing to compare")
    if cell["status"] != "ok":
        raise LocalizeError(f"cell {cell['cell_id']} ({cell['label']}) was skipped: {cell['skip_reason']}")
    art, pre = _artifacts(manifest)
    factors = {a: cell.get(a) for a in axes}
    ref_factors = {a: ref.get(a) for a in axes}
    ref_setting = InferSetting.from_factors(ref_factors)
    var_setting = InferSetting.from_factors(factors)
    if ref_setting.device != "cpu" or var_setting.device != "cpu":
        raise LocalizeError("localize runs on CPU; a cuda cell cannot be localized yet")
    ref_side = make_side(side_path(art, ref_setting, var_setting), ref_setting, art, threads)
    var_side = make_side(side_path(art, var_setting, ref_setting), var_setting, art, threads)
    images = _images(run)
    if not images:
        raise LocalizeError(f"{run_dir}: no image of the run decoded")
    worst = worst_first(run, cell["cell_id"])
    images = _ordered(images, worst)
    inputs = []
    for item in image_inputs(images, pre, decoder=ref.get("decoder") or "pil", factors=ref_factors,
                             resize=ref.get("resize") or "pil-bilinear", fit=ref.get("fit")):
        inputs.append(item)
        if len(inputs) >= n_images:
            break
    if not inputs:
        raise LocalizeError(f"{run_dir}: none of the run's images decodes now")
    res = localize(ref_side, var_side, inputs, cell_id=cell["cell_id"], tolerance=tolerance,
                   budget_bytes=budget_bytes, progress=progress)
    res.notes.append(_which_images(inputs, dict(worst)))
    differs = [a for a in axes if a in AXES and AXES[a].stage != INFER and cell.get(a) != ref.get(a)]
    if differs:
        res.notes.append(f"the cell also differs in {', '.join(differs)}: both sides were fed the "
                         "reference cell's input, so this compares the model settings alone")
    summary = res.to_json() | {"cell_id": cell["cell_id"], "cell": cell["label"],
                               "reference_cell": ref["cell_id"], "reference_label": ref["label"]}
    path = write_layers(run.root, cell["cell_id"], res.rows, summary)
    return res, cell, path
