"""Benchmark (not a test): ``dmx localize`` on one contrast, 8 images of MobileNetV2 (issue 13:
under 30 s here).

What it does:

1. Builds the demo photos (``dmx.demo_data``, photos shipped inside installed packages) and the
   MobileNetV2 model files with dmx's own conversion (``dmx.runner.convert.prepare_artifacts``:
   the torch.onnx dynamo export, ONNX Runtime static QDQ int8 calibrated on 8 photos), cached
   in dmx's cache so a second run converts nothing. Conversion is not timed.
2. Times, side by side in one process on the same 8 inputs:
   - ``plain``: the reference (torch eager) and the variant (ONNX Runtime int8) inferring the 8
     images once each: the least work any comparison needs;
   - ``localize``: the whole localisation of that contrast (every tensor joined and reduced,
     introduced-vs-propagated re-runs, instrumentation check, bisection);
   - ``localize`` again with an 8 MB tensor budget (several instrumented sessions), to show
     what the memory bound costs in time. Each localisation runs in a fresh child process so
     its peak RSS (``VmHWM``) is its own: the two peaks side by side show the bound.
3. With ``--contrast openvino``: OpenVINO with its default precision hint (bf16 on CPUs with
   avx512_bf16/AMX, f32 elsewhere) instead of ONNX Runtime int8.

Run::

    python bench/localize.py              # last line is JSON
    python bench/localize.py --contrast openvino --images 8
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import resource
import subprocess
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _peak_rss_mb() -> int:
    """This process's peak RSS (VmHWM; ru_maxrss would include the forking parent's peak)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) // 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--contrast", choices=("ort-int8", "openvino"), default="ort-int8")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child-budget-mb", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()

    import numpy as np

    from dmx.demo_data import build_demo_images
    from dmx.matrix import ModelSpec
    from dmx.runner.backends import InferSetting
    from dmx.runner.convert import prepare_artifacts, resolve_model
    from dmx.runner.localize.api import image_inputs, list_image_paths
    from dmx.runner.localize.engine import localize
    from dmx.runner.localize.sides import SIDES

    photos = Path(tempfile.gettempdir()) / "dmx-bench-localize-photos"
    build_demo_images(str(photos))
    model = resolve_model(ModelSpec(name="mobilenet_v2"))
    inputs = []
    for item in image_inputs(list_image_paths(str(photos)), model.preprocess):
        inputs.append(item)
        if len(inputs) >= a.images:
            break
    calib = np.concatenate([x for _, x in inputs])
    if a.contrast == "ort-int8":
        var_setting = InferSetting(backend="onnxruntime", precision="int8")
    else:
        var_setting = InferSetting(backend="openvino", precision="fp32", openvino_hint="default")
    ref_setting = InferSetting(backend="torch", precision="fp32")
    t = time.perf_counter()
    art = prepare_artifacts(model, {("onnxruntime", "int8", None), ("onnxruntime", "fp32", None),
                                    ("openvino", "fp32", None)},
                            lambda: (calib, [i for i, _ in inputs]))
    convert_s = time.perf_counter() - t
    onnx_fp32 = art.files["onnx:onnx-dynamo"]

    def sides():
        ref = SIDES["torch"](onnx_fp32, ref_setting, art, a.threads)
        var = SIDES[var_setting.backend](art.file_for(var_setting), var_setting, art, a.threads)
        return ref, var

    if a.child_budget_mb is not None:  # one localisation in this fresh process
        ref, var = sides()
        t = time.perf_counter()
        res = localize(ref, var, inputs, cell_id="bench", budget_bytes=a.child_budget_mb << 20)
        wall = time.perf_counter() - t
        print(json.dumps({"wall_s": round(wall, 2), "precision": res.precision,
                          "peak_rss_mb": _peak_rss_mb(),
                          "first_divergent": (res.first_divergent or {}).get("tensor")}))
        return

    # plain inference, both sides, same inputs (runners built and warmed outside the timing)
    ref, var = sides()
    for s in (ref, var):
        s.plain(inputs[0][1])
        if hasattr(s, "eager"):
            s.eager(inputs[0][1])
    t = time.perf_counter()
    for _, x in inputs:
        ref.eager(x)
        var.plain(x)
    plain_s = time.perf_counter() - t

    results = {}
    for label, budget in (("default_budget", 256), ("budget_8mb", 8)):
        out = subprocess.run([sys.executable, __file__, "--images", str(a.images), "--contrast", a.contrast,
                              "--threads", str(a.threads), "--child-budget-mb", str(budget)],
                             capture_output=True, text=True, check=True)
        results[label] = json.loads(out.stdout.strip().splitlines()[-1])

    d = results["default_budget"]
    b = results["budget_8mb"]
    print(f"MobileNetV2, {len(inputs)} images, torch fp32 vs {var_setting.backend} "
          f"{var_setting.precision}{' hint default' if var_setting.openvino_hint else ''} "
          f"(ran {d['precision']}); threads {a.threads}; conversion (cached after the first run) {convert_s:.1f} s")
    print(f"  plain inference, both sides:         {plain_s:6.2f} s")
    print(f"  dmx localize (256 MB tensor budget): {d['wall_s']:6.2f} s = {d['wall_s'] / plain_s:.0f} x plain, "
          f"peak RSS {d['peak_rss_mb']} MB  -> target < 30 s: {'met' if d['wall_s'] < 30 else 'MISSED'}")
    print(f"  dmx localize (8 MB tensor budget):   {b['wall_s']:6.2f} s = {b['wall_s'] / d['wall_s']:.2f} x the "
          f"default, peak RSS {b['peak_rss_mb']} MB")
    print(f"  first divergent: {d['first_divergent']} (8 MB budget: {b['first_divergent']})")
    print(json.dumps({"images": len(inputs), "contrast": a.contrast, "plain_s": round(plain_s, 2),
                      "localize_s": d["wall_s"], "localize_8mb_s": b["wall_s"],
                      "peak_rss_mb": d["peak_rss_mb"], "peak_rss_8mb_mb": b["peak_rss_mb"],
                      "cpu_count": os.cpu_count()}))


if __name__ == "__main__":
    main()
