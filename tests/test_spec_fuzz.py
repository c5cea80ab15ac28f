"""Fuzzing the spec reader: hundreds of mutated specs through the CLI's entry function.

Every mutation of a valid spec that makes it invalid (a wrong type, an unknown key or level, deep
nesting, odd YAML) must end in exit 2 with one line on stderr; a mutation of the YAML text that
may or may not stay valid must end in exit 0 or that same one line. An exception escaping
``main`` is the traceback a user would see.
"""
from __future__ import annotations

import contextlib
import copy
import io
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

VALID: dict[str, Any] = {
    "name": "fuzz",
    "dataset": {"path": ".", "limit": 10},
    "model": {"name": "tiny", "input": {"size": 32, "mode": "stretch"}},
    "axes": {"decoder": ["pil", "opencv"], "resize": ["pil-bilinear", "cv2-linear"],
             "backend": ["torch"], "threads": [1, 2]},
    "exclude": [{"decoder": "opencv", "resize": "pil-bilinear"}],
    "reference": {"decoder": "pil", "resize": "pil-bilinear"},
    "calibration": {"limit": 4},
    "check": {"min_cosine": 0.99},
}

# Values no typed spec field accepts in the place they are put (each mutation picks one that is
# wrong for the kind of value it replaces). Not null: null leaves an optional key unset, and not
# text for a mapping: ``model: name`` and ``dataset: path`` are the short forms.
_WRONG_FOR = {
    str: [1, 2.5, True, [], {}, ["a"], {"a": 1}],
    int: ["ten", -1, 0, 2.5, True, [], {}, 10**40, -(10**6)],
    float: ["x", True, [], {}, -1.0, float("nan")],
    list: [2.5, True, [[["deep"]]], [{"a": {"b": 1}}], {"name": "nope"}],
    dict: [3, [], True, [1, 2], 2.5],
}


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, prefix + (i,))
    return out


def _get(node: Any, path: tuple) -> Any:
    for p in path:
        node = node[p]
    return node


def _set(node: Any, path: tuple, value: Any) -> None:
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value


def _deep(depth: int) -> Any:
    v: Any = 1
    for i in range(depth):
        v = {"a": v} if i % 2 else [v]
    return v


def bad_spec(rng: random.Random) -> bytes:
    """A spec that is certainly invalid: one mutation of ``VALID``, as YAML bytes."""
    spec = copy.deepcopy(VALID)
    kind = rng.choice(["wrong_type", "unknown_key", "unknown_level", "deep", "drop_required",
                       "odd_yaml", "bad_override_like"])
    if kind == "wrong_type":
        path = rng.choice([p for p in _paths(spec)
                           if p[0] not in ("name",) and not (p[0] == "dataset" and p[-1] == "path")])
        old = _get(spec, path)
        bucket = _WRONG_FOR[next(t for t in (bool, int, float, str, list, dict)
                                 if isinstance(old, t) and t is not bool) if not isinstance(old, bool) else int]
        new = rng.choice([v for v in bucket if v != old or type(v) is not type(old)])
        if path[0] == "check" and isinstance(new, float) and new != new:
            new = "nan-is-text"
        if path[0] == "axes" and len(path) == 3 and isinstance(new, str):
            new = new + "-no-such-level"
        _set(spec, path, new)
    elif kind == "unknown_key":
        dicts = [p for p in _paths(spec) if isinstance(_get(spec, p), dict)] + [()]
        where = rng.choice(dicts)
        target = _get(spec, where) if where else spec
        target["".join(rng.choice("abcxyz_") for _ in range(rng.randint(1, 12))) + "_zz"] = 1
    elif kind == "unknown_level":
        axis = rng.choice(list(spec["axes"]))
        spec["axes"][axis] = spec["axes"][axis] + [rng.choice(["nope", "PIL", "cv2", "-1", "0",
                                                               "pil[", "libjpeg", "cuda:x", "1e9"])]
        if axis == "threads":
            spec["axes"][axis][-1] = rng.choice([0, -4, "four", 10**9, 2.5])
    elif kind == "deep":
        path = rng.choice(_paths(spec))
        _set(spec, path, _deep(rng.randint(70, 150)))
    elif kind == "drop_required":
        del spec[rng.choice(["dataset", "model", "axes"])]
    elif kind == "bad_override_like":
        spec["axes"] = {rng.choice(["decoder", "resize", "backend"]): []}
    text = yaml.safe_dump(spec, sort_keys=False)
    if kind == "odd_yaml":
        trick = rng.choice([
            "2021-03-04: x\n", "check: &c {a: *c}\n", "name: fuzz\n", "model: {name: tiny}\n",
            "axes: " + "[" * 2000 + "]" * 2000 + "\n", "calibration: {limit: " + "7" * 400 + "}\n",
            "? [a, b]\n: c\n", "1: one\n", "null: x\n", "check: !!binary aGVsbG8=\n",
            "check: !!set {a, b}\n", "reference: !!omap [{decoder: pil}]\n",
            "dataset: {path: !!timestamp 2020-01-01}\n", "\tname: tab\n", "model: [\n",
        ])
        return (text + trick).encode()
    return text.encode()


def text_mutation(rng: random.Random) -> bytes:
    """A valid spec's YAML text with bytes inserted, deleted or replaced: valid or not."""
    data = bytearray(yaml.safe_dump(VALID, sort_keys=False).encode())
    for _ in range(rng.randint(1, 6)):
        op, i = rng.choice(["ins", "del", "rep"]), rng.randrange(len(data))
        piece = bytes(rng.choice([b":", b"-", b"[", b"{", b"&a", b"*a", b"\t", b"\n  ", b"'",
                                  b"\xff", b"\x00", b"!!int", b"9" * 50, b"\xc3"]))
        if op == "ins":
            data[i:i] = piece
        elif op == "del":
            del data[i:i + rng.randint(1, 8)]
        else:
            data[i:i + len(piece)] = piece
    return bytes(data)


def run_main(data: bytes, folder: Path) -> tuple[int, str]:
    """``dmx plan`` on ``data`` in-process: (exit code, stderr). An escaping exception fails."""
    from dmx.cli import main
    p = folder / "spec.yaml"
    p.write_bytes(data)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(["plan", str(p)])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 2
    return code, err.getvalue()


_FOLDER = Path(tempfile.mkdtemp(prefix="dmx-fuzz-"))
_FUZZ = settings(max_examples=300, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow])


@_FUZZ
@given(st.randoms(use_true_random=False))
def test_every_mutated_spec_is_exit_2_and_one_line(rng):
    data = bad_spec(rng)
    code, err = run_main(data, _FOLDER)
    assert code == 2, (data[:300], err)
    assert len(err.strip().splitlines()) == 1 and err.startswith("dmx: error: "), err
    assert "Traceback" not in err


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.randoms(use_true_random=False))
def test_mangled_yaml_text_is_accepted_or_one_line(rng):
    data = text_mutation(rng)
    code, err = run_main(data, _FOLDER)
    assert code in (0, 2), (data[:300], err)
    if code == 2:
        assert len(err.strip().splitlines()) == 1 and err.startswith("dmx: error: "), err


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_mutated_specs_through_a_real_process_are_one_line(seed, tmp_path):
    p = tmp_path / "spec.yaml"
    p.write_bytes(bad_spec(random.Random(seed)))
    r = subprocess.run([sys.executable, "-m", "dmx", "plan", str(p)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
