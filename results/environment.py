"""A fingerprint of the environment a run used: package versions, CPU flags, libjpeg builds."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import sys
from typing import Any

PACKAGES = ("dmx", "torch", "onnx", "onnxruntime", "openvino", "opencv-python-headless", "pillow",
            "numpy", "pyarrow", "duckdb", "ray", "nncf", "jpeglib", "simplejpeg", "PyTurboJPEG")
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "avx_vnni",
             "amx_bf16", "amx_int8", "amx_tile", "fma", "f16c")


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def cpu_info() -> dict[str, Any]:
    """CPU model and the ISA flags that change numerics (bf16/fp16/int8 kernels)."""
    model, flags = platform.processor() or None, set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return {"model": model, "count": os.cpu_count(),
            "isa": {f: (f in flags) for f in ISA_FLAGS} if flags else None}


def libjpeg_versions() -> dict[str, str | None]:
    """The libjpeg(-turbo) builds behind Pillow and OpenCV in this process."""
    out: dict[str, str | None] = {}
    try:
        from PIL import features
        turbo = features.check_feature("libjpeg_turbo")
        out["pillow"] = f"{'libjpeg-turbo' if turbo else 'libjpeg'} {features.version('jpg')}"
    except ImportError:
        out["pillow"] = None
    try:
        import cv2
        m = re.search(r"^\s*JPEG:\s*(.+)$", cv2.getBuildInformation(), re.M)
        out["opencv"] = m.group(1).strip() if m else None
    except ImportError:
        out["opencv"] = None
    return out


# what a machine that torch could run CUDA (or ROCm) on has: NVIDIA's driver, WSL2's GPU, AMD's
_GPU_NODES = ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg", "/dev/kfd")


def gpu_info() -> dict[str, Any]:
    """GPU name, driver, CUDA and cuDNN versions as torch sees them (None on a CPU machine).
    On a machine with no GPU driver at all, torch is not imported to say so: a worker that runs
    no torch cell (ONNX Runtime, OpenVINO) never loads it (~1.5 s and ~30 MB per worker)."""
    if "torch" not in sys.modules and not any(os.path.exists(p) for p in _GPU_NODES):
        return {"available": False, "reason": "no GPU driver on this machine (no "
                                              f"{', '.join(_GPU_NODES)})"}
    try:
        import torch
    except ImportError:
        return {"available": False, "reason": "torch not installed"}
    info: dict[str, Any] = {"available": bool(torch.cuda.is_available()),
                            "torch_cuda": torch.version.cuda}
    if not info["available"]:
        return info
    info["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    info["cudnn"] = torch.backends.cudnn.version()
    try:
        import subprocess
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        info["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, IndexError):
        info["driver"] = None
    return info


def fingerprint() -> dict[str, Any]:
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "hostname": platform.node(),
        "cpu": cpu_info(),
        "packages": package_versions(),
        "libjpeg": libjpeg_versions(),
        "gpu": gpu_info(),
    }
