"""The slow-test list in conftest.py names files and tests that exist: a renamed test must not
fall silently into (or out of) the fast loop, `pytest -m "not slow"`."""
from __future__ import annotations

import ast
from pathlib import Path

import conftest

TESTS = Path(__file__).resolve().parent


def _test_functions() -> set[str]:
    names: set[str] = set()
    for f in TESTS.glob("test_*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                names.add(node.name)
    return names


def test_every_slow_file_exists():
    missing = [name for name in conftest.SLOW_FILES if not (TESTS / name).is_file()]
    assert not missing


def test_every_slow_test_name_is_a_test_function():
    missing = sorted(set(conftest.SLOW_TESTS) - _test_functions())
    assert not missing


def test_every_slow_fixture_is_defined_somewhere_in_the_tests():
    text = "".join(f.read_text() for f in TESTS.glob("*.py"))
    missing = [f for f in conftest.SLOW_FIXTURES if f"def {f}(" not in text]
    assert not missing

