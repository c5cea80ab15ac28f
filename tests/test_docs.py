"""The docs build without a broken link, their reference tables come from the code, and the
README is a front page whose commands and links are the real ones."""
from __future__ import annotations

import html
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``mkdocs build --strict`` of docs/ into a temp folder (warnings, broken links and anchors
    included, fail the build)."""
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed (it is in the test extra: pip install -e '.[test]')")
    out = tmp_path_factory.mktemp("site")
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q",
                          "-f", str(REPO / "mkdocs.yml"), "-d", str(out)],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "WARNING" not in res.stdout + res.stderr, res.stdout + res.stderr
    return out


def _text(page: Path) -> str:
    return html.unescape(re.sub(r"<[^>]+>", " ", page.read_text()))


def test_the_docs_build_strict_without_a_warning(site: Path):
    assert (site / "index.html").is_file()
    for page in ("spec-reference", "data-contract", "benchmarks", "design", "clusters"):
        assert (site / page / "index.html").is_file(), page


def test_spec_reference_lists_every_registered_axis_with_its_levels(site: Path):
    from dmx.matrix.axes import AXES
    text = _text(site / "spec-reference" / "index.html")
    assert "dmx:spec-axes" not in text and "dmx:spec-keys" not in text
    for axis in AXES.values():
        row = re.search(rf"\n\s*{re.escape(axis.name)}\s+{axis.stage}\s+(.*)", text)
        assert row, f"axis {axis.name} missing from the spec reference"
        for level in axis.levels:
            assert level in row.group(1), f"{axis.name}: level {level} missing"


def test_spec_reference_lists_every_key_of_the_json_schema(site: Path):
    from dmx.matrix.schema import spec_json_schema
    schema = spec_json_schema()
    text = _text(site / "spec-reference" / "index.html")
    keys = list(schema["properties"])
    for name, d in schema["$defs"].items():
        if name not in ("Axes", "Cell"):
            keys += list(d.get("properties", {}))
    missing = [k for k in keys if not re.search(rf"\b{re.escape(k)}\b", text)]
    assert not missing


def test_data_contract_lists_every_row_and_layer_column(site: Path):
    from dmx.results.layers import LAYER_COLUMNS
    from dmx.results.schema import ROW_COLUMNS
    text = _text(site / "data-contract" / "index.html")
    assert "dmx:row-columns" not in text
    for name, *_ in (*ROW_COLUMNS, *LAYER_COLUMNS):
        assert re.search(rf"\b{re.escape(name)}\b", text), name


def test_readme_test_command_is_the_one_ci_runs():
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci == "scripts/setup.sh test && .venv/bin/python -m pytest"
    assert ci in README


def test_readme_is_a_front_page_under_200_lines():
    assert len(README.splitlines()) < 200


def test_every_relative_link_in_the_readme_names_a_file_of_the_repo():
    links = [t for t in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README) if "://" not in t]
    assert links
    missing = [t for t in links if not (REPO / t).exists()]
    assert not missing
