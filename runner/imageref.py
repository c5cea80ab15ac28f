"""One image of a dataset as the runner addresses it, and the file suffixes read as images.
Shared by the local listing (``dataset``) and remote/shard sources (``sources``)."""
from __future__ import annotations

from dataclasses import dataclass

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".webp", ".tif", ".tiff",
                  ".gif"}
MANIFEST_SUFFIXES = {".txt", ".csv", ".lst"}


@dataclass(frozen=True)
class ImageRef:
    """One image of the dataset: a stable id (path relative to the dataset root) and its path."""

    image_id: str
    path: str
    size: int | None = None     # bytes, when known from the listing (the run records it)
    label: int | None = None    # ground-truth class index (dataset.labels), when known
