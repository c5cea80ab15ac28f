"""Faults a user meets: an unsafe checkpoint, a full disk. One clear line, the resume command
where it applies, a non-zero exit, nothing written lost."""
from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import duckdb
import pytest

from dmx.cli import main

FACTORY = textwrap.dedent("""
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.fc = torch.nn.Linear(4, 5)

        def forward(self, x):
            return self.fc(self.conv(x).mean((2, 3)))

    def make():
        return Net()
""")


class _Evil:
    """A pickle that runs a command when loaded without weights_only."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def run_cli(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 2
    return code, err.getvalue()


def test_a_malicious_checkpoint_is_refused_as_unsafe_in_one_line(tmp_path, photo_dir, monkeypatch):
    import torch
    pkg = f"evilmodel_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{pkg}.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    marker = tmp_path / "pwned"
    torch.save({"state_dict": _Evil(marker)}, tmp_path / "evil.pt")
    spec = tmp_path / "s.yaml"
    spec.write_text(f"name: evil\ndataset: {{path: '{photo_dir}'}}\n"
                    f"model: {{torch: '{pkg}:make', weights: evil.pt, input: {{size: 32}}}}\n"
                    "axes: {backend: [torch]}\n")
    code, err = run_cli(["run", str(spec), "--out", str(tmp_path / "run"), "--executor", "local",
                         "--quiet"])
    assert code != 0 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert "refused as unsafe" in err and "evil.pt" in err
    assert "weights_only=False" not in err and "weights_only" not in err.replace("weights only", "")
    assert not marker.exists()


@pytest.fixture
def small_disk(tmp_path: Path):
    """A real 1.5 MB tmpfs (root only): writes beyond it fail with ENOSPC."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1536k", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _rows(run: Path) -> list[tuple]:
    return duckdb.connect().execute(
        f"SELECT cell_id, image_id, status FROM read_parquet('{run}/rows/*/part-0.parquet') "
        "ORDER BY ALL").fetchall()


def test_a_full_disk_is_one_line_with_the_resume_command_and_resume_completes(
        small_disk: Path, photo_dir: Path, tmp_path: Path):
    spec = tmp_path / "s.yaml"
    spec.write_text(f"name: full\ndataset: {{path: '{photo_dir}'}}\nmodel: tiny\n"
                    "axes: {decoder: [pil, opencv], resize: [pil-bilinear, cv2-linear, cv2-area]}\n")
    out = small_disk / "run"
    args = ["run", str(spec), "--out", str(out), "--executor", "local", "--chunk-size", "1",
            "--quiet"]
    # leave room for the manifest and a few chunks, not for all seven
    free = shutil.disk_usage(small_disk).free
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (free - 64 * 1024))
    code, err = run_cli(args)
    assert code == 3, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "no space left" in err and "--resume" in err and str(out) in err
    done_before = _rows(out)  # every part file on disk is whole and readable
    assert done_before and not list(out.rglob("*.tmp"))
    filler.unlink()
    resume = re.split(r"[Rr]esume with: ", err)[-1].strip().split()
    assert resume[:2] == ["dmx", "run"] and resume[-1] == "--resume"
    code, err = run_cli(resume[1:])
    assert code == 0, err
    after = _rows(out)
    assert set(done_before) <= set(after)  # nothing written was lost
    assert len(after) == len(set((c, i) for c, i, _ in after)) == 6 * 7
