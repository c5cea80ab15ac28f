"""Model artifacts on a cluster that shares nothing but the run directory.

The driver makes every model product once (``dmx.runner.convert``), in its own cache. ``publish``
copies each product - its file and its sidecars (OpenVINO's ``.bin``, ONNX external data) - and
a user's weights file once into ``RUN/artifacts/<sha256>/`` (``RUN`` may be ``s3://``/``gs://``),
and says where each went and its digest (``Published``). A worker calls ``materialise`` before
it builds a session: each product is fetched into the node's own cache
(``<cache>/artifacts/<sha256>/``), verified by its SHA-256, and the worker builds from those
local paths. A node never opens a path on the driver's disk; a node that already holds a
verified copy (an earlier run, another actor) fetches nothing.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from dmx.results.fs import StorageError, filesystem, uri

from .backends.base import ModelArtifacts
from .cache import cache_dir

ARTIFACTS_DIR = "artifacts"
WEIGHTS_KEY = "weights"          # a user's weights file (``model.weights``), beside the products
_BLOCK = 8 << 20                 # bytes per read/write while streaming


class ArtifactError(RuntimeError):
    """A model artifact could not be published or fetched, or its bytes are not what the driver
    published (digest mismatch); the message names the file and the location."""


@dataclass(frozen=True)
class PublishedFile:
    name: str        # file name, as the product names it (model.xml, model.bin)
    sha256: str      # hex digest of its bytes
    size: int        # bytes


@dataclass(frozen=True)
class Published:
    """One product in the run directory: ``location`` (a folder or prefix) holds ``files``, of
    which ``main`` is the one a backend opens."""

    location: str
    main: str
    files: tuple[PublishedFile, ...]

    @property
    def digest(self) -> str:
        """The main file's SHA-256: the folder name, in the run directory and in node caches."""
        return next(f.sha256 for f in self.files if f.name == self.main)

    def record(self) -> dict:
        """What the manifest keeps of it (JSON)."""
        return {"location": self.location, "main": self.main,
                "files": {f.name: {"sha256": f.sha256, "bytes": f.size} for f in self.files}}


def product_files(path: str | os.PathLike) -> list[Path]:
    """A product's file and its sidecars: files beside it whose name starts with its stem and a
    dot (``model.xml`` -> ``model.bin``; ``model.onnx`` -> ``model.onnx.data``), main first.
    dmx's cache metadata (``*.json`` beside a cached product) is not part of the product."""
    main = Path(path)
    stem = main.name.rsplit(".", 1)[0]
    side = sorted(p for p in main.parent.iterdir()
                  if p.is_file() and p != main and p.name.startswith(stem + ".")
                  and p.name != main.name + ".json" and not p.name.startswith(".tmp"))
    return [main, *side]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _publish_one(path: str, run: str) -> Published:
    try:
        files = product_files(path)
    except OSError as e:
        raise ArtifactError(f"model product {path}: {_first_line(e)}") from None
    sums = [PublishedFile(p.name, _sha256(p), p.stat().st_size) for p in files]
    fs, base = filesystem(run)
    folder = f"{base}/{ARTIFACTS_DIR}/{sums[0].sha256}"
    try:
        fs.create_dir(folder, recursive=True)
        for p, f in zip(files, sums):
            dest = f"{folder}/{f.name}"
            info = fs.get_file_info(dest)
            if info.type.name == "File" and info.size == f.size:
                continue            # published before (a resume, the same product twice)
            _upload(fs, p, dest)
    except OSError as e:
        raise ArtifactError(f"cannot publish {path} to {uri(fs, folder)}: {_first_line(e)}") from None
    return Published(uri(fs, folder), files[0].name, tuple(sums))


def _upload(fs, src: Path, dest: str) -> None:
    """One streamed upload for an object (it appears whole when it completes); a temp name and
    a rename on a local or shared disk, so a reader never sees half a file."""
    tmp = dest if fs.type_name in ("s3", "gcs") else f"{dest}.{os.getpid()}.tmp"
    with open(src, "rb") as f, fs.open_output_stream(tmp) as out:
        for block in iter(lambda: f.read(_BLOCK), b""):
            out.write(block)
    if tmp != dest:
        fs.move(tmp, dest)


def publish(artifacts: ModelArtifacts, run: str) -> dict[str, Published]:
    """Copy every model product of ``artifacts`` (and a user's weights file) into the run
    directory ``run`` once; returns model key (or ``WEIGHTS_KEY``) -> where it is. Products the
    backends failed to make have no file and are not published (their cells are skipped)."""
    out: dict[str, Published] = {}
    done: dict[str, Published] = {}          # one upload per file, however many keys share it
    wanted: list[tuple[str, str]] = list(artifacts.files.items())
    # a built-in model's weights come with its package on the node; a user's file travels
    if artifacts.weights and not (artifacts.torch_factory or "").startswith("builtin:"):
        wanted.append((WEIGHTS_KEY, artifacts.weights))
    for key, path in wanted:
        real = os.path.realpath(path)
        if real not in done:
            done[real] = _publish_one(path, run)
        out[key] = done[real]
    return out


def node_cache() -> Path:
    """Where this node keeps fetched artifacts: ``<dmx cache>/artifacts``."""
    return cache_dir() / ARTIFACTS_DIR


def fetch(pub: Published, cache: Path | None = None) -> str:
    """The local path of ``pub``'s main file in this node's cache, fetching and verifying each
    of its files unless a verified copy is there already. Raises ArtifactError."""
    folder = (cache or node_cache()) / pub.digest
    folder.mkdir(parents=True, exist_ok=True)
    fs, base = filesystem(pub.location)
    for f in pub.files:
        local = folder / f.name
        ok = folder / f".{f.name}.verified"
        if local.is_file() and ok.is_file() and local.stat().st_size == f.size:
            continue
        fd, tmp = tempfile.mkstemp(prefix=f".{f.name}.", suffix=".tmp", dir=folder)
        h = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as out, fs.open_input_stream(f"{base}/{f.name}") as src:
                while block := src.read(_BLOCK):
                    h.update(block)
                    out.write(block)
            if h.hexdigest() != f.sha256:
                raise ArtifactError(f"{pub.location}/{f.name}: its bytes do not match the digest "
                                    f"the driver published (sha256 {h.hexdigest()[:16]}..., "
                                    f"expected {f.sha256[:16]}...); the run directory was changed "
                                    "during the run")
            os.replace(tmp, local)
            ok.touch()
        except (OSError, StorageError) as e:
            raise ArtifactError(f"cannot fetch {pub.location}/{f.name} to this node: "
                                f"{_first_line(e)}") from None
        finally:
            Path(tmp).unlink(missing_ok=True)
    return str(folder / pub.main)


def materialise(artifacts: ModelArtifacts, published: Mapping[str, Published],
                keys: Iterable[str] | None = None, cache: Path | None = None) -> ModelArtifacts:
    """``artifacts`` with the products named by ``keys`` (default: all published) at local
    paths of this node's cache, fetched and verified; the others keep their entries. A worker
    calls it before building a session, for the key its setting runs."""
    wanted = set(published) if keys is None else set(keys) & set(published)
    files = dict(artifacts.files)
    weights = artifacts.weights
    for key in sorted(wanted):
        local = fetch(published[key], cache)
        if key == WEIGHTS_KEY:
            weights = local
        else:
            files[key] = local
    return dataclasses.replace(artifacts, files=files, weights=weights)


def manifest_record(published: Mapping[str, Published]) -> dict[str, dict]:
    """Model key -> location, main file and each file's digest and size, for manifest.json."""
    return {k: p.record() for k, p in sorted(published.items())}
