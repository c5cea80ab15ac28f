"""Chunks of a run that is started or resumed, decided by image ids - never by position.

A resume keeps every finished chunk whose images are all still in the dataset, unchanged in size,
and cuts the images not yet covered into new chunks. So when images were added, exactly the
missing (cell, image) pairs are computed; when an image whose rows are already written was
removed or changed, the resume is refused with one line (its rows cannot be taken back silently).
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass

import pyarrow as pa

from results import RunDirError
from results.store import CHUNK_LIST_SCHEMA, dataset_digest

from .dataset import ImageRef
from .plan import Chunk, make_chunks


@dataclass(frozen=True)
class ChunkPlan:
    chunks: list[Chunk]
    kept: set[int]              # finished chunks reused as they are
    note: str | None = None     # what changed in the dataset since the run began


def digest(images: list[ImageRef]) -> str:
    return dataset_digest((r.image_id, r.size) for r in images)


def chunk_list(chunks: list[Chunk]) -> pa.Table:
    """The plan as a table: one row per image (image_id, size_bytes, chunk)."""
    rows = [(r.image_id, r.size, c.index) for c in chunks for r in c.images]
    return pa.Table.from_pydict({"image_id": [r[0] for r in rows], "size_bytes": [r[1] for r in rows],
                                 "chunk": [r[2] for r in rows]}, schema=CHUNK_LIST_SCHEMA)


def plan_chunks(images: list[ImageRef], size: int, previous: pa.Table | None, done: set[int],
                where: str) -> ChunkPlan:
    """Chunks for ``images``: the finished chunks of ``previous`` (the run's chunk list) that
    still hold, plus new chunks of ``size`` for every image they do not cover."""
    if previous is None:
        if done:
            raise RunDirError(f"{where} was written by a dmx that numbered chunks by position; "
                              "it cannot be resumed safely: choose another --out")
        return ChunkPlan(make_chunks(images, size), set())
    current = {r.image_id: r for r in images}
    members: dict[int, list[tuple[str, int | None]]] = defaultdict(list)
    for image_id, nbytes, chunk in zip(previous["image_id"].to_pylist(),
                                       previous["size_bytes"].to_pylist(),
                                       previous["chunk"].to_pylist()):
        members[chunk].append((image_id, nbytes))
    kept: list[Chunk] = []
    covered: set[str] = set()
    for chunk in sorted(done & set(members), key=lambda c: members[c][0][0]):
        ids = members[chunk]
        gone = [i for i, _ in ids if i not in current]
        if gone:
            raise RunDirError(
                f"the dataset changed since {where} began: {len(gone)} image(s) whose rows are "
                f"already written are gone ({gone[0]}{', ...' if len(gone) > 1 else ''}); "
                "restore them, or choose another --out for a new run")
        changed = [i for i, n in ids if n is not None and current[i].size is not None
                   and current[i].size != n]
        if changed:
            raise RunDirError(
                f"the dataset changed since {where} began: {len(changed)} image(s) whose rows are "
                f"already written changed size ({changed[0]}); choose another --out for a new run")
        kept.append(Chunk(chunk, tuple(current[i] for i, _ in ids)))
        covered.update(i for i, _ in ids)
    fresh = make_chunks([r for r in images if r.image_id not in covered], size)
    clash = {c.index for c in fresh} & {c.index for c in kept}
    if clash:
        raise RunDirError(f"chunk id clash in {where}; choose another --out")
    chunks = [dataclasses.replace(c, position=i) for i, c in
              enumerate(sorted(kept + fresh, key=lambda c: c.images[0].image_id))]
    old_ids = set(previous["image_id"].to_pylist())
    added = len(set(current) - old_ids)
    removed = len(old_ids - set(current))
    note = (f"the dataset changed since the run began ({added} image(s) added, {removed} "
            "removed, none of them with rows written): computing only the missing "
            "(cell, image) pairs") if added or removed else None
    return ChunkPlan(chunks, {c.index for c in kept}, note)
