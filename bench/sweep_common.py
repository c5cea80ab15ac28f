"""What ``bench/sweep.py``'s modes share: the spec and its model files, the dataset, the child
processes the modes run in (``python bench/sweep.py --some-child-flag``), and the measuring of
memory and CPU (a sampler over the process tree, peak RSS). Waiting for a quiet machine is
``bench/machine.py``'s."""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import threading
from pathlib import Path

SWEEP = Path(__file__).resolve().with_name("sweep.py")   # the entry point; children run it too


# ----------------------------------------------------------------------------- the spec
def make_spec(data_dir: Path, a: argparse.Namespace):
    import dmx.runner.backends  # noqa: F401 - registers the backends' axes and levels
    from dmx.matrix import parse_spec
    axes = {"decoder": a.decoders, "resize": a.resizes, "backend": a.backends,
            "precision": [a.precision]}
    ref = {"decoder": a.decoders[0], "resize": a.resizes[0], "backend": a.backends[0],
           "precision": a.precision}
    return parse_spec({"name": "bench-sweep", "dataset": {"path": str(data_dir)},
                       "model": a.model, "axes": axes, "reference": ref})


def prepare(spec):
    """Model files for every backend (cached conversion, untimed) and the cells."""
    from dmx.runner.convert import prepare_artifacts, resolve_model
    from dmx.runner.sweep import plan_cells
    cells, ref = plan_cells(spec)
    model = resolve_model(spec.model)
    settings = {(c.get("backend"), c.get("precision"), c["conversion"]) for c in cells}

    def no_calibration():
        raise SystemExit("this benchmark runs float precisions only (int8 needs calibration)")
    return cells, ref, model, prepare_artifacts(model, settings, no_calibration)


def photo_set(a: argparse.Namespace) -> list[str]:
    """The ``--images`` distinct real-photo JPEGs (built once under ``--data``)."""
    from photos import build_photo_set
    return build_photo_set(Path(a.data) / f"photos-{a.images}", a.images)


def setup(a: argparse.Namespace) -> tuple:
    """A child's whole setup: (paths, spec, cells, reference cell, model, artifacts)."""
    paths = photo_set(a)
    spec = make_spec(Path(paths[0]).parent, a)
    return (paths, spec, *prepare(spec))


def import_libraries() -> None:
    """Import every library a phase uses, so that no timing includes an import."""
    import cv2  # noqa: F401
    import onnxruntime  # noqa: F401
    import openvino  # noqa: F401
    import torch  # noqa: F401


# ----------------------------------------------------------------------------- child processes
def common_args(a: argparse.Namespace) -> list[str]:
    """The arguments that define the dataset and the spec, for child processes."""
    return ["--images", str(a.images), "--data", a.data, "--model", a.model,
            "--decoders", ",".join(a.decoders), "--resizes", ",".join(a.resizes),
            "--backends", ",".join(a.backends), "--precision", a.precision,
            "--batch", str(a.batch), "--workers", str(a.workers)]


def run_child(flags: list[str], a: argparse.Namespace) -> subprocess.CompletedProcess:
    """``python bench/sweep.py FLAGS`` with this run's dataset and spec, in a fresh process."""
    return subprocess.run([sys.executable, str(SWEEP), *flags, *common_args(a)],
                          capture_output=True, text=True)


def child_json(flags: list[str], a: argparse.Namespace, what: str) -> dict:
    """``run_child``'s last stdout line, parsed; exits with its stderr if it failed."""
    out = run_child(flags, a)
    if out.returncode != 0:
        raise SystemExit(f"{what} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- memory and CPU
class TreeMonitor:
    """Samples, every ``interval_s``, this process and all its descendants: the peak of their
    summed RSS, and their CPU seconds (last value seen per pid, so a process that exits loses
    at most one interval). With the machine's busy CPU seconds (/proc/stat) this also gives the
    CPU seconds used by *other* processes during a phase: load that skews the timings."""

    def __init__(self, interval_s: float = 0.1) -> None:
        import psutil
        self._psutil = psutil
        self.me = psutil.Process()
        self.interval_s = interval_s
        self.names: dict[int, str] = {}
        self.exclude: set[int] = set()   # roots of process trees left out (an idle Ray session)
        self._lock = threading.Lock()
        self.reset()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _busy_s(self) -> float:
        t = self._psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0)

    def sample(self) -> None:
        total, n = 0, 0
        procs = [self.me]
        try:
            procs += self.me.children(recursive=True)
        except self._psutil.Error:
            pass
        if self.exclude:
            skip = set(self.exclude)
            for pid in self.exclude:
                try:
                    skip.update(c.pid for c in self._psutil.Process(pid).children(recursive=True))
                except self._psutil.Error:
                    pass
            procs = [p for p in procs if p.pid not in skip]
        with self._lock:
            for p in procs:
                try:
                    with p.oneshot():
                        total += p.memory_info().rss
                        c = p.cpu_times()
                        self.names[p.pid] = _proc_name(p)  # Ray retitles workers as actors
                    self.cpu[p.pid] = c.user + c.system
                    n += 1
                except self._psutil.Error:
                    pass
            if total > self.peak:
                self.peak, self.peak_procs = total, n

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def children_now(self) -> set[int]:
        return {c.pid for c in self.me.children(recursive=False)}

    def reset(self, exclude: set[int] | None = None) -> None:
        """Start a phase: peak RSS and CPU accounting from now, without the ``exclude`` trees."""
        self.exclude = set(exclude or ())
        with getattr(self, "_lock", threading.Lock()):
            self.peak, self.peak_procs = 0, 0
            self.cpu: dict[int, float] = {}
            self.busy0 = self._busy_s()
        self.sample()
        with self._lock:
            self.cpu0 = dict(self.cpu)

    def phase(self) -> dict[str, float]:
        """Peak tree RSS (MB), our CPU seconds and other processes' CPU seconds since reset."""
        self.sample()
        with self._lock:
            ours = sum(v - self.cpu0.get(pid, 0.0) for pid, v in self.cpu.items())
            busy = self._busy_s() - self.busy0
            by_name: dict[str, float] = {}
            for pid, v in self.cpu.items():
                name = "this process" if pid == self.me.pid else self.names.get(pid, "?")
                by_name[name] = by_name.get(name, 0.0) + v - self.cpu0.get(pid, 0.0)
            return {"peak_rss_mb": mb(self.peak), "procs": self.peak_procs,
                    "cpu_s": round(ours, 1), "foreign_cpu_s": round(max(0.0, busy - ours), 1),
                    "cpu_by_process": by_name}

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _proc_name(p) -> str:
    """A short name: Ray's process titles (ray::_WorkerActor, raylet, gcs_server) or the exe."""
    try:
        cmd = p.cmdline()
    except Exception:  # noqa: BLE001  (psutil raises several kinds for vanished processes)
        cmd = []
    title = cmd[0].split()[0] if cmd else p.name()
    if title.startswith("ray::"):
        return "ray::_WorkerActor" if title.startswith("ray::_WorkerAct") else title
    if cmd and len(cmd) > 1 and cmd[0].endswith(("python", "python3")):
        return "python " + Path(cmd[2] if cmd[1] == "-u" and len(cmd) > 2 else cmd[1]).name
    return p.name()


def mb(n_bytes: float) -> float:
    return round(n_bytes / 2 ** 20, 1)


def maxrss_mb(who: int) -> float:
    return round(resource.getrusage(who).ru_maxrss / 1024, 1)  # Linux: KiB


def own_peak_rss_mb() -> float:
    """This process's peak RSS since its exec (VmHWM). Not getrusage: on Linux a child's
    ru_maxrss starts from its parent's RSS at fork time."""
    with open("/proc/self/status", encoding="ascii") as f:
        return vmhwm_mb(f.read())


def vmhwm_mb(status: str) -> float:
    """The peak RSS (VmHWM, MB) in the text of a ``/proc/PID/status``."""
    kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    return round(kb / 1024, 1)
