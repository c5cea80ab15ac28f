"""PyTorch eager: fp32, bf16 and fp16 by casting model and input; CPU or CUDA."""
from __future__ import annotations

from typing import Any

import numpy as np

from .base import BackendRunner, InferSetting, ModelArtifacts

_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class TorchRunner(BackendRunner):
    system_name = "torch"

    @classmethod
    def unsupported(cls, artifacts: ModelArtifacts, setting: InferSetting) -> str | None:
        if artifacts.torch_factory is None:
            return "the model was given as ONNX only; torch needs model.torch"
        if setting.conversion is not None:
            return "torch runs the eager model: conversion does not apply"
        if setting.precision not in _DTYPES:
            return (f"torch has no {setting.precision} path for a float model "
                    "(int8 runs on onnxruntime and openvino)")
        if setting.device.startswith("cuda"):
            import torch
            if not torch.cuda.is_available():
                return f"device {setting.device}: no CUDA GPU visible to torch here"
        return None

    def _activate(self) -> None:
        import torch
        self._torch = torch
        self.dtype = getattr(torch, _DTYPES[self.setting.precision])
        self.model = self.artifacts.build_torch().to(device=self.setting.device, dtype=self.dtype)

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        return self._infer_all(batch)[0]

    def _infer_all(self, batch: np.ndarray) -> list[np.ndarray]:
        """Every output: a module may return a tensor or a tuple/list of tensors."""
        torch = self._torch
        torch.set_num_threads(self.threads)
        if self.setting.device.startswith("cuda"):
            on = self.setting.tf32 == "on"
            torch.backends.cuda.matmul.allow_tf32 = on
            torch.backends.cudnn.allow_tf32 = on
        with torch.inference_mode():
            x = torch.from_numpy(batch).to(device=self.setting.device, dtype=self.dtype)
            out = self.model(x)
            outs = out if isinstance(out, (tuple, list)) else (out,)
            return [o.float().cpu().numpy() for o in outs]

    def info(self) -> dict[str, Any]:
        torch = self._torch
        dtype = next(self.model.parameters()).dtype
        eff = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype))
        if eff == "fp32" and self.setting.device.startswith("cuda") and self.setting.tf32 == "on":
            eff = "tf32"
        return {"backend": "torch", "version": torch.__version__, "device": self.setting.device,
                "precision_effective": eff, "threads": self.threads,
                "properties": {"param_dtype": str(dtype)}}
