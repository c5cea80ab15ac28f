"""dmx's on-disk cache: converted models, compiled kernels, decoder environments.

A leaf module (no dmx imports), so backends, conversion and environments share it without cycles.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable


def cache_dir() -> Path:
    """dmx's cache: ``$DMX_CACHE`` or ``~/.cache/dmx``."""
    root = Path(os.environ.get("DMX_CACHE") or Path.home() / ".cache" / "dmx")
    root.mkdir(parents=True, exist_ok=True)
    return root


def torch_version() -> str:
    """torch's version as its installed distribution records it (``torch.__version__`` for a
    wheel), read without importing torch (~2 s); by the import when there is no record."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("torch")
    except PackageNotFoundError:
        import torch
        return torch.__version__


def file_digest(path: str) -> str:
    """SHA-256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cached(key: str, filename: str, make: Callable[[Path], dict[str, Any]]) -> tuple[str, dict]:
    """Return the cached product ``filename`` for ``key`` (under ``<cache>/models/<key>/``),
    making it atomically if absent: ``make(path)`` writes ``path`` (and any sidecar next to it)
    and returns notes. The notes gain ``seconds`` (how long making took), ``warnings`` (the
    library's, first lines) and ``cached`` (True when nothing was made this time)."""
    target_dir = cache_dir() / "models" / key
    target = target_dir / filename
    meta_path = target_dir / (filename + ".json")
    if target.exists() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        meta["cached"] = True
        return str(target), meta
    target_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target_dir))
    try:
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            meta = make(tmp / filename)
        meta["seconds"] = round(time.perf_counter() - t0, 2)
        meta["warnings"] = sorted({str(w.message).splitlines()[0][:200] for w in caught})[:20]
        for p in tmp.iterdir():  # the file and any sidecar (.bin for OpenVINO IR)
            if (target_dir / p.name).is_dir():
                shutil.rmtree(target_dir / p.name)
            os.replace(p, target_dir / p.name)
        meta_path.write_text(json.dumps(meta, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    meta["cached"] = False
    return str(target), meta
