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


def test_ray_processes_killed_mid_run_are_one_line_with_the_resume_command(
        photo_dir: Path, tmp_path: Path):
    """The embedded cluster's raylet and its workers are SIGKILLed once chunks are on disk: the
    driver ends with one line naming the resume command (exit 3), the chunks written stay, and
    the command printed finishes the run."""
    import signal
    import time

    import psutil
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(80):
        shutil.copy(photo_dir / "chelsea_420.jpg", imgs / f"c{i:02d}.jpg")
    spec = tmp_path / "s.yaml"
    spec.write_text("name: raylost\ndataset: {path: imgs}\nmodel: tiny\n"
                    "axes: {decoder: [pil, opencv], resize: [pil-bilinear, cv2-linear]}\n")
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "dmx", "run", str(spec), "--out", str(out), "--workers", "2",
           "--chunk-size", "1", "--quiet"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list(out.glob("rows/*/part-0.parquet")):
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.2)
        ray_procs = psutil.Process(proc.pid).children(recursive=True)
        assert any(p.name() == "raylet" for p in ray_procs), "no raylet under the driver"
        # the raylet and the workers it started (ray::...), at once: once the raylet is gone its
        # children are no longer the driver's, and no worker can be restarted
        for p in ray_procs:
            with contextlib.suppress(psutil.Error):
                if p.name() == "raylet" or p.cmdline()[0].startswith("ray::"):
                    p.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    if proc.returncode == 0:
        pytest.skip("the run finished before its Ray processes died")
    assert proc.returncode == 3, err
    lines = err.strip().splitlines()
    assert "Traceback" not in err, err
    # dmx's lines only (before giving up, it says each time a worker died and its chunk was
    # retried); Ray's C++ core logged "[date E pid] x.cc:N: ..." lines here before
    assert all(ln.startswith("dmx: ") for ln in lines), err
    assert lines[-1].startswith("dmx: error: "), err
    assert "Ray" in err and "Resume with: " in err
    kept = _rows(out)
    assert kept
    resume = err.split("Resume with: ")[-1].strip().split()
    r = subprocess.run([sys.executable, "-m", "dmx", *resume[1:], "--quiet"],
                       capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    after = _rows(out)
    assert set(kept) <= set(after) and len(after) == len(set(after)) == 4 * 80
