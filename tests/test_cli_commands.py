"""The ``dmx`` entry point only dispatches: each command module owns its arguments and handler,
imports nothing heavy before its handler runs, and writes output a shell pipeline can use."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dmx.cli import build_parser, main
from dmx.commands import COMMANDS

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run: 2 images x 2 decoders on the tiny model, in-process."""
    d = tmp_path_factory.mktemp("tiny-run")
    (d / "img").mkdir()
    for i in range(2):
        rgb = (np.random.default_rng(i).random((32, 40, 3)) * 255).astype(np.uint8)
        Image.fromarray(rgb).save(d / "img" / f"{i}.jpg", quality=90)
    spec = d / "spec.yaml"
    spec.write_text("name: csv\ndataset: {path: img}\nmodel: tiny\naxes: {decoder: [pil, opencv]}\n")
    assert main(["run", str(spec), "--out", str(d / "run"), "--executor", "local", "--quiet"]) == 0
    return d / "run"


def test_sql_csv_ends_lines_with_a_bare_newline_for_shell_pipelines(tiny_run: Path, capsys):
    capsys.readouterr()
    code = main(["sql", str(tiny_run), "SELECT decoder, count(*) AS n FROM rows GROUP BY 1 ORDER BY 1",
                 "--format", "csv"])
    out = capsys.readouterr().out
    assert code == 0
    assert out == "decoder,n\nopencv,2\npil,2\n"


def test_sql_csv_quotes_a_value_holding_the_separator(tiny_run: Path, capsys):
    capsys.readouterr()
    assert main(["sql", str(tiny_run), "SELECT 'a,b' AS x", "--format", "csv"]) == 0
    assert capsys.readouterr().out == 'x\n"a,b"\n'


def test_a_bad_spec_is_refused_before_torch_ray_or_duckdb_is_imported(tmp_path: Path):
    spec = tmp_path / "bad.yaml"
    spec.write_text("name: x\ndataset: {path: img}\nmodel: tiny\naxes: {decoder: [nope]}\n")
    probe = ("import sys\nfrom dmx.cli import main\ncode = main(['plan', sys.argv[1]])\n"
             "heavy = [m for m in ('torch', 'ray', 'duckdb', 'onnxruntime', 'openvino') if m in sys.modules]\n"
             "print(code, heavy)\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-c", probe, str(spec)], capture_output=True, text=True,
                         env=env, cwd=REPO, timeout=120)
    assert res.stdout.strip() == "2 []", res.stdout + res.stderr
    assert res.stderr.startswith("dmx: error: axes.decoder"), res.stderr


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.NAME)
def test_each_command_module_registers_exactly_its_own_subcommand(command):
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="command")
    command.add_parser(sub)
    assert list(sub.choices) == [command.NAME]
    assert callable(command.run)


def test_dmx_help_lists_every_command_module_once():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert list(sub.choices) == [c.NAME for c in COMMANDS]


def test_the_console_exit_joins_threads_runs_atexit_and_flushes_before_it_skips_teardown(tmp_path):
    """``exit_now``: what an exit must still do is done; only the interpreter's module teardown
    (~0.7 s with torch imported) is skipped."""
    script = f"""
import atexit, sys, threading, time
from pathlib import Path
out = Path({str(tmp_path)!r})
atexit.register(lambda: (out / "atexit").write_text("ran"))
def late():
    time.sleep(0.3)
    (out / "thread").write_text("joined")
threading.Thread(target=late).start()
from concurrent.futures import ThreadPoolExecutor
pool = ThreadPoolExecutor(2)
pool.submit(time.sleep, 0.01).result()      # an idle worker thread that only the exit hooks stop
sys.stdout.write("buffered, no newline")
from dmx.cli import exit_now
exit_now(3)
print("never")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.stderr
    assert done.stdout == "buffered, no newline"
    assert (tmp_path / "atexit").read_text() == "ran"
    assert (tmp_path / "thread").read_text() == "joined"


def test_python_m_dmx_exits_with_the_commands_code_and_its_one_line():
    done = subprocess.run([sys.executable, "-m", "dmx", "explain", "/nonexistent/run"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().startswith("dmx: error:") and len(done.stderr.strip().splitlines()) == 1


def test_the_work_line_counts_resizes_taken_over_apart_from_the_ones_done():
    """Resizes done + those taken over from equal decodes need not reach the spec's count (a
    file that decodes in no variant has neither): the line says "+K", not "the other K"."""
    from dmx.commands.run import _shared
    assert _shared(228) == " (+228 taken over from equal decodes)" and _shared(0) == ""
