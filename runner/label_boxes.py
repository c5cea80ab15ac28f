"""Detection ground truth: COCO JSON annotations and YOLO ``.txt`` files -> one table of boxes.

``BOX_SCHEMA``: one row per ground-truth box, keyed by the image as its file names it
(``key``: COCO's ``file_name``; for YOLO the image id itself), corners ``x1 y1 x2 y2`` in image
pixels (continuous coordinates, as COCO's: a box from x=10 to x=20 is 10 px wide), the model's
class index (``label_index``), and COCO's ``iscrowd`` and ``area`` (px^2), which its evaluation
uses. Images that have no boxes come back in a second table (``IMAGE_BOX_SCHEMA``: every image
the ground truth covers, with its size), because an image with no objects still counts in mAP
(every detection on it is a false positive).
"""
from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .label_classes import ClassSpace, LabelError

__all__ = ["BOX_SCHEMA", "IMAGE_BOX_SCHEMA", "read_coco", "read_yolo"]

BOX_SCHEMA = pa.schema([("key", pa.string()), ("x1", pa.float64()), ("y1", pa.float64()),
                        ("x2", pa.float64()), ("y2", pa.float64()), ("label_index", pa.int32()),
                        ("iscrowd", pa.bool_()), ("area", pa.float64())])
#: The images a detection ground truth covers (with or without boxes); size in px.
IMAGE_BOX_SCHEMA = pa.schema([("key", pa.string()), ("width", pa.int32()), ("height", pa.int32())])


def read_coco(path: str, classes: ClassSpace, by: str = "name",
              index_base: int = 0) -> tuple[pa.Table, pa.Table]:
    """COCO ``instances_*.json`` -> (boxes ``BOX_SCHEMA``, images ``IMAGE_BOX_SCHEMA``).

    ``by="name"`` (or ``auto``) maps COCO's category names to the model's classes (COCO's ids run
    1-90 with gaps, an 80-class model's indices 0-79); ``by="index"`` takes ``category_id`` as
    the index, ``index_base`` being the id of the model's first class.
    The JSON is parsed whole (``json.load``: a 450 MB train file needs ~3 GB); columns are built
    from it once, not a row object per box.
    """
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        images, anns, cats = data["images"], data.get("annotations", []), data.get("categories", [])
        img_ids = np.array([im["id"] for im in images], dtype=np.int64)
        files = [im["file_name"] for im in images]
        sizes = np.array([(im.get("width", 0), im.get("height", 0)) for im in images],
                         dtype=np.int64).reshape(-1, 2)
        bbox = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        ann_img = np.array([a["image_id"] for a in anns], dtype=np.int64)
        ann_cat = np.array([a["category_id"] for a in anns], dtype=np.int64)
        crowd = np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool)
        area = np.array([a.get("area", np.nan) for a in anns], dtype=np.float64)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LabelError(f"{path} is not COCO detection annotations: {e}") from None
    order = np.argsort(img_ids, kind="stable")
    at = np.searchsorted(img_ids[order], ann_img)
    known = at < len(img_ids)
    known[known] = img_ids[order][at[known]] == ann_img[known]
    if not known.all():
        raise LabelError(f"{path}: an annotation names image id {int(ann_img[~known][0])}, "
                         "which is not in its images list")
    file_of = pa.array(files, pa.string()).take(pa.array(order[at], pa.int64()))
    if by in ("name", "auto"):
        name_of = {int(c["id"]): str(c["name"]) for c in cats}
        missing = sorted(set(np.unique(ann_cat).tolist()) - set(name_of))
        if missing:
            raise LabelError(f"{path}: category id {missing[0]} is not in its categories list")
        uniq = np.unique(ann_cat)
        mapped = classes.to_index([name_of[int(u)] for u in uniq], by="name", source=path)
        label = mapped.to_numpy()[np.searchsorted(uniq, ann_cat)] if len(ann_cat) else ann_cat
    else:
        label = classes.to_index(pa.array(ann_cat.astype(str)), by="index", index_base=index_base,
                                 source=path).to_numpy()
    area = np.where(np.isnan(area), bbox[:, 2] * bbox[:, 3], area)
    boxes = pa.table({"key": file_of, "x1": bbox[:, 0], "y1": bbox[:, 1],
                      "x2": bbox[:, 0] + bbox[:, 2], "y2": bbox[:, 1] + bbox[:, 3],
                      "label_index": np.asarray(label, np.int32), "iscrowd": crowd, "area": area},
                     schema=BOX_SCHEMA)
    imgs = pa.table({"key": files, "width": sizes[:, 0].astype(np.int32),
                     "height": sizes[:, 1].astype(np.int32)}, schema=IMAGE_BOX_SCHEMA)
    return boxes, imgs


def read_yolo(labels_dir: str, sizes: pa.Table, classes: ClassSpace,
              require_all: bool = False) -> tuple[pa.Table, pa.Table]:
    """YOLO labels -> (boxes ``BOX_SCHEMA``, images ``IMAGE_BOX_SCHEMA``).

    ``sizes`` has ``image_id``, ``width``, ``height`` (px; e.g. dmx's ``images.parquet``).
    Image ``a/b.jpg``'s labels are ``labels_dir/a/b.txt``: lines ``class cx cy w h``, centre and
    size normalised to 0-1, class a 0-based index. A missing file means an image with no objects
    (YOLO's convention for background images) unless ``require_all``; no file at all for any
    image is an error (the folder is wrong). One small read per image: files, not rows.
    """
    root = Path(labels_dir)
    if not root.is_dir():
        raise LabelError(f"YOLO labels folder {labels_dir} does not exist")
    ids = sizes["image_id"].to_pylist()
    w = sizes["width"].to_numpy(zero_copy_only=False).astype(np.float64)
    h = sizes["height"].to_numpy(zero_copy_only=False).astype(np.float64)
    parts, owner, found = [], [], 0
    for i, image_id in enumerate(ids):
        txt = root / PurePosixPath(image_id).with_suffix(".txt")
        try:
            text = txt.read_text(encoding="utf-8")
        except FileNotFoundError:
            if require_all:
                raise LabelError(f"no YOLO labels for image {image_id!r} (looked for {txt})") from None
            continue
        found += 1
        try:
            rows = np.array(text.split(), dtype=np.float64).reshape(-1, 5)
        except ValueError:
            raise LabelError(f"{txt}: YOLO lines are 'class cx cy w h' (5 numbers)") from None
        parts.append(rows)
        owner.append(np.full(len(rows), i, dtype=np.int64))
    if ids and not found:
        raise LabelError(f"no YOLO label file under {labels_dir} for any of {len(ids)} images "
                         f"(e.g. {root / PurePosixPath(ids[0]).with_suffix('.txt')})")
    rows = np.concatenate(parts) if parts else np.zeros((0, 5))
    who = np.concatenate(owner) if owner else np.zeros(0, np.int64)
    cls = rows[:, 0]
    if (cls != np.round(cls)).any():
        raise LabelError(f"{labels_dir}: a YOLO class {cls[cls != np.round(cls)][0]} is not an integer")
    label = classes.to_index(pa.array(cls.astype(np.int64).astype(str)), by="index",
                             source=labels_dir).to_numpy()
    cx, cy, bw, bh = rows[:, 1] * w[who], rows[:, 2] * h[who], rows[:, 3] * w[who], rows[:, 4] * h[who]
    boxes = pa.table({"key": pa.array(ids, pa.string()).take(pa.array(who)),
                      "x1": cx - bw / 2, "y1": cy - bh / 2, "x2": cx + bw / 2, "y2": cy + bh / 2,
                      "label_index": label.astype(np.int32),
                      "iscrowd": np.zeros(len(rows), bool), "area": bw * bh}, schema=BOX_SCHEMA)
    imgs = pa.table({"key": pc.cast(sizes["image_id"], pa.string()),
                     "width": w.astype(np.int32), "height": h.astype(np.int32)},
                    schema=IMAGE_BOX_SCHEMA)
    return boxes, imgs

