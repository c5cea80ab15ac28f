"""``bench/sweep.py --memory-scaling``: ``dmx run --executor local`` in a subprocess on N and 10N
tiny (64x64) JPEGs, both at the same chunk size; each child's own peak RSS (VmHWM) and their
ratio, then one JSON line."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from photos import build_tiny_set
from sweep_common import vmhwm_mb

# `python -m dmx ARGS` that copies its /proc/self/status, with its own peak RSS (VmHWM), to the
# file in argv[1] on exit; nothing is imported after dmx, which could raise that peak.
# (getrusage/wait4 would not do: on Linux a child's ru_maxrss starts at its parent's RSS.)
_DMX_WITH_VMHWM = """
import runpy, sys
out = sys.argv[1]
sys.argv = ["dmx", *sys.argv[2:]]
try:
    runpy.run_module("dmx", run_name="__main__", alter_sys=True)
finally:
    with open("/proc/self/status") as f:
        status = f.read()
    with open(out, "w") as f:
        f.write(status)
"""


def memory_scaling(a: argparse.Namespace) -> None:
    """dmx run --executor local in a child process on N and 10N tiny JPEGs; peak RSS of each.
    Both runs use the same chunk size: dmx's default grows with the dataset up to 64 images
    (at most 256 preprocessed inputs held, ~300 MB at 224 px), a bounded step this mode is not
    about; what must not grow is everything else."""
    import yaml
    print("memory scaling: dmx run --executor local in a subprocess, its own peak RSS (VmHWM)")
    results = {}
    for n in (a.memory_images, 10 * a.memory_images):
        data = build_tiny_set(Path(a.data) / f"tiny-{n}", n)
        with tempfile.TemporaryDirectory(prefix="dmx-bench-mem-") as tmp:
            spec = {"name": "bench-memory", "dataset": {"path": str(Path(data[0]).parent)},
                    "model": a.memory_model,
                    "axes": {"decoder": a.decoders, "resize": a.resizes, "backend": a.backends,
                             "precision": [a.precision]}}
            spec_path = Path(tmp) / "spec.yaml"
            spec_path.write_text(yaml.safe_dump(spec))
            args = ["run", str(spec_path), "--out", str(Path(tmp) / "run"), "--executor", "local",
                    "--quiet", "--chunk-size", str(a.memory_chunk_size)]
            hwm = Path(tmp) / "status"
            t = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", _DMX_WITH_VMHWM, str(hwm), *args],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            wall = time.perf_counter() - t
            if proc.returncode != 0:
                raise SystemExit(f"dmx run failed on {n} images:\n{proc.stderr}")
            results[n] = (vmhwm_mb(hwm.read_text()), wall)
            print(f"  {n:>7} images ({a.memory_model}, {len(a.decoders) * len(a.resizes) * len(a.backends)} "
                  f"cells, local executor, chunk size {a.memory_chunk_size}): peak RSS {results[n][0]:8.1f} MB, {wall:6.1f} s")
    small, big = results.values()
    print(json.dumps({"images": list(results), "peak_rss_mb": [small[0], big[0]],
                      "wall_s": [round(small[1], 2), round(big[1], 2)],
                      "ratio": round(big[0] / small[0], 3)}))
