"""The execution plan shipped to workers: cells, reference, model artifacts, chunks. Plain data."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from dmx.matrix import Cell
from dmx.results.store import chunk_id

from .backends.base import ModelArtifacts
from .convert import ResolvedModel
from .dataset import ImageRef


@dataclass(frozen=True)
class Chunk:
    """A slice of the dataset: the unit of scheduling, retry and resume."""

    index: int                      # chunk_id of its image ids (not a position)
    images: tuple[ImageRef, ...]
    position: int = 0               # place in the run's plan (samples the determinism check)


@dataclass(frozen=True)
class Plan:
    run_id: str
    axes: tuple[str, ...]
    cells: tuple[Cell, ...]
    reference_id: str
    skipped: Mapping[str, str]
    model: ResolvedModel
    artifacts: ModelArtifacts
    threads: int = 1
    batch: int = 8
    reuse_check_every: int = 8          # recompute one batch per infer setting every N chunks
    out: str = ""                       # the run directory workers write their part files to

    @property
    def reference(self) -> Cell:
        return next(c for c in self.cells if c.cell_id == self.reference_id)

    @property
    def needs_gpu(self) -> bool:
        return any(str(c.get("device", "cpu")).startswith("cuda") for c in self.active_cells())

    def active_cells(self) -> list[Cell]:
        return [c for c in self.cells if c.cell_id not in self.skipped]


def make_chunks(images: list[ImageRef], size: int) -> list[Chunk]:
    """Consecutive slices of ``size`` images, each numbered by its image ids (``chunk_id``),
    never by its position: a resume after the dataset changed cannot shift a chunk."""
    chunks = [Chunk(chunk_id(r.image_id for r in images[i: i + size]), tuple(images[i: i + size]),
                    i // size) for i in range(0, len(images), size)]
    if len({c.index for c in chunks}) != len(chunks):  # 60-bit ids: never seen, but never silent
        raise ValueError("two chunks of the dataset got the same id; change --chunk-size")
    return chunks


CHUNK_BYTES = 256 * 1024 * 1024  # what one chunk's preprocessed inputs may hold in a worker
# Each chunk costs a part file (two Parquet writes of ~60 columns, ~3 ms each whatever their
# rows), its columns' setup, a task round trip and the driver's bookkeeping: on small images
# 256 per chunk took 1.24-1.29 ms per image in one worker against 1.33-1.43 with 64.
MAX_CHUNK = 256


def default_chunk_size(n_images: int, n_prep_variants: int, workers: int,
                       input_hw: tuple[int, int] = (224, 224)) -> int:
    """Big enough to batch inference, small enough to spread over workers and bound memory:
    about 8 chunks per worker (the last chunks end unevenly; with 4 per worker one of two actors
    idled 2.2 s of a 17.8 s run, with 8 0.8 s), and at most ``CHUNK_BYTES`` of preprocessed
    inputs per chunk (each kept as 0-255 pixels and as the normalised tensor, float32: 24 bytes
    per pixel).
    Full-resolution decodes do not count: a worker holds one at a time (see ``Worker``)."""
    per_image = 24 * input_hw[0] * input_hw[1] * max(1, n_prep_variants)
    by_memory = max(1, CHUNK_BYTES // per_image)
    by_spread = max(1, -(-n_images // (8 * max(1, workers))))
    return max(1, min(MAX_CHUNK, by_memory, max(by_spread, 4)))
