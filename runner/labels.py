"""Classification ground truth: read a labels file into ``(image_id, label_index)``.

Formats (``FORMATS``; ``read_labels`` dispatches):

- ``csv``: a CSV with columns ``path`` and ``label`` (a header naming them, else the first two
  columns); ``label`` is a class index, name or synset.
- ``pairs``: whitespace-separated ``name label`` per line - ImageNet's synset-per-image lists
  (``ILSVRC2012_val_00000001.JPEG n01751748``) and Caffe's ``val.txt`` (``... 65``).
- ``imagenet-solution``: Kaggle's ``LOC_val_solution.csv`` (``ImageId,PredictionString``; the
  first synset of the prediction string is the class; ids are file stems).
- ``imagenet-index``: the devkit's ``ILSVRC2012_validation_ground_truth.txt``: line i is the
  class of ``ILSVRC2012_val_{i:08d}.JPEG``, as an ``ILSVRC2012_ID`` (1-1000, in the devkit's own
  order, not the models' sorted-synset order: the devkit's ``data/meta.mat`` maps it).
- ``imagefolder``: no file; an image's parent folder is its class (``n01440764/x.JPEG``).

Every reader returns ``LABEL_SCHEMA`` rows keyed as written in the file (``key``); ``attach``
matches them to the dataset's image ids (paths relative to the dataset root, posix) by the whole
id, the file name or the stem. Files are parsed with pyarrow (no Python loop per row).

A detector's ground truth (``BOX_FORMATS``: ``coco`` instances JSON, ``yolo`` a folder of .txt
files; ``dmx.runner.label_boxes``) is boxes, not one class per image: ``labels_for_run`` matches
its images to the run's image ids the same way and writes ``labels_boxes.parquet`` and
``labels_images.parquet`` for the run directory, where analysis reads them (docs/accuracy.md).
"""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from .label_boxes import read_coco, read_yolo
from .label_classes import ClassSpace, LabelError, imagenet1k_space

__all__ = ["BOX_FORMATS", "BOX_IMAGES_FILE", "BOXES_FILE", "FORMATS", "LABEL_SCHEMA", "LabelCoverage", "attach", "correct_at_k", "detect_format",
           "read_csv_labels", "read_devkit_meta", "read_image_folder", "read_imagenet_index",
           "read_imagenet_solution", "read_labels", "read_pairs", "MATCHES", "check_spec_labels",
           "labels_for_run", "model_classes", "model_task", "read_spec_boxes", "read_spec_labels"]

FORMATS = ("csv", "pairs", "imagenet-solution", "imagenet-index", "imagefolder")
#: A detector's ground truth: COCO instances JSON, a folder of YOLO .txt files.
BOX_FORMATS = ("coco", "yolo")
#: Where a run keeps a detector's ground truth (the run directory; analysis reads them there).
BOXES_FILE, BOX_IMAGES_FILE = "labels_boxes.parquet", "labels_images.parquet"
#: ``key``: the image as the labels file names it; ``label_index``: the model's class index.
LABEL_SCHEMA = pa.schema([("key", pa.string()), ("label_index", pa.int32())])
_DEVKIT_GT = "ILSVRC2012_validation_ground_truth.txt"


def _first_row(path: str, delimiter: str) -> list[str]:
    """The first non-empty line's fields (the header, or the first data row)."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:  # Excel writes a BOM
            line = next((ln for ln in f if ln.strip()), "")
    except (OSError, UnicodeDecodeError) as e:
        raise LabelError(f"cannot read labels file {path}: {e}") from None
    return next(csv.reader([line], delimiter=delimiter)) if line else []


def _read_table(path: str, *, delimiter: str = ",", header: bool = True,
                names: Sequence[str] | None = None) -> pa.Table:
    """A text table with every column read as a string (ids like ``0012`` stay as written);
    errors name the file."""
    first = _first_row(path, delimiter) if names is None else list(names)
    if not first:
        raise LabelError(f"labels file {path} is empty")
    cols = first if header and names is None else (list(names) if names
                                                   else [f"f{i}" for i in range(len(first))])
    try:
        return pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(column_names=cols,
                                           skip_rows=1 if header and names is None else 0),
            parse_options=pacsv.ParseOptions(delimiter=delimiter, quote_char='"' if delimiter == ","
                                              else False, ignore_empty_lines=True),
            convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in cols},
                                                 strings_can_be_null=False))
    except (pa.ArrowInvalid, OSError) as e:
        raise LabelError(f"cannot read labels file {path}: {e}") from None


def _keyed(keys: pa.Array | pa.ChunkedArray, labels: pa.Array | pa.ChunkedArray,
           classes: ClassSpace, by: str, index_base: int, source: str) -> pa.Table:
    keys = pc.utf8_trim_whitespace(pc.cast(keys, pa.string()))
    idx = classes.to_index(labels, by=by, index_base=index_base, source=source)
    return pa.Table.from_arrays([pa.chunked_array([keys]) if isinstance(keys, pa.Array) else keys,
                                 pa.chunked_array([idx])], schema=LABEL_SCHEMA)


def read_csv_labels(path: str, classes: ClassSpace, by: str = "auto",
                    index_base: int = 0) -> pa.Table:
    """``path,label`` CSV -> ``LABEL_SCHEMA`` (key = the ``path`` column as written)."""
    t = _read_table(path)
    cols = [c.strip().lower() for c in t.column_names]
    if "path" in cols and "label" in cols:
        keys, labels = t.column(cols.index("path")), t.column(cols.index("label"))
    else:  # no header: the first row is data
        t = _read_table(path, header=False)
        if t.num_columns < 2:
            raise LabelError(f"{path}: a labels CSV needs two columns, path and label")
        keys, labels = t.column(0), t.column(1)
    return _keyed(keys, labels, classes, by, index_base, path)


def _lines(path: str) -> pa.Array:
    """The file's non-empty lines (a whole line per value: no delimiter, no quoting)."""
    t = _read_table(path, delimiter="\x1f", header=False, names=["line"])
    lines = pc.utf8_trim_whitespace(t["line"].combine_chunks())
    keep = pc.and_(pc.not_equal(lines, ""), pc.invert(pc.starts_with(lines, "#")))
    return pc.filter(lines, keep)


def read_pairs(path: str, classes: ClassSpace, by: str = "auto", index_base: int = 0) -> pa.Table:
    """Whitespace-separated ``name label`` lines -> ``LABEL_SCHEMA``. Extra fields are ignored."""
    parts = pc.utf8_split_whitespace(_lines(path))
    short = pc.less(pc.list_value_length(parts), 2)
    if pc.any(short).as_py():
        bad = pc.filter(_lines(path), short)[0].as_py()
        raise LabelError(f"{path}: every line needs an image name and a label, got {bad!r}")
    return _keyed(pc.list_element(parts, 0), pc.list_element(parts, 1), classes, by,
                  index_base, path)


def read_imagenet_solution(path: str, classes: ClassSpace) -> pa.Table:
    """``LOC_val_solution.csv`` -> ``LABEL_SCHEMA`` (key = ImageId, a file stem)."""
    t = _read_table(path)
    if not {"ImageId", "PredictionString"} <= set(t.column_names):
        raise LabelError(f"{path}: expected columns ImageId,PredictionString, "
                         f"got {','.join(t.column_names)}")
    first = pc.list_element(pc.utf8_split_whitespace(t["PredictionString"]), 0)
    return _keyed(t["ImageId"], first, classes, "synset", 0, path)


def read_devkit_meta(meta_mat: str) -> dict[int, str]:
    """The devkit's ``data/meta.mat``: ``ILSVRC2012_ID`` (1-1000) -> WordNet synset."""
    from scipy.io import loadmat

    try:
        syn = loadmat(meta_mat, squeeze_me=True)["synsets"]
    except (OSError, KeyError, ValueError) as e:
        raise LabelError(f"cannot read ImageNet devkit meta {meta_mat}: {e}") from None
    leaves = [s for s in syn if int(s["num_children"]) == 0]  # the 1000 classes, not their parents
    return {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in leaves}


def read_imagenet_index(path: str, classes: ClassSpace, meta_mat: str | None = None,
                        index_base: int | None = None) -> pa.Table:
    """One class per line, line i (from 1) for ``ILSVRC2012_val_{i:08d}.JPEG``.

    The devkit's file holds devkit ids: give ``meta_mat`` (the devkit's ``data/meta.mat``) and
    they map through their synsets. A file already in the model's index order instead needs
    ``index_base`` (0 or 1) and no ``meta_mat``. Raises ``LabelError`` when neither is given.
    """
    lines = _lines(path)
    keys = pc.binary_join_element_wise(
        "ILSVRC2012_val_", pc.utf8_lpad(pc.cast(pa.array(np.arange(1, len(lines) + 1)), pa.string()),
                                        8, "0"), ".JPEG", "")
    if meta_mat is not None:
        meta = read_devkit_meta(meta_mat)
        ids = pa.array([str(k) for k in meta], pa.string())
        syns = pa.array(list(meta.values()), pa.string())
        pos = pc.index_in(lines, value_set=ids)
        if pos.null_count:
            bad = pc.filter(lines, pc.is_null(pos))[0].as_py()
            raise LabelError(f"{path}: devkit id {bad!r} is not in {meta_mat} (ids 1-1000)")
        return _keyed(keys, pc.take(syns, pos), classes, "synset", 0, path)
    if index_base is None:
        raise LabelError(f"{path} holds class ids in the ImageNet devkit's order, not the model's: "
                         "give the devkit's data/meta.mat (meta_mat), or index_base if the file "
                         "is already in the model's index order")
    return _keyed(keys, lines, classes, "index", index_base, path)


def read_image_folder(image_ids: Sequence[str] | pa.Array, classes: ClassSpace,
                      by: str = "auto") -> pa.Table:
    """ImageFolder layout: each image's parent folder name is its class (key = image id)."""
    ids = pc.cast(pa.array(image_ids) if not isinstance(image_ids, pa.Array) else image_ids,
                  pa.string())
    nested = pc.match_substring_regex(ids, r"[^/]+/[^/]+$")
    if not pc.all(nested).as_py():
        bad = pc.filter(ids, pc.invert(nested))[0].as_py()
        raise LabelError(f"image {bad!r} is not inside a class folder (ImageFolder layout: "
                         "root/<class>/<image>)")
    folder = pc.replace_substring_regex(ids, r"^(?:.*/)?([^/]+)/[^/]+$", r"\1")
    return _keyed(ids, folder, classes, by, 0, "the folder names")


def detect_format(path: str, task: str = "classification") -> str:
    """Guess a labels file's format from its name and first line (see ``FORMATS``); for a
    detector a folder is YOLO's and a ``.json`` or ``{...`` file COCO's (``BOX_FORMATS``)."""
    if os.path.isdir(path):
        if task == "detection":
            return "yolo"
        raise LabelError(f"{path} is a folder; give a labels file, or format imagefolder")
    if Path(path).name == _DEVKIT_GT:
        return "imagenet-index"
    with open(path, encoding="utf-8", errors="replace") as f:
        first = f.readline().strip()
    if path.lower().endswith(".json") or first.startswith("{"):
        return "coco"
    if first.replace(" ", "") == "ImageId,PredictionString":
        return "imagenet-solution"
    if "," in first:
        return "csv"
    return "pairs" if len(first.split()) >= 2 else "imagenet-index"


def read_labels(path: str | None, classes: ClassSpace, fmt: str = "auto", *, by: str = "auto",
                index_base: int = 0, meta_mat: str | None = None,
                image_ids: Sequence[str] | None = None) -> pa.Table:
    """Any format of ``FORMATS`` -> ``LABEL_SCHEMA``; ``auto`` guesses (``detect_format``).

    ``image_ids`` is needed (and ``path`` ignored) for ``imagefolder``; ``meta_mat`` for the
    devkit's ImageNet index file. Raises ``LabelError`` (or ``UnmappedLabel``) with the file named.
    """
    if fmt == "imagefolder":
        if image_ids is None:
            raise LabelError("imagefolder labels are read from the image ids: pass image_ids")
        return read_image_folder(image_ids, classes, by)
    if path is None:
        raise LabelError(f"labels format {fmt} needs a file")
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt == "csv":
        return read_csv_labels(path, classes, by, index_base)
    if fmt == "pairs":
        return read_pairs(path, classes, by, index_base)
    if fmt == "imagenet-solution":
        return read_imagenet_solution(path, classes)
    if fmt == "imagenet-index":
        return read_imagenet_index(path, classes, meta_mat,
                                   None if meta_mat else (index_base if by == "index" else None))
    raise LabelError(f"unknown labels format {fmt!r}; one of: auto, {', '.join(FORMATS)}")


MATCHES = ("auto", "id", "name", "stem")


class LabelCoverage(dict):
    """How labels met images: ``match`` (the level used), ``images``, ``labelled``,
    ``unlabelled`` (images no label names) and ``unused`` (labels naming no image, e.g. under a
    ``limit``) with an ``unused_example``. A dict, so it goes into a manifest as is."""


def _derive(keys: pa.Array | pa.ChunkedArray, level: str) -> pa.Array | pa.ChunkedArray:
    """The part of an image id or label key compared at ``level`` (whole id, file name, stem)."""
    if level == "id":
        return keys
    name = pc.replace_substring_regex(keys, r"^.*/", "")
    return name if level == "name" else pc.replace_substring_regex(name, r"\.[^./]*$", "")


def _dedupe(labels: pa.Table, level: str) -> pa.Table:
    """One row per derived key; the same key with two different classes is an error."""
    t = pa.table({"k": _derive(labels["key"], level), "label_index": labels["label_index"],
                  "key": labels["key"]})
    g = t.group_by("k").aggregate([("label_index", "min"), ("label_index", "max"), ("key", "min")])
    clash = pc.not_equal(g["label_index_min"], g["label_index_max"])
    if pc.any(clash).as_py():
        row = g.filter(clash).slice(0, 1).to_pylist()[0]
        raise LabelError(f"image {row['key_min']!r} has two labels (classes "
                         f"{row['label_index_min']} and {row['label_index_max']})")
    return pa.table({"k": g["k"], "label_index": g["label_index_min"]})


def attach(labels: pa.Table, image_ids: Sequence[str] | pa.Array, match: str = "auto"
           ) -> tuple[pa.Table, LabelCoverage]:
    """Align labels to ``image_ids``: a table ``(image_id, label_index)`` in ``image_ids`` order,
    ``label_index`` null where no label names the image, and the ``LabelCoverage``.

    ``match`` compares the whole id (``id``), the file name (``name``) or the file name without
    its suffix (``stem``, as ``LOC_val_solution.csv`` names images); ``auto`` takes the first
    level that labels the most images. A level at which two image ids look alike (``a/x.jpg``,
    ``b/x.jpg`` by name) is refused if it would label them.
    """
    if match not in MATCHES:
        raise ValueError(f"match must be one of {', '.join(MATCHES)}, not {match!r}")
    ids = pc.cast(image_ids if isinstance(image_ids, (pa.Array, pa.ChunkedArray))
                  else pa.array(list(image_ids), pa.string()), pa.string())
    levels = ("id", "name", "stem") if match == "auto" else (match,)
    best: tuple[int, str, pa.Table, pa.Array] | None = None
    for level in levels:
        lab = _dedupe(labels, level)
        pos = pc.index_in(_derive(ids, level), value_set=lab["k"])
        n = len(pos) - pos.null_count
        if best is None or n > best[0]:
            best = (n, level, lab, pos)
    n, level, lab, pos = best
    if level != "id" and n:
        _refuse_lookalikes(ids, _derive(ids, level), pos, level)
    unused = pc.is_null(pc.index_in(lab["k"], value_set=_derive(ids, level)))
    n_unused = len(unused) - pc.sum(pc.cast(pc.invert(unused), pa.int64())).as_py()
    cov = LabelCoverage(match=level, images=len(ids), labelled=n, unlabelled=len(ids) - n,
                        unused=n_unused,
                        unused_example=pc.filter(lab["k"], unused)[0].as_py() if n_unused else None)
    return pa.table({"image_id": ids, "label_index": pc.take(lab["label_index"], pos)}), cov


def _refuse_lookalikes(ids: pa.Array, derived: pa.Array, pos: pa.Array, level: str) -> None:
    counts = pa.table({"k": derived, "hit": pc.is_valid(pos)}).group_by("k").aggregate(
        [("hit", "count"), ("hit", "any")])
    dup = pc.and_(pc.greater(counts["hit_count"], 1), counts["hit_any"])
    if pc.any(dup).as_py():
        k = pc.filter(counts["k"], dup)[0].as_py()
        same = pc.filter(ids, pc.equal(derived, k)).to_pylist()[:2]
        raise LabelError(f"labels name images by {level}, and {same[0]!r} and {same[1]!r} share "
                         f"the {level} {k!r}: give labels by path relative to the dataset root")


def correct_at_k(topk: np.ndarray, label_index: pa.Array | np.ndarray | Sequence[int | None]
                 ) -> tuple[pa.BooleanArray, pa.BooleanArray]:
    """Per image: is the label the top-1 class, and is it among the ``topk`` columns.

    ``topk`` is (n, k) class indices, best first; ``label_index`` has n entries, null (or
    negative) where the image has no label: both results are null there.
    """
    topk = np.asarray(topk)
    if topk.ndim != 2:
        raise ValueError(f"topk must be (n, k), got shape {topk.shape}")
    lab = label_index if isinstance(label_index, (pa.Array, pa.ChunkedArray)) \
        else pa.array(list(label_index) if not isinstance(label_index, np.ndarray)
                      else label_index, pa.int64())
    lab = pc.cast(lab, pa.int64())
    values = pc.fill_null(lab, -1).to_numpy(zero_copy_only=False)
    if len(values) != topk.shape[0]:
        raise ValueError(f"{topk.shape[0]} images of top-k but {len(values)} labels")
    missing = pc.or_(pc.is_null(lab), pc.less(pc.fill_null(lab, -1), 0)).to_numpy(
        zero_copy_only=False)
    hit = topk == values[:, None]
    top1 = pa.array(hit[:, 0] if topk.shape[1] else np.zeros(len(values), bool), mask=missing)
    return top1, pa.array(hit.any(axis=1), mask=missing)


def model_classes(model_spec) -> ClassSpace:
    """The class space labels are mapped into: ImageNet-1k (with synsets and WordNet lemmas)
    for a model whose 1,000 class names are ImageNet's, else the model's own names (a built-in
    model's ``ModelDef.labels``, or ``model.labels``: a text file, one name per line, in index
    order). Raises ``LabelError`` for a model that is no classifier or names no classes."""
    builtin = _builtin(model_spec)
    task = model_task(model_spec)
    if task not in ("classification", "detection"):
        raise LabelError(f"dataset.labels holds class labels or boxes, but the model's task is "
                         f"{task}: ground truth is for classifiers and detectors (docs/accuracy.md)")
    if builtin:
        names = builtin.labels
        where = f"the built-in model {model_spec.name}"
    elif model_spec.labels:
        try:
            text = Path(model_spec.labels).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise LabelError(f"cannot read model.labels {model_spec.labels}: {e}") from None
        names = tuple(ln.strip() for ln in text.splitlines() if ln.strip())
        where = f"model.labels ({model_spec.labels})"
    else:
        names = None
        where = "the model"
    if not names:
        raise LabelError(f"dataset.labels needs the model's classes, and {where} names none: give "
                         "model.labels, a text file with one class name per line in index order")
    if len(names) == 1000 and _is_imagenet(names):
        return imagenet1k_space(names)
    return ClassSpace(tuple(names))


def _builtin(model_spec):
    if not model_spec.name:
        return None
    from .models import get_model
    return get_model(model_spec.name)


def model_task(model_spec) -> str:
    """classification, detection or tensor: a built-in model's own task, else ``model.task``."""
    builtin = _builtin(model_spec)
    return builtin.task if builtin else (model_spec.task or "classification")


def _is_imagenet(names: Sequence[str]) -> bool:
    """1,000 names that are ImageNet-1k's in its index order (nine in ten equal to
    torchvision's list, case and ``_`` aside): a 1,000-class model of another dataset is not
    given ImageNet's synsets."""
    from .models import imagenet_labels

    norm = lambda t: " ".join(t.replace("_", " ").split()).casefold()  # noqa: E731
    same = sum(norm(a) == norm(b) for a, b in zip(names, imagenet_labels()))
    return same >= 900


def _source(spec):
    return getattr(spec.dataset, "labels", None)


def _format(src, task: str) -> str:
    """The labels' format, guessed where ``auto``; a classifier's format for a detector (or the
    other way round) is refused with both named."""
    fmt = src.format
    if fmt == "auto":
        fmt = "imagefolder" if src.path is None else detect_format(src.path, task)
    boxes = fmt in BOX_FORMATS
    if task == "detection" and not boxes:
        raise LabelError(f"dataset.labels ({src.path or fmt}) is read as {fmt}, class labels, but "
                         f"the model is a detector: give COCO JSON (format coco) or a folder of "
                         f"YOLO .txt files (format yolo)")
    if task != "detection" and boxes:
        raise LabelError(f"dataset.labels ({src.path}) is {fmt} detection ground truth, but the "
                         f"model's task is {task}: give class labels (docs/accuracy.md)")
    return fmt


def read_spec_labels(spec, image_ids: Sequence[str] | pa.Array | None = None,
                     classes: ClassSpace | None = None) -> pa.Table:
    """The spec's ``dataset.labels`` read into ``LABEL_SCHEMA`` in the model's class indices;
    raises ``LabelError`` / ``UnmappedLabel`` (one line, naming the file and the label). For
    ``imagefolder`` the keys are ``image_ids`` (None: nothing to read yet, an empty table)."""
    src = _source(spec)
    classes = classes or model_classes(spec.model)
    if src.format == "imagefolder" and image_ids is None:
        return LABEL_SCHEMA.empty_table()
    return read_labels(src.path, classes, src.format, by=src.by, index_base=src.index_base,
                       meta_mat=src.meta_mat, image_ids=image_ids)


def read_spec_boxes(spec, image_ids: Sequence[str] | pa.Array | None = None,
                    classes: ClassSpace | None = None) -> tuple[pa.Table, pa.Table, bool]:
    """A detector's ``dataset.labels``: (boxes ``BOX_SCHEMA``, images ``IMAGE_BOX_SCHEMA``,
    normalised). COCO boxes are in pixels; YOLO's stay normalised to 0-1 (``normalised`` True,
    image sizes 1 x 1) until analysis scales them by each image's size in ``images.parquet``,
    so the driver opens no image. YOLO needs ``image_ids`` (None: the folder is only checked)."""
    from .label_boxes import BOX_SCHEMA, IMAGE_BOX_SCHEMA

    src = _source(spec)
    classes = classes or model_classes(spec.model)
    fmt = _format(src, "detection")
    if fmt == "coco":
        by = "index" if src.by == "index" else "name"
        boxes, images = read_coco(src.path, classes, by, src.index_base)
        return boxes, images, False
    if image_ids is None:
        if not os.path.isdir(src.path):
            raise LabelError(f"YOLO labels folder {src.path} does not exist")
        return BOX_SCHEMA.empty_table(), IMAGE_BOX_SCHEMA.empty_table(), True
    ids = pc.cast(pa.array(image_ids) if not isinstance(image_ids, (pa.Array, pa.ChunkedArray))
                  else image_ids, pa.string())
    ones = pa.array(np.ones(len(ids), np.int32))
    boxes, images = read_yolo(src.path, pa.table({"image_id": ids, "width": ones, "height": ones}),
                              classes)
    return boxes, images, True


def check_spec_labels(spec) -> None:
    """Read and map the spec's labels before anything heavy runs, so an unmapped label is one
    error line at once, not after the model's conversion; a no-op without ``dataset.labels``."""
    src = _source(spec)
    if src is None:
        return
    if model_task(spec.model) == "detection":
        read_spec_boxes(spec)
    else:
        _format(src, model_task(spec.model))
        read_spec_labels(spec)


def labels_for_run(spec, images: Path, scratch: Path) -> tuple[Path | None, dict | None]:
    """The ground truth of a run's images: a Parquet file (image_id, label_index) in
    ``scratch`` that the chunk list joins, and the coverage the manifest records; (None, None)
    when the spec names no labels (``dataset.labels``).

    For a detector the path is None: the boxes go to ``BOXES_FILE`` and ``BOX_IMAGES_FILE`` in
    ``scratch``, named in the coverage's ``files`` for the caller to put in the run directory.
    ``images`` is the run's sorted image list (a Parquet file with an ``image_id`` column).
    Raises ``LabelError`` when the labels cannot be read or mapped, or name none of the images.
    """
    import pyarrow.parquet as pq

    src = _source(spec)
    if not src:
        return None, None
    ids = pq.read_table(images, columns=["image_id"])["image_id"].combine_chunks()
    classes = model_classes(spec.model)
    task = model_task(spec.model)
    fmt = _format(src, task)
    if task == "detection":
        return None, _boxes_for_run(spec, ids, classes, fmt, Path(scratch))
    labels = read_spec_labels(spec, ids, classes)
    table, cov = attach(labels, ids, src.match)
    _refuse_none_named(spec, cov, labels["key"], ids)
    out = Path(scratch) / "labels.parquet"
    pq.write_table(table.filter(pc.is_valid(table["label_index"])), out)
    return out, dict(cov, source=src.path, format=fmt, classes=len(classes))


def _refuse_none_named(spec, cov: LabelCoverage, keys: pa.Array | pa.ChunkedArray,
                       ids: pa.Array) -> None:
    if cov["labelled"] == 0 and len(ids) and not spec.dataset.limit:   # a limit may cut them all
        src = _source(spec)
        example = keys[0].as_py() if len(keys) else None
        raise LabelError(f"no image of the dataset is named in {src.path or 'the folder names'} "
                         f"(matched by {cov['match']}; e.g. label {example!r}, image "
                         f"{ids[0].as_py()!r}): give labels by path relative to the dataset root, "
                         "file name or stem")


def _boxes_for_run(spec, ids: pa.Array, classes: ClassSpace, fmt: str, scratch: Path) -> dict:
    """Write a detector's ground truth for the run's images (``BOXES_FILE``: image_id, box in
    pixels or normalised, label_index, iscrowd, area; ``BOX_IMAGES_FILE``: every run image the
    ground truth covers, boxes or none, with its size) and return the coverage."""
    import pyarrow.parquet as pq

    src = _source(spec)
    boxes, images, normalised = read_spec_boxes(spec, ids, classes)
    image_of, cov = _match_keys(images["key"], ids, src.match)
    _refuse_none_named(spec, cov, images["key"], ids)
    covered = pc.is_valid(image_of)
    size_null = pa.nulls(len(images), pa.int32())
    pq.write_table(pa.table({
        "image_id": image_of, "width": size_null if normalised else images["width"],
        "height": size_null if normalised else images["height"]}).filter(covered),
        scratch / BOX_IMAGES_FILE)
    owner = pc.take(image_of, pc.index_in(boxes["key"], value_set=images["key"]))
    table = boxes.drop_columns(["key"]).add_column(0, "image_id", owner)
    table = table.filter(pc.is_valid(owner))
    pq.write_table(table, scratch / BOXES_FILE)
    return dict(cov, source=src.path, format=fmt, classes=len(classes), boxes=table.num_rows,
                normalised=normalised, files=[BOXES_FILE, BOX_IMAGES_FILE])


def _match_keys(keys: pa.Array | pa.ChunkedArray, image_ids: pa.Array, match: str = "auto"
                ) -> tuple[pa.Array, LabelCoverage]:
    """For each image the ground truth names (``keys``, distinct), the run's image id it is
    (null: not in the run), matched as ``attach`` does: whole id, file name or stem, ``auto`` the
    level that finds the most; a level at which two keys or two image ids look alike is refused
    if it would be used."""
    if match not in MATCHES:
        raise ValueError(f"match must be one of {', '.join(MATCHES)}, not {match!r}")
    keys = pc.cast(keys, pa.string())
    keys = keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys
    levels = ("id", "name", "stem") if match == "auto" else (match,)
    best = None
    for level in levels:
        k = _derive(keys, level)
        if pc.count_distinct(k).as_py() < len(k):
            if match != "auto":
                counts = pa.table({"k": k}).group_by("k").aggregate([("k", "count")])
                dup = counts.filter(pc.greater(counts["k_count"], 1))["k"][0].as_py()
                raise LabelError(f"the ground truth names two images with the {level} {dup!r}: "
                                 "match by id (the path relative to the dataset root)")
            continue
        pos = pc.index_in(_derive(image_ids, level), value_set=k)
        n = len(pos) - pos.null_count
        if best is None or n > best[0]:
            best = (n, level, k, pos)
    if best is None:
        raise LabelError("the ground truth names images alike at every level: give file names "
                         "as paths relative to the dataset root")
    n, level, k, pos = best
    if level != "id" and n:
        _refuse_lookalikes(image_ids, _derive(image_ids, level), pos, level)
    at = pc.index_in(k, value_set=_derive(image_ids, level))
    image_of = pc.take(image_ids, at)
    unused = pc.is_null(at)
    n_unused = int(pc.sum(pc.cast(unused, pa.int64())).as_py() or 0)
    cov = LabelCoverage(match=level, images=len(image_ids), labelled=n,
                        unlabelled=len(image_ids) - n, unused=n_unused,
                        unused_example=pc.filter(keys, unused)[0].as_py() if n_unused else None)
    return image_of, cov
