"""Isolated virtual environments for decoder package versions (``pil[pillow==9.4.0]``).

One venv per (normalised requirement set, driver Python), built once with uv (``uv venv`` +
``uv pip install``, wheels only) under ``cache_dir()/envs/<key>``. A build happens in a staging
folder under a per-key lock file and is renamed into place, so a concurrent second builder waits
and then reuses the finished env, and a killed build never leaves a half env at ``<key>``.

Each env holds ``env.json``: the requirements, the exact installed versions (``uv pip freeze``),
the Python, the build time and what a probe run *inside* the env reports about each decoder
library it holds (version, the libjpeg build it links), e.g.
``{"pillow": {"version": "9.4.0", "libjpeg": "libjpeg-turbo 2.1.4", ...}}``.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from .cache import cache_dir

ENV_JSON = "env.json"
_LAST_USED = ".last_used"
_INSTALL_TIMEOUT_S = 900.0
_PROBE_TIMEOUT_S = 120.0
_LOCK_TIMEOUT_S = 1800.0
_TAIL_LINES = 12
_OPENCV_PACKAGES = ("opencv-python", "opencv-python-headless", "opencv-contrib-python",
                    "opencv-contrib-python-headless")

_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
_OP = r"(?:===|==|!=|~=|<=|>=|<|>)"
_SPEC = rf"{_OP}\s*[A-Za-z0-9._*+!-]+"
_REQUIREMENT = re.compile(
    rf"\s*(?P<name>{_NAME})\s*(?:\[(?P<extras>\s*{_NAME}(?:\s*,\s*{_NAME})*\s*)\])?"
    rf"\s*(?P<specs>{_SPEC}(?:\s*,\s*{_SPEC})*)?\s*,?")


class EnvBuildError(RuntimeError):
    """An environment could not be built: which requirement(s), and the last lines uv printed."""

    def __init__(self, requirement: str, output: str) -> None:
        self.requirement = requirement
        self.output = output
        super().__init__(f"cannot build a Python environment for {requirement}: {output}")


@dataclass(frozen=True)
class EnvInfo:
    """A built environment, as its ``env.json`` describes it."""

    path: Path
    key: str
    requirements: tuple[str, ...]
    versions: Mapping[str, str]                       # exact installed versions, by package
    python: str                                       # e.g. cpython-3.11.7
    built_at: str                                     # ISO 8601, UTC
    build_s: float                                    # seconds the build took
    libraries: Mapping[str, Mapping[str, str | None]]  # probe: {"pillow": {"version", "libjpeg"}}
    built: bool = field(default=False, compare=False)  # True when this call built it

    @property
    def python_bin(self) -> Path:
        return self.path / "bin" / "python"

    @property
    def last_used(self) -> float:
        """When an ``ensure_env`` last returned this env (Unix seconds)."""
        for name in (_LAST_USED, ENV_JSON):
            try:
                return (self.path / name).stat().st_mtime
            except OSError:
                continue
        return 0.0

    def size_mb(self) -> float:
        """Disk use in MB (10^6 bytes), files only."""
        total = 0
        for root, _, files in os.walk(self.path):
            for f in files:
                try:
                    total += os.lstat(os.path.join(root, f)).st_size
                except OSError:
                    continue
        return total / 1e6

    def libjpeg_summary(self) -> str:
        """``pillow: libjpeg-turbo 2.1.4; opencv: ...`` - the libjpeg each library links."""
        return "; ".join(f"{lib}: {v.get('libjpeg')}" for lib, v in self.libraries.items())


# -- requirements -------------------------------------------------------------------------------

def canonical_name(name: str) -> str:
    """PEP 503 name: ``Opencv_Python.Headless`` -> ``opencv-python-headless``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    """The canonical package name of one normalised requirement."""
    m = re.match(_NAME, requirement)
    return canonical_name(m.group(0)) if m else requirement


def normalise_requirements(requirements: str | Iterable[str]) -> list[str]:
    """Requirement strings in a canonical, sorted form, one per package.

    Accepts ``"opencv-python-headless==4.8.1.78 numpy<2"``, comma or space separated items, and
    specifier lists such as ``numpy>=1.20,<2``. Only ``name[extras] specifiers`` from the package
    index: no URLs, paths, markers or pip options (a spec is data). Raises ValueError."""
    text = requirements if isinstance(requirements, str) else " ".join(requirements)
    by_name: dict[str, tuple[set[str], set[str]]] = {}
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _REQUIREMENT.match(text, pos)
        separated = m is not None and (m.end() == len(text) or text[m.end() - 1] in " \t\n,")
        if m is None or m.end() == pos or not separated:
            bad = text[pos:].split()[0] if text[pos:].split() else text[pos:]
            raise ValueError(f"{bad!r} is not a requirement like pillow==9.4.0 or numpy<2 "
                             "(package index names and versions only: no URLs, paths, markers "
                             "or options)")
        pos = m.end()
        name = canonical_name(m.group("name"))
        extras, specs = by_name.setdefault(name, (set(), set()))
        if m.group("extras"):
            extras.update(canonical_name(e.strip()) for e in m.group("extras").split(","))
        if m.group("specs"):
            specs.update(re.sub(r"\s+", "", s) for s in m.group("specs").split(","))
    if not by_name:
        raise ValueError("no requirement given")
    out = []
    for name in sorted(by_name):
        extras, specs = by_name[name]
        out.append(name + (f"[{','.join(sorted(extras))}]" if extras else "")
                   + ",".join(sorted(specs)))
    return out


def python_tag() -> str:
    """The driver's interpreter, which every env is built for: ``cpython-3.11.7-x86_64``."""
    return f"{sys.implementation.name}-{platform.python_version()}-{platform.machine()}"


def env_key(requirements: Iterable[str]) -> str:
    """Cache key: hash of the normalised requirement set and the driver's Python."""
    blob = json.dumps({"requirements": normalise_requirements(list(requirements)),
                       "python": python_tag()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def envs_dir() -> Path:
    return cache_dir() / "envs"


# -- building -------------------------------------------------------------------------------------

def ensure_env(requirements: list[str]) -> EnvInfo:
    """The environment for ``requirements``, built on first use (seconds with uv) and reused
    after that (a cache hit reads env.json: milliseconds). Safe to call from several processes
    at once: one builds, the others wait for it. Raises EnvBuildError, also for a requirement
    that is not an index name and version."""
    try:
        reqs = normalise_requirements(requirements)
    except ValueError as e:
        raise EnvBuildError(" ".join(requirements), str(e)) from None
    key = env_key(reqs)
    final = envs_dir() / key
    info = _read_env(final)
    if info is not None:
        _touch(final)
        return info
    with _locked(key, " ".join(reqs)):
        info = _read_env(final)           # another process may have built it while we waited
        if info is None:
            if final.exists():            # a broken env (no readable env.json): rebuild it
                _remove_tree(final)
            info = _build(reqs, key, final)
    _touch(final)
    return info


def list_envs() -> list[EnvInfo]:
    """Every built environment in the cache, most recently used first."""
    root = envs_dir()
    if not root.is_dir():
        return []
    found = [info for p in root.iterdir() if not p.name.startswith(".")
             if (info := _read_env(p)) is not None]
    return sorted(found, key=lambda e: e.last_used, reverse=True)


def prune_envs(keep: set[str] | None = None) -> list[Path]:
    """Remove every cached environment whose key is not in ``keep`` (None: remove all), plus
    leftovers of killed builds. Environments being built right now are left alone. Returns the
    paths removed. A decoder process already running from a removed env keeps working; a new
    one fails to start (DecoderUnavailable)."""
    root = envs_dir()
    if not root.is_dir():
        return []
    removed: list[Path] = []
    keys = {p.name.split("-")[1] if p.name.startswith(".tmp-") else p.name
            for p in root.iterdir() if p.name not in (".locks", ".trash")}
    for key in sorted(keys):
        if keep is not None and key in keep:
            continue
        lock = _try_lock(key)
        if lock is None:
            continue                      # being built: not ours to remove
        try:
            for p in [root / key, *root.glob(f".tmp-{key}-*")]:
                if p.exists():
                    _remove_tree(p)
                    removed.append(p)
        finally:
            os.close(lock)
    shutil.rmtree(root / ".trash", ignore_errors=True)   # what an interrupted removal left
    return removed


def _build(reqs: list[str], key: str, final: Path) -> EnvInfo:
    """Build into a staging folder next to ``final``, probe, write env.json, rename."""
    uv = _find_uv(reqs)
    t0 = time.perf_counter()
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=final.parent))
    env = staging / "env"
    try:
        _run([uv, "venv", "--quiet", "--relocatable", "--python", sys.executable, str(env)],
             " ".join(reqs), reqs)
        python = env / "bin" / "python"
        _run([uv, "pip", "install", "--python", str(python), "--only-binary", ":all:", *reqs],
             " ".join(reqs), reqs)
        freeze = _run([uv, "pip", "freeze", "--python", str(python)], " ".join(reqs), reqs)
        versions = dict(sorted(_parse_freeze(freeze).items()))
        libraries = _probe(python, versions, reqs)
        record = {"key": key, "requirements": reqs, "versions": versions,
                  "python": python_tag(),
                  "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "build_s": round(time.perf_counter() - t0, 2), "libraries": libraries,
                  "uv": _run([uv, "--version"], " ".join(reqs), reqs).strip()}
        (env / ENV_JSON).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        os.rename(env, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    info = _read_env(final)
    if info is None:
        raise EnvBuildError(" ".join(reqs), f"{final / ENV_JSON} is unreadable after the build")
    return _with_built(info)


def _with_built(info: EnvInfo) -> EnvInfo:
    return replace(info, built=True)


def _find_uv(reqs: list[str]) -> str:
    """uv from the ``uv`` Python package (dmx[decoders]), else from PATH."""
    try:
        from uv import find_uv_bin
        return str(find_uv_bin())
    except (ImportError, FileNotFoundError):
        found = shutil.which("uv")
        if found:
            return found
    raise EnvBuildError(" ".join(reqs), "uv is not installed; pip install uv "
                                        "(or dmx[decoders]) to test decoder package versions")


def _run(cmd: list[str], what: str, reqs: list[str]) -> str:
    """Run uv; its stdout on success, EnvBuildError with its last lines otherwise."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "CONDA_PREFIX")}
    env.update(UV_PYTHON_DOWNLOADS="never", UV_NO_PROGRESS="1", NO_COLOR="1")
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=env, timeout=_INSTALL_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise EnvBuildError(what, f"uv did not finish within {_INSTALL_TIMEOUT_S:g} s") from None
    except OSError as e:
        raise EnvBuildError(what, f"cannot run uv: {e}") from None
    if p.returncode != 0:
        tail = _tail(p.stderr + p.stdout)
        raise EnvBuildError(_culprit(reqs, tail) or what, tail)
    return p.stdout


def _tail(text: str, lines: int = _TAIL_LINES) -> str:
    kept = [ln.rstrip() for ln in text.strip().splitlines()
            if ln.strip() and not ln.startswith("Using Python")]   # uv's preamble, our temp path
    return "\n".join(kept[-lines:]) or "(no output)"


def _culprit(reqs: list[str], output: str) -> str | None:
    """The requirement uv's error names, when it names exactly one of ours."""
    low = output.lower()
    named = [r for r in reqs if re.search(rf"\b{re.escape(requirement_name(r))}\b", low)]
    return named[0] if len(named) == 1 else None


def _parse_freeze(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        name, sep, version = line.strip().partition("==")
        if sep:
            out[canonical_name(name)] = version.strip()
    return out


# The probe runs inside the env (``python -I``): only the env's own libraries and the stdlib.
# It encodes and decodes a tiny JPEG with each decoder library, so a library that imports but
# cannot work (OpenCV 4.8 beside numpy 2) fails the build, not the sweep.
_PROBE = r'''
import io, json, re, sys
libs = sys.argv[1:]
out = {}
if "pillow" in libs:
    import PIL
    from PIL import Image, features
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 100, 50)).save(buf, "JPEG")
    Image.open(io.BytesIO(buf.getvalue())).convert("RGB").load()
    def feature(name, how):
        try:
            return getattr(features, how)(name)
        except (ValueError, AttributeError):
            return None
    turbo = feature("libjpeg_turbo", "check_feature")
    turbo_version = feature("libjpeg_turbo", "version")
    api = feature("jpg", "version")
    out["pillow"] = {"version": PIL.__version__,
                     "libjpeg": f"libjpeg-turbo {turbo_version}" if turbo and turbo_version
                                else (f"libjpeg {api}" if api else None),
                     "jpeg_api": api, "libjpeg_turbo": str(bool(turbo))}
if "opencv" in libs:
    import cv2
    import numpy as np
    ok, enc = cv2.imencode(".jpg", np.full((16, 16, 3), 128, np.uint8))
    img = cv2.imdecode(enc, cv2.IMREAD_COLOR)
    assert ok and img is not None and img.shape == (16, 16, 3), "OpenCV JPEG round trip failed"
    m = re.search(r"^\s*JPEG:\s*(.+)$", cv2.getBuildInformation(), re.M)
    out["opencv"] = {"version": cv2.__version__, "libjpeg": m.group(1).strip() if m else None}
json.dump(out, sys.stdout)
'''


def _probe(python: Path, versions: Mapping[str, str], reqs: list[str]) -> dict[str, Any]:
    """Versions and libjpeg builds of the decoder libraries installed in the env."""
    libs = (["pillow"] if "pillow" in versions else []) + \
           (["opencv"] if any(p in versions for p in _OPENCV_PACKAGES) else [])
    what = " ".join(reqs)
    try:
        p = subprocess.run([str(python), "-I", "-c", _PROBE, *libs], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, timeout=_PROBE_TIMEOUT_S,
                           check=False)
    except subprocess.TimeoutExpired:
        raise EnvBuildError(what, f"the probe did not finish within {_PROBE_TIMEOUT_S:g} s"
                            ) from None
    if p.returncode != 0:
        tail = _tail("\n".join(ln for ln in p.stderr.splitlines()
                                if not ln.startswith((" ", "Traceback"))), 2)  # not the frames
        hint = ""
        if "numpy" in tail and "opencv" in libs and not versions.get("numpy", "2").startswith("1."):
            hint = (f"\nthis OpenCV was built against numpy 1.x but numpy {versions.get('numpy')} "
                    "was installed: add numpy<2 to the level, e.g. {name: opencv, package: "
                    "\"opencv-python-headless==4.8.1.78 numpy<2\"}")
        raise EnvBuildError(what, f"installed, but {', '.join(libs)} does not work there:\n"
                                  f"{tail}{hint}")
    try:
        return dict(json.loads(p.stdout))
    except json.JSONDecodeError:
        raise EnvBuildError(what, f"the probe printed no JSON: {p.stdout[-200:]!r}") from None


# -- reading, locking ----------------------------------------------------------------------------

def _read_env(path: Path) -> EnvInfo | None:
    """The env at ``path`` when it is complete (env.json readable, python present), else None."""
    try:
        d = json.loads((path / ENV_JSON).read_text(encoding="utf-8"))
        info = EnvInfo(path=path, key=str(d["key"]), requirements=tuple(d["requirements"]),
                       versions=dict(d["versions"]), python=str(d["python"]),
                       built_at=str(d["built_at"]), build_s=float(d["build_s"]),
                       libraries=dict(d["libraries"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return info if (path / "bin" / "python").exists() else None


def _touch(path: Path) -> None:
    try:
        (path / _LAST_USED).touch()
    except OSError:
        pass  # a read-only cache still works; only "last used" goes stale


def _lock_path(key: str) -> Path:
    d = envs_dir() / ".locks"
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{key}.lock"


def _try_lock(key: str) -> int | None:
    fd = os.open(_lock_path(key), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


class _locked:
    """Exclusive per-key build lock (flock), waited for up to 30 minutes."""

    def __init__(self, key: str, what: str) -> None:
        self.key, self.what = key, what
        self.fd: int | None = None

    def __enter__(self) -> "_locked":
        deadline = time.monotonic() + _LOCK_TIMEOUT_S
        while (fd := _try_lock(self.key)) is None:
            if time.monotonic() > deadline:
                raise EnvBuildError(self.what, f"another process has held the build lock "
                                               f"{_lock_path(self.key)} for {_LOCK_TIMEOUT_S:g} s")
            time.sleep(0.2)
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)


def _remove_tree(path: Path) -> None:
    """Move aside (atomic: the env vanishes at once), then delete."""
    trash = envs_dir() / ".trash"
    trash.mkdir(parents=True, exist_ok=True)
    target = Path(tempfile.mkdtemp(prefix=path.name + "-", dir=trash))
    os.rename(path, target / "x")
    shutil.rmtree(target, ignore_errors=True)


def iter_env_rows() -> Iterator[dict[str, Any]]:
    """One JSON-ready dict per cached env, most recently used first (``dmx envs list``):
    path, key, requirements, installed versions, libjpeg per library, size (MB), built at,
    build time (s), last used (ISO 8601, UTC)."""
    for e in list_envs():
        yield {"path": str(e.path), "key": e.key, "requirements": list(e.requirements),
               "versions": dict(e.versions), "libjpeg": e.libjpeg_summary(),
               "size_mb": round(e.size_mb(), 1), "built_at": e.built_at, "build_s": e.build_s,
               "last_used": datetime.fromtimestamp(e.last_used, timezone.utc)
               .isoformat(timespec="seconds")}
