"""dmx installs beside other packages (issue 24): its wheel puts one package, ``dmx``, at the top
level of site-packages - runner/, matrix/, results/ and analysis/ ship inside it as dmx.runner,
... (pyproject.toml's package-dir), since each of those four names is another package on PyPI.

Until scripts/rename_packages.py is applied, pyproject.toml has no package-dir mapping and these
tests skip, saying so."""
from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("runner", "matrix", "results", "analysis")
# The files a wheel must carry from the package folders: code and package data.
SHIPPED = {".py", ".sql", ".j2", ".css", ".txt", ".yaml"}
PYPROJECT = (REPO / "pyproject.toml").read_text(encoding="utf-8")

pytestmark = pytest.mark.skipif(
    not re.search(r'^package-dir\s*=.*"dmx\.runner"\s*=\s*"runner"', PYPROJECT, re.M),
    reason="pyproject.toml has no [tool.setuptools] package-dir mapping yet (dmx.runner = "
           "\"runner\", ...): run python3 scripts/rename_packages.py to apply the rename")


def _script():
    spec = importlib.util.spec_from_file_location("rename_packages",
                                                  REPO / "scripts" / "rename_packages.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _source_files() -> set[str]:
    """What the wheel must hold, by its path in the wheel (dmx/runner/worker.py)."""
    out = set()
    for folder, inside in [("dmx", "dmx")] + [(s, f"dmx/{s}") for s in SUBPACKAGES]:
        for p in (REPO / folder).rglob("*"):
            rel = p.relative_to(REPO / folder)
            if p.is_file() and p.suffix in SHIPPED and "__pycache__" not in rel.parts:
                out.add(f"{inside}/{rel.as_posix()}")
    return out


def test_the_tests_import_the_checkout_as_dmx_and_no_top_level_subpackage():
    import dmx.runner
    assert Path(dmx.runner.__file__).resolve() == REPO / "runner" / "__init__.py"
    stray = sorted(name for name, m in list(sys.modules.items())
                   if name.split(".")[0] in SUBPACKAGES
                   and REPO in Path(getattr(m, "__file__", None) or "/").resolve().parents)
    assert not stray, f"imported as top-level modules (write dmx.{stray[0]}): {stray[:5]}"


def test_the_rename_is_complete():
    """An import of a subpackage by its old top-level name, or a new subpackage folder missing
    from pyproject's packages list, is caught here: the rename script has nothing to change."""
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "rename_packages.py"), str(REPO),
                        "--check"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, ("run python3 scripts/rename_packages.py:\n" + r.stdout + r.stderr)


def test_pyproject_lists_every_package_folder():
    listed = re.search(r"^packages = \[(.*?)^\]", PYPROJECT, re.M | re.S)
    assert listed, "pyproject.toml's [tool.setuptools] has no packages list"
    names = re.findall(r'"([\w.]+)"', listed.group(1))
    assert names == _script().package_list(REPO), "run python3 scripts/rename_packages.py"


@pytest.mark.slow(reason="builds a wheel (pip wheel, a few seconds)")
def test_the_wheel_installs_only_dmx_at_the_top_level(tmp_path: Path):
    src = tmp_path / "src"       # a copy: building writes build/ and *.egg-info beside the code
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).is_file():
            shutil.copy(REPO / name, src / name)
    for folder in ("dmx", *SUBPACKAGES):
        shutil.copytree(REPO / folder, src / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "wheel")]
    isolated = importlib.util.find_spec("setuptools") is None
    if not isolated:
        cmd.append("--no-build-isolation")   # this environment's setuptools: no index needed
    try:
        r = subprocess.run([*cmd, str(src)], capture_output=True, text=True, timeout=600)
    except FileNotFoundError as e:
        pytest.skip(f"cannot run pip: {e}")
    if r.returncode != 0:
        text = r.stdout + r.stderr
        if "No module named pip" in text or (isolated and re.search(
                r"No matching distribution|Could not find a version|Network is unreachable|"
                r"Failed to establish a new connection|Temporary failure in name resolution", text)):
            pytest.skip("cannot build a wheel here (no pip, or no setuptools and no index): "
                        + text.strip().splitlines()[-1][:200])
        pytest.fail(f"pip wheel failed:\n{text[-3000:]}")
    (wheel,) = (tmp_path / "wheel").glob("dmx-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"dmx"}, sorted(top)
    missing = sorted(_source_files() - set(names))
    assert not missing, (f"{len(missing)} files of the checkout are not in the wheel "
                         f"(a package folder not in pyproject's packages list? run "
                         f"python3 scripts/rename_packages.py): {missing[:5]}")
    meta = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "dmx = dmx.cli:entry" in zipfile.ZipFile(wheel).read(meta).decode()
