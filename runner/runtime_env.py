"""The Ray runtime environment dmx's workers run in on a cluster.

A bare Ray node (``pip install ray`` and the libraries, nothing of dmx's) cannot unpickle a
plan or start a worker: ``runner``, ``matrix``, ``results`` are not importable there. On a
cluster, dmx therefore gives its actors a runtime environment (Ray's ``runtime_env``) that ships
dmx's own packages by ``py_modules`` - Ray zips them once (content-addressed) and each node
unpacks them under its session directory. ``--runtime-env`` changes it:

- ``auto`` (the default): dmx's packages on a cluster, nothing on the embedded Ray;
- ``none``: no runtime environment (every node has dmx installed, same version);
- a JSON object, or a ``.json``/``.yaml`` file holding one: Ray's ``runtime_env`` keys as given
  (``pip``, ``uv``, ``env_vars``, ``working_dir``, ``py_modules``, ``excludes``...), plus dmx's
  packages in ``py_modules`` unless a ``pip``/``uv`` requirement installs ``dmx`` itself.
  ``"pip": "pinned"`` (or ``"uv": "pinned"``) stands for dmx's requirements at the driver's
  installed versions (``pinned_requirements``).

Which dmx ran on each node is recorded as a digest of dmx's code (``code_digest``), so a node
whose packages differ from the driver's is named even when none of them has package metadata.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import re
from pathlib import Path
from typing import Any, Mapping

#: dmx's importable top-level package (what ``py_modules`` ships): one folder, its subpackages
#: (``SUBPACKAGES``) inside it.
DMX_PACKAGES = ("dmx",)
#: dmx's subpackages: inside dmx/ when installed, folders beside dmx/ in a checkout (pyproject's
#: package-dir maps them in).
SUBPACKAGES = ("runner", "matrix", "results", "analysis")
#: Never uploaded: byte code and editor leftovers.
EXCLUDES = ("__pycache__", "*.pyc", ".pytest_cache")
#: Packages a runtime_env must not reinstall: the cluster's Ray is the one that runs it.
NOT_PINNED = frozenset({"ray"})
_INSTALLERS = ("pip", "uv")
_KNOWN = {"py_modules", "working_dir", "pip", "uv", "conda", "env_vars", "excludes", "container",
          "image_uri", "config", "nsight", "java_jars", "py_executable", "worker_process_setup_hook"}


class RuntimeEnvError(ValueError):
    """``--runtime-env`` cannot be used; one line naming what is wrong."""


def _package_roots() -> dict[str, Path]:
    """Where dmx's code is in this process: {"dmx": folder, "dmx/runner": folder, ...} - the
    subpackages inside dmx's folder for an installed wheel, beside it in a checkout."""
    out = {}
    for name in (*DMX_PACKAGES, *(f"{DMX_PACKAGES[0]}.{s}" for s in SUBPACKAGES)):
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeEnvError(f"dmx's package {name!r} is not importable here; reinstall dmx")
        out[name.replace(".", "/")] = Path(list(spec.submodule_search_locations)[0]).resolve()
    return out


def _package_files(roots: Mapping[str, Path]) -> dict[tuple[str, ...], Path]:
    """Every file of dmx by its path in the package the nodes import (``("dmx", "runner",
    "worker.py")``), byte code and editor leftovers left out."""
    files: dict[tuple[str, ...], Path] = {}
    for prefix, root in roots.items():
        for p in root.rglob("*"):
            rel = p.relative_to(root).parts
            if p.is_file() and "__pycache__" not in rel and ".pytest_cache" not in rel \
                    and p.suffix != ".pyc":
                files.setdefault((*prefix.split("/"), *rel), p)
    return files


def package_dirs() -> list[str]:
    """The folder ``py_modules`` ships: dmx's own when its subpackages are inside it (an installed
    wheel); for a checkout, whose runner/, matrix/... are beside dmx/, a copy of the package as a
    wheel lays it out, made once per content under dmx's cache (``py_modules/<digest>/dmx``)."""
    roots = _package_roots()
    top = roots[DMX_PACKAGES[0]]
    if all(path == top / key.split("/")[-1] for key, path in roots.items() if "/" in key):
        return [str(top)]
    import os
    import shutil
    import tempfile
    import time
    from .cache import cache_dir
    files = _package_files(roots)
    h = hashlib.sha256()
    for key, p in sorted(files.items()):
        h.update("/".join(key).encode() + b"\0" + p.read_bytes() + b"\0")
    base = cache_dir() / "py_modules"
    target = base / h.hexdigest()[:20]
    if not (target / DMX_PACKAGES[0]).is_dir():
        base.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=base, prefix=".staging-"))
        for key, p in files.items():
            dest = tmp.joinpath(*key)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, dest)
        try:
            os.rename(tmp, target)
        except OSError:                  # another driver made it first: the same bytes
            shutil.rmtree(tmp, ignore_errors=True)
        week = time.time() - 7 * 86400   # copies of older code, unused for a week
        for old in base.iterdir():
            try:
                if old != target and old.stat().st_mtime < week:
                    shutil.rmtree(old, ignore_errors=True)
            except OSError:
                pass
    os.utime(target)
    return [str(target / DMX_PACKAGES[0])]


def code_digest(dirs: list[str] | None = None) -> str:
    """SHA-256 (20 hex) of dmx's code: every ``.py`` file of the package by its path in it
    (``dmx/runner/worker.py``), from a checkout, site-packages or ``dirs`` (folders of the package
    as shipped). Equal on two nodes exactly when they run the same dmx, however it got there."""
    roots = {Path(d).name: Path(d) for d in dirs} if dirs else _package_roots()
    h = hashlib.sha256()
    for key, p in sorted(_package_files(roots).items()):
        if key[-1].endswith(".py"):
            h.update(f"{'/'.join(key)}\0".encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:20]


def _base_name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;@]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def pinned_requirements() -> list[str]:
    """dmx's requirements at the versions installed here (``torch==2.13.0``...): its base
    dependencies, plus those of its extras that are installed here (openvino's nncf, decoders).
    Ray is left out: the cluster's own Ray runs the environment."""
    try:
        declared = importlib.metadata.requires("dmx") or []
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeEnvError("dmx has no package metadata here (not pip-installed): 'pinned' "
                              "needs it; list the requirements yourself") from None
    out: list[str] = []
    for req in declared:
        name = _base_name(req)
        if name in NOT_PINNED or name in {_base_name(r) for r in out}:
            continue
        is_extra = "extra ==" in req
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            if is_extra:
                continue                # an extra not installed here: nodes need it neither
            raise RuntimeEnvError(f"dmx requires {name}, which is not installed here: "
                                  "'pinned' cannot name its version") from None
        if is_extra and name in ("pytest", "hypothesis", "moto", "mkdocs", "pandas"):
            continue                    # test and bench tools: not what a worker runs
        out.append(f"{name}=={version}")
    return out


def parse(value: str) -> dict[str, Any] | None:
    """``--runtime-env``'s value: ``auto`` -> {} (dmx decides), ``none`` -> None, else a JSON
    object or a ``.json``/``.yaml``/``.yml`` file holding one. Raises RuntimeEnvError."""
    text = value.strip()
    if text.lower() == "auto":
        return {}
    if text.lower() == "none":
        return None
    if text.startswith("{"):
        try:
            env = json.loads(text)
        except json.JSONDecodeError as e:
            raise RuntimeEnvError(f"--runtime-env: not valid JSON ({e.msg} at column {e.colno})") from None
    else:
        path = Path(text)
        if not path.is_file():
            raise RuntimeEnvError(f"--runtime-env {text}: no such file (give auto, none, a JSON "
                                  "object or a .json/.yaml file)")
        raw = path.read_text(encoding="utf-8")
        try:
            if path.suffix.lower() in (".yaml", ".yml"):
                import yaml
                env = yaml.safe_load(raw)
            else:
                env = json.loads(raw)
        except Exception as e:  # noqa: BLE001 - json's or yaml's parse error: one line either way
            raise RuntimeEnvError(f"--runtime-env {text}: {str(e).splitlines()[0]}") from None
    return validate(env)


def validate(env: Any) -> dict[str, Any]:
    """Check the shape of the keys dmx reads; Ray checks the rest when the actors start."""
    if not isinstance(env, dict):
        raise RuntimeEnvError(f"--runtime-env must be a JSON/YAML object (a mapping), "
                              f"not {type(env).__name__}")
    unknown = sorted(set(env) - _KNOWN)
    if unknown:
        raise RuntimeEnvError(f"--runtime-env: unknown key {unknown[0]!r} (Ray's runtime_env keys: "
                              f"{', '.join(sorted(_KNOWN))})")
    for key in ("py_modules", "excludes"):
        v = env.get(key)
        if v is not None and not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
            raise RuntimeEnvError(f"--runtime-env: {key} must be a list of strings")
    for key in _INSTALLERS:
        v = env.get(key)
        if v is None or v == "pinned":
            continue
        packages = v.get("packages") if isinstance(v, dict) else v
        if not (isinstance(packages, list) and all(isinstance(x, str) for x in packages)):
            raise RuntimeEnvError(f"--runtime-env: {key} must be \"pinned\", a list of "
                                  f"requirements or {{\"packages\": [...]}}")
    if "pip" in env and "uv" in env:
        raise RuntimeEnvError("--runtime-env: give pip or uv, not both (Ray refuses both)")
    ev = env.get("env_vars")
    if ev is not None and not (isinstance(ev, dict) and all(isinstance(k, str) and isinstance(v, str)
                                                            for k, v in ev.items())):
        raise RuntimeEnvError("--runtime-env: env_vars must map names to strings")
    return env


def _installs_dmx(env: Mapping[str, Any]) -> bool:
    for key in _INSTALLERS:
        v = env.get(key)
        packages = v.get("packages", []) if isinstance(v, dict) else v if isinstance(v, list) else []
        if any(_base_name(p) == "dmx" for p in packages):
            return True
    return False


def resolve(option: dict[str, Any] | None, cluster: bool) -> dict[str, Any] | None:
    """The runtime_env the actors get: None for ``none`` and for ``auto`` on the embedded Ray
    (its workers share this machine's environment); otherwise the user's keys plus dmx's
    packages in ``py_modules`` (first, so they win over an older dmx on the node) - unless the
    environment pip/uv-installs dmx - and ``pinned`` expanded."""
    if option is None or (not option and not cluster):
        return None
    env = dict(option)
    for key in _INSTALLERS:
        if env.get(key) == "pinned":
            env[key] = pinned_requirements()
    if not _installs_dmx(env):
        mine = package_dirs()
        env["py_modules"] = mine + [m for m in env.get("py_modules", []) if m not in mine]
        env["excludes"] = list(dict.fromkeys([*env.get("excludes", []), *EXCLUDES]))
    return env


def describe(env: Mapping[str, Any] | None) -> str:
    """One line for the progress note and the manifest: what the workers were given."""
    if env is None:
        return "none (every node provides dmx itself)"
    parts = []
    if env.get("py_modules"):
        names = [Path(m).name for m in env["py_modules"]]
        parts.append("py_modules " + ", ".join(names))
    for key in _INSTALLERS:
        if env.get(key):
            v = env[key]
            n = len(v.get("packages", []) if isinstance(v, dict) else v)
            parts.append(f"{key} {n} requirement{'s' if n != 1 else ''}")
    other = sorted(set(env) - {"py_modules", "excludes", *_INSTALLERS})
    parts += other
    return "; ".join(parts) or "empty"


def mismatches(driver: Mapping[str, Any], nodes: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One line per node whose dmx code or package versions differ from the driver's (each a
    ``dmx.results.environment.fingerprint`` with ``dmx_code`` added), naming what differs."""
    out = []
    mine = driver.get("packages", {})
    for node, env in sorted(nodes.items()):
        diffs = []
        if env.get("dmx_code") and driver.get("dmx_code") and env["dmx_code"] != driver["dmx_code"]:
            diffs.append(f"dmx code {env['dmx_code'][:8]} (driver {driver['dmx_code'][:8]})")
        theirs = env.get("packages", {})
        for name in sorted(set(mine) | set(theirs)):
            if name == "dmx":
                continue            # shipped by py_modules, dmx has no metadata there: dmx_code says
            a, b = mine.get(name), theirs.get(name)
            if a != b:
                diffs.append(f"{name} {b or 'missing'} (driver {a or 'missing'})")
        if env.get("python") and driver.get("python") and env["python"] != driver["python"]:
            diffs.append(f"python {env['python']} (driver {driver['python']})")
        if diffs:
            out.append(f"node {node} differs from the driver: {', '.join(diffs)}")
    return out
