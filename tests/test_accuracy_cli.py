"""The accuracy gate and the demo's labels through the dmx command line."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from planted import write_run

ROOT = Path(__file__).resolve().parents[1]
AXES = ("decoder",)
N = 40
FLIPPED = range(0, 20)              # the reference is right on every image; opencv on 20 of 40


def _dmx(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dmx", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


@pytest.fixture()
def run(tmp_path: Path) -> Path:
    every = lambda i: {"label": 3, "correct_top1": True, "correct_top5": True}  # noqa: E731
    row = lambda f, i: {"correct_top1": i not in FLIPPED} if f["decoder"] == "opencv" else {}  # noqa: E731
    return write_run(tmp_path / "run", AXES, [{"decoder": "pil"}, {"decoder": "opencv"}], row, N,
                     every=every)


def test_check_max_accuracy_drop_fails_a_drop_beyond_the_limit_with_its_bound(run: Path):
    r = _dmx("check", str(run), "--max-accuracy-drop", "10")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "-50.00 pts [" in r.stdout and "a drop beyond 10.00 pts with 95% confidence" in r.stdout


def test_check_max_accuracy_drop_passes_a_limit_the_interval_cannot_exceed(run: Path):
    r = _dmx("check", str(run), "--max-accuracy-drop", "80")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ACCURACY decoder=opencv" in r.stdout


def test_a_negative_accuracy_limit_is_one_error_line(run: Path):
    r = _dmx("check", str(run), "--max-accuracy-drop", "-1")
    assert r.returncode == 2 and "max_accuracy_drop" in r.stderr and "Traceback" not in r.stderr


def test_the_demo_spec_reads_its_labels_from_beside_the_images(tmp_path: Path):
    from importlib.resources import files

    import dmx.runner.backends  # noqa: F401
    from dmx.commands.demo import _write_demo_labels
    from dmx.matrix import parse_spec
    from dmx.matrix.yamlsafe import load_yaml_bounded
    from dmx.runner.labels import check_spec_labels, read_spec_labels
    _write_demo_labels(tmp_path, files("dmx").joinpath("demo_labels.txt").read_bytes())
    _write_demo_labels(tmp_path, files("dmx").joinpath("demo_labels.txt").read_bytes())  # again
    raw = load_yaml_bounded(files("dmx").joinpath("demo.yaml").read_bytes(), "demo.yaml")
    spec = parse_spec(raw, base_dir=str(tmp_path))
    assert spec.dataset.labels.path == str(tmp_path / "demo_labels.txt")
    check_spec_labels(spec)
    got = dict(zip(*(read_spec_labels(spec)[k].to_pylist() for k in ("key", "label_index"))))
    assert got["grace_hopper_420.jpg"] == 652 and got["chelsea_444.jpg"] == 281
    assert len(got) == 8


def test_the_demo_never_replaces_a_users_file_of_that_name(tmp_path: Path):
    from dmx.commands.common import CliError
    from dmx.commands.demo import _write_demo_labels
    (tmp_path / "demo_labels.txt").write_text("mine\n")
    with pytest.raises(CliError, match="never replaces"):
        _write_demo_labels(tmp_path, b"demo\n")
    assert (tmp_path / "demo_labels.txt").read_text() == "mine\n"
