"""``bench/sweep.py``'s (d): the floor. The unit costs of the irreducible operations (decode,
preprocess, inference), measured in-process with 1 thread and freed memory kept
(``floor_costs``), times their counts; and the same inference costs in a fresh process, with
glibc's default allocator and with freed memory kept (``sweep.py --unit-cost BACKEND
[--tuned-malloc]``, ``unit_cost_child``)."""
from __future__ import annotations

import argparse
import hashlib
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from sweep_common import SWEEP, child_json, common_args, setup

from dmx.runner.memory import keep_freed_memory


def median_ms(fn, items) -> float:
    ts = []
    for it in items:
        t = time.perf_counter()
        fn(it)
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


def floor_costs(paths: list[str], cells, model, artifacts, a: argparse.Namespace) -> dict:
    """Unit costs (ms, median, 1 thread) and the irreducible operation counts. Measured with
    freed memory kept (``keep_freed_memory``): the page faults glibc's default costs are not
    part of any operation (``fresh_infer_ms`` measures them separately)."""
    keep_freed_memory()
    import torch

    from dmx.runner.backends import BACKENDS, InferSetting
    from dmx.runner.decoders import DecodeOptions, get_decoder
    from dmx.runner.preprocess import model_input_pixels, normalise
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    import cv2
    cv2_threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        decoders = list(dict.fromkeys(c.get("decoder") for c in cells))
        resizes = list(dict.fromkeys(c.get("resize") for c in cells))
        backends = list(dict.fromkeys(c.get("backend") for c in cells))
        opts = DecodeOptions()
        dec = {d: get_decoder(d) for d in decoders}
        dec_ts: dict[str, list[float]] = {d: [] for d in decoders}
        pre_ts: dict[str, list[float]] = {r: [] for r in resizes}
        tensors: dict[str, list[np.ndarray]] = {r: [] for r in resizes}   # inference sample
        digests: list[set[bytes]] = [set() for _ in paths]
        for i, path in enumerate(paths):  # one image at a time: memory stays flat
            data = Path(path).read_bytes()
            for d in decoders:
                t = time.perf_counter()
                img = dec[d].decode(data, opts)
                dec_ts[d].append((time.perf_counter() - t) * 1e3)
                for r in resizes:
                    t = time.perf_counter()
                    x = normalise(model_input_pixels(img, r, model.preprocess), model.preprocess)
                    pre_ts[r].append((time.perf_counter() - t) * 1e3)
                    digests[i].add(hashlib.blake2b(x.tobytes(), digest_size=16).digest())
                    if d == decoders[0] and i < a.floor_sample:
                        tensors[r].append(x)
        decode_ms = {d: statistics.median(v) for d, v in dec_ts.items()}
        pre_ms = {r: statistics.median(v) for r, v in pre_ts.items()}
        distinct = sum(len(s) for s in digests)
        sample = [x for r in resizes for x in tensors[r]]
        infer_ms = {}
        for b in backends:
            runner = BACKENDS[b](artifacts, InferSetting(backend=b, precision=a.precision), threads=1)
            runner.activate()
            batches = [np.stack(sample[i: i + a.batch]) for i in range(0, len(sample) - a.batch + 1, a.batch)]
            infer_ms[b] = median_ms(runner.infer, batches) / a.batch
        n = len(paths)
        total_ms = (n * sum(decode_ms.values())
                    + n * len(decoders) * sum(pre_ms.values())
                    + distinct * sum(infer_ms.values()))
        return {"decode_ms": decode_ms, "preprocess_ms": pre_ms, "infer_ms_per_image": infer_ms,
                "decodes": n * len(decoders), "preprocessings": n * len(decoders) * len(resizes),
                "distinct_tensors": distinct, "inferences": distinct * len(backends),
                "total_s": total_ms / 1e3, "floor_s": total_ms / 1e3 / a.workers}
    finally:
        torch.set_num_threads(torch_threads)
        cv2.setNumThreads(cv2_threads)


def report_floor(fl: dict, ph: dict, a: argparse.Namespace) -> None:
    """Print ``floor_costs``'s result (``ph``: the monitor's phase while it ran), then measure
    and print the inference costs in fresh processes and the floor they would give."""
    fmt = lambda d: ", ".join(f"{k} {v:.2f}" for k, v in d.items())  # noqa: E731
    print(f"(d) floor unit costs (ms, median, 1 thread, freed memory kept): decode "
          f"{fmt(fl['decode_ms'])}; resize+crop+normalise {fmt(fl['preprocess_ms'])}; inference "
          f"per image at batch {a.batch}: {fmt(fl['infer_ms_per_image'])}  [foreign "
          f"{ph['foreign_cpu_s']:.1f} CPU s]")
    print(f"(d) floor counts: {fl['decodes']} decodes, {fl['preprocessings']} preprocessings, "
          f"{fl['distinct_tensors']} distinct input tensors x {len(fl['infer_ms_per_image'])} "
          f"backends = {fl['inferences']} inferences; total {fl['total_s']:.2f} s / {a.workers} "
          f"workers = {fl['floor_s']:.2f} s")
    fresh = {b: (fresh_infer_ms(b, a, False), fresh_infer_ms(b, a, True)) for b in fl["infer_ms_per_image"]}
    print(f"(d) inference in a fresh process (as in an actor), batch {a.batch}, 1 thread, glibc's "
          f"default allocator vs freed memory kept (ms/image, system-CPU share, minor page faults "
          f"per batch): " + "; ".join(
              f"{b} {d['ms_per_image']} ({d['sys_share']:.0%} sys, {d['faults_per_batch']} faults) vs "
              f"{t['ms_per_image']} ({t['sys_share']:.0%}, {t['faults_per_batch']})"
              for b, (d, t) in fresh.items()))
    default_total = fl["total_s"] + fl["distinct_tensors"] * sum(
        d["ms_per_image"] - fl["infer_ms_per_image"][b] for b, (d, _) in fresh.items()) / 1e3
    print(f"    with the default allocator's inference costs the floor would be "
          f"{default_total / a.workers:.2f} s")
    if a.workers > 1:
        together = {b: concurrent_infer_ms(b, a) for b in fl["infer_ms_per_image"]}
        busy_total = fl["total_s"] + fl["distinct_tensors"] * sum(
            ms - fresh[b][1]["ms_per_image"] for b, ms in together.items()) / 1e3
        fl["floor_concurrent_s"] = busy_total / a.workers
        print(f"(d) the floor divides by {a.workers} workers as if they did not slow each other: "
              f"inference in {a.workers} fresh processes at once (freed memory kept, ms/image, "
              f"mean of the processes) vs one alone: " + "; ".join(
                  f"{b} {ms:.2f} vs {fresh[b][1]['ms_per_image']}" for b, ms in together.items())
              + f"; with these the floor would be {fl['floor_concurrent_s']:.2f} s")


def fresh_infer_ms(backend: str, a: argparse.Namespace, tuned: bool) -> dict:
    """Inference ms per image at ``--batch``, 1 thread, in a fresh process (as an actor starts),
    with glibc's default allocator or with freed memory kept; also its system-CPU share and
    minor page faults per batch."""
    return child_json(["--unit-cost", backend, *(["--tuned-malloc"] if tuned else [])], a,
                      "unit-cost subprocess")


def concurrent_infer_ms(backend: str, a: argparse.Namespace) -> float:
    """``fresh_infer_ms`` (freed memory kept) in ``--workers`` processes started together, as
    the actors run side by side: the mean of their ms/image. Each times batches for at least
    ``UNIT_COST_S`` seconds, so their timed windows overlap."""
    procs = [subprocess.Popen([sys.executable, str(SWEEP), "--unit-cost", backend, "--tuned-malloc",
                               *common_args(a)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(a.workers)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"concurrent unit-cost subprocess failed:\n{stderr}")
        out.append(json.loads(stdout.strip().splitlines()[-1])["ms_per_image"])
    return statistics.mean(out)


UNIT_COST_S = 4.0   # each unit-cost child times batches for at least this long


def unit_cost_child(a: argparse.Namespace) -> None:
    """--unit-cost BACKEND: time inference on real inputs, print one JSON line."""
    if a.tuned_malloc:
        keep_freed_memory()
    import torch

    from dmx.runner.backends import BACKENDS, InferSetting
    from dmx.runner.decoders import DecodeOptions, get_decoder
    from dmx.runner.preprocess import model_input_pixels, normalise
    torch.set_num_threads(1)
    paths, _spec, _cells, _ref, model, artifacts = setup(a)
    dec = get_decoder("pil")
    xs = [normalise(model_input_pixels(dec.decode(Path(p).read_bytes(), DecodeOptions()),
                                       "pil-bilinear", model.preprocess), model.preprocess)
          for p in paths[: 8 * a.batch]]
    runner = BACKENDS[a.unit_cost](artifacts, InferSetting(backend=a.unit_cost, precision=a.precision),
                                   threads=1)
    runner.activate()
    batches = [np.stack(xs[i: i + a.batch]) for i in range(0, len(xs) - a.batch + 1, a.batch)]
    runner.infer(batches[0])
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0, times = time.perf_counter(), []
    while time.perf_counter() - t0 < UNIT_COST_S:
        times.append(median_ms(runner.infer, batches))
    ms = statistics.median(times) / a.batch
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    print(json.dumps({"backend": a.unit_cost, "ms_per_image": round(ms, 2),
                      "sys_share": round((r1.ru_stime - r0.ru_stime) / max(cpu, 1e-9), 2),
                      "faults_per_batch": round((r1.ru_minflt - r0.ru_minflt) / (len(batches) * len(times)))}))
