"""Interrupted and crashing runs lose nothing and duplicate nothing."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import duckdb
import pytest

from dmx.matrix import parse_spec
from dmx.runner.sweep import RunOptions, run_spec
from conftest import stop_process_group

AXES = {"decoder": ["pil", "opencv"], "resize": ["pil-bilinear", "cv2-linear", "cv2-area"],
        "backend": ["torch", "onnxruntime"]}


@pytest.fixture(scope="module")
def many_photos(photo_dir: Path, tmp_path_factory) -> Path:
    """96 real JPEGs (copies of the photo fixtures under distinct names)."""
    d = tmp_path_factory.mktemp("many")
    good = sorted(photo_dir.glob("*.jpg"))
    for i in range(96):
        shutil.copy(good[i % len(good)], d / f"img{i:03d}.jpg")
    return d


def write_spec(tmp: Path, images: Path) -> Path:
    p = tmp / "spec.yaml"
    p.write_text(f"name: faults\ndataset: {{path: {images}}}\nmodel: tiny\n"
                 f"axes: {AXES}\n".replace("'", ""))
    return p


def pairs(run: Path) -> list[tuple]:
    return duckdb.connect().execute(
        f"SELECT cell_id, image_id, top1 FROM read_parquet('{run}/rows/*/part-0.parquet') "
        "ORDER BY ALL").fetchall()


def _sigint_as_usual() -> None:
    """In the child, before exec: SIGINT with its default action and not blocked. A shell that
    runs the tests in the background ignores it (Python then never raises KeyboardInterrupt),
    and a library thread of this test process may have blocked it in the mask a child inherits
    (the signal then stays pending and the run completes)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def test_ctrl_c_exits_130_says_how_to_resume_and_resume_completes(many_photos: Path, tmp_path: Path):
    spec = write_spec(tmp_path, many_photos)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "dmx", "run", str(spec), "--out", str(out), "--executor", "local",
           "--chunk-size", "1"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, preexec_fn=_sigint_as_usual)
    deadline = time.time() + 120
    while not list(out.glob("rows/chunk=*/part-0.parquet")) and time.time() < deadline:
        time.sleep(0.01)
    kids = _descendants(proc.pid)          # the compaction child, started with the run
    assert any(b"--when-told" in Path(f"/proc/{p}/cmdline").read_bytes() for p in kids)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    done_before = len(list(out.glob("rows/chunk=*/part-0.parquet")))
    assert 0 < done_before < 96
    assert not list(out.rglob("*.tmp"))                    # no half-written file left behind
    # the compaction child, started with the run, ended untold: nothing was compacted
    time.sleep(1)
    assert not list(out.glob("rows/chunk=compacted-*")) and _alive(kids) == []
    r = subprocess.run(cmd + ["--resume", "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    got = pairs(out)
    assert len(got) == len(set((c, i) for c, i, _ in got)) == 12 * 96


def test_a_ray_worker_killed_mid_chunk_is_restarted_and_no_row_is_lost(many_photos: Path,
                                                                      tmp_path: Path, ray_session):
    """SIGKILL a real Ray actor process while it works on a chunk."""
    killed: list[int] = []

    def killer() -> None:
        deadline = time.time() + 60
        while not killed and time.time() < deadline:
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    title = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                if title.startswith(b"ray::_WorkerActor.process"):
                    os.kill(int(pid), signal.SIGKILL)
                    killed.append(int(pid))
                    return
            time.sleep(0.005)

    t = threading.Thread(target=killer)
    t.start()
    spec = parse_spec({"name": "kill", "dataset": {"path": str(many_photos)}, "model": "tiny",
                       "axes": AXES})
    out = tmp_path / "run"
    s = run_spec(spec, RunOptions(out=str(out), executor="ray", workers=2, chunk_size=4,
                                  progress=False))
    t.join()
    assert killed, "no worker was caught mid-chunk"
    got = pairs(out)
    assert s.rows == len(got) == len(set((c, i) for c, i, _ in got)) == 12 * 96


PEAK_RSS_MB = ("def _peak_rss_mb():\n"
               "    # VmHWM: this process's own peak RSS. ru_maxrss is no good here: on Linux a child\n"
               "    # inherits it from the parent at fork/exec (pytest's peak), so it hides the child's.\n"
               "    for line in open('/proc/self/status'):\n"
               "        if line.startswith('VmHWM:'):\n"
               "            return int(line.split()[1]) / 1024\n")


def child_peak_rss_mb(code: str) -> float:
    """Run ``code`` in a fresh Python and return that process's own peak RSS in MB."""
    r = subprocess.run([sys.executable, "-c", PEAK_RSS_MB + code + "\nprint(_peak_rss_mb())\n"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return float(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux /proc needed")
def test_the_memory_probe_sees_the_childs_own_peak_not_the_parents():
    """The probe can fail: a child that allocates 300 MB reads 300 MB more than one that does
    not, even while this (parent) process holds a larger peak; the old probe (ru_maxrss of the
    child) read the parent's peak for both. Issue 12 item 6."""
    ballast = bytearray(700 * 1024 * 1024)        # the parent's peak, touched page by page
    ballast[::4096] = b"x" * len(ballast[::4096])
    try:
        idle = child_peak_rss_mb("pass")
        busy = child_peak_rss_mb("import numpy as np\nb = np.ones(300 * 2**20 // 8)")
        inherited = subprocess.run(
            [sys.executable, "-c", "import resource; print(resource.getrusage("
                                   "resource.RUSAGE_SELF).ru_maxrss / 1024)"],
            capture_output=True, text=True, check=True)
    finally:
        del ballast
    assert idle < 200, idle
    assert busy - idle > 250, (idle, busy)
    # what the old probe read: at least the parent's 700 MB for a child that allocated nothing
    assert float(inherited.stdout) > 600


def test_peak_memory_barely_grows_with_ten_times_more_images(photo_dir: Path, tmp_path: Path):
    """The driver streams chunks to disk: 10x the images must not mean 10x the memory."""
    def peak_rss_mb(n: int) -> float:
        d = tmp_path / f"imgs{n}"
        d.mkdir()
        src = sorted(photo_dir.glob("*.jpg"))
        for i in range(n):
            shutil.copy(src[i % len(src)], d / f"{i:04d}.jpg")
        return child_peak_rss_mb(
            "from dmx.matrix import parse_spec\nfrom dmx.runner.sweep import RunOptions, run_spec\n"
            f"s = parse_spec({{'name': 'm', 'dataset': {{'path': '{d}'}}, 'model': 'tiny', "
            f"'axes': {{'decoder': ['pil', 'opencv'], 'backend': ['torch']}}}})\n"
            f"run_spec(s, RunOptions(out='{tmp_path}/out{n}', executor='local', chunk_size=8, "
            "progress=False))")

    small, large = peak_rss_mb(40), peak_rss_mb(400)
    assert large < 1.2 * small, (small, large)


def test_run_attaches_to_an_existing_ray_cluster(photo_dir: Path, tmp_path: Path):
    """`ray start --head` on this machine, then `dmx run --address`, both with token auth
    configured the way Ray documents it (RAY_AUTH_MODE=token, the token in RAY_AUTH_TOKEN), in
    a HOME of its own. The head runs in its own process group so that stopping it leaves the
    test session's Ray."""
    import secrets
    ray_bin = Path(sys.executable).with_name("ray")
    ray_tmp = tempfile.mkdtemp(prefix="dmxray", dir="/tmp")  # Ray's socket paths must stay short
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")},
           "RAY_TMPDIR": ray_tmp, "HOME": str(tmp_path / "home"),
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    (tmp_path / "home").mkdir()
    port = "6399"
    head = subprocess.Popen([str(ray_bin), "start", "--head", "--block", "--port", port,
                             "--num-cpus", "2", "--include-dashboard=false",
                             "--disable-usage-stats"], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        spec = write_spec(tmp_path, photo_dir)
        out = tmp_path / "run"
        r = subprocess.run([sys.executable, "-m", "dmx", "run", str(spec), "--out", str(out),
                            "--address", f"127.0.0.1:{port}", "--quiet"],
                           capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        import json
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["ray"] == f"cluster 127.0.0.1:{port}"
        assert len(pairs(out)) == 12 * 7
    finally:
        stop_process_group(head)
        shutil.rmtree(ray_tmp, ignore_errors=True)


CRASHY = '''
import os
import torch


class Crashy(torch.nn.Module):
    """A user model whose custom code kills its process on an all-white input."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 10)

    def forward(self, x):
        if any(float(s.min()) > 2.0 for s in x):
            os._exit(3)
        return self.fc(x.mean(dim=(2, 3)))


def build():
    return Crashy()
'''


def test_an_image_that_kills_its_worker_every_time_becomes_error_rows_and_the_run_completes(
        photo_dir: Path, tmp_path: Path):
    images = tmp_path / "images"
    images.mkdir()
    for i, p in enumerate(sorted(photo_dir.glob("*.jpg")) * 2):
        shutil.copy(p, images / f"{i:02d}.jpg")
    from PIL import Image
    Image.new("RGB", (64, 48), (255, 255, 255)).save(images / "white.jpg")
    (tmp_path / "crashy.py").write_text(CRASHY)
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"name: q\ndataset: {{path: {images}}}\n"
                    "model: {torch: 'crashy:build', input: {size: 32}}\n"
                    "axes: {decoder: [pil, opencv], backend: [torch]}\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "dmx", "run", str(spec), "--out", str(tmp_path / "run"),
                        "--workers", "2", "--chunk-size", "3", "--quiet"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    got = duckdb.connect().execute(
        f"SELECT image_id, status, error_stage FROM read_parquet('{tmp_path}/run/rows/*/*.parquet')"
    ).fetchall()
    assert len(got) == 2 * 9
    assert {(i, s, e) for i, s, e in got if i == "white.jpg"} == {("white.jpg", "error", "worker-crash")}
    assert all(s == "ok" for i, s, _ in got if i != "white.jpg")


def _descendants(pid: int) -> dict[int, bytes]:
    """pid -> start time of every process below ``pid``."""
    kids: dict[int, list[tuple[int, bytes]]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                s = Path(f"/proc/{name}/stat").read_bytes()
            except OSError:
                continue
            f = s[s.rindex(b")") + 2:].split()
            kids.setdefault(int(f[1]), []).append((int(name), f[19]))
    out, todo = {}, [pid]
    while todo:
        for p, start in kids.get(todo.pop(), ()):
            out[p] = start
            todo.append(p)
    return out


def _alive(procs: dict[int, bytes]) -> list[str]:
    left = []
    for p, start in procs.items():
        try:
            s = Path(f"/proc/{p}/stat").read_bytes()
        except OSError:
            continue
        if s[s.rindex(b")") + 2:].split()[19] == start and b") Z" not in s:
            left.append(Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ")[:80].decode())
    return left


def test_driver_killed_with_sigkill_leaves_no_ray_process_behind_and_resume_completes(
        many_photos: Path, tmp_path: Path):
    spec = write_spec(tmp_path, many_photos)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "dmx", "run", str(spec), "--out", str(out), "--workers", "2",
           "--chunk-size", "2", "--quiet"]
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list(out.glob("rows/chunk=*/*.parquet")) and time.time() < deadline:
        time.sleep(0.05)
    ray_procs = _descendants(proc.pid)
    assert any(b"raylet" in Path(f"/proc/{p}/cmdline").read_bytes() for p in ray_procs
               if Path(f"/proc/{p}").exists())
    proc.kill()
    proc.wait()
    time.sleep(8)                                        # "a few seconds"
    assert _alive(ray_procs) == []
    r = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    got = pairs(out)
    assert len(got) == len(set((c, i) for c, i, _ in got)) == 12 * 96


def test_a_killed_raylet_ends_in_a_complete_run_or_one_line_with_the_resume_command(
        many_photos: Path, tmp_path: Path):
    """SIGKILL the embedded cluster's raylet mid-run: never a traceback or a hang."""
    spec = write_spec(tmp_path, many_photos)
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "dmx", "run", str(spec), "--out", str(out),
                             "--workers", "1", "--chunk-size", "1", "--quiet"],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not list(out.glob("rows/chunk=*/*.parquet")) and time.time() < deadline:
        time.sleep(0.05)
    raylets = [p for p in _descendants(proc.pid)
               if b"raylet/raylet" in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert raylets
    os.kill(raylets[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert "Traceback" not in err
    if proc.returncode == 0:                            # the actor finished without its raylet
        got = pairs(out)
        assert len(got) == len(set((c, i) for c, i, _ in got)) == 12 * 96
    else:
        errors = [ln for ln in err.splitlines() if ln.startswith("dmx: error")]
        assert len(errors) == 1 and "--resume" in errors[0], err[-2000:]
