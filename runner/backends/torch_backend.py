"""PyTorch eager: fp32, bf16 and fp16 by casting model and input; CPU or CUDA (``tf32`` there)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dmx.matrix.axes import INFER, Axis

from .base import BackendRunner, InferSetting, ModelArtifacts

if TYPE_CHECKING:
    import numpy as np   # imported where used: `import dmx.runner.backends` stays cheap

_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def on_cuda(factors: Any) -> bool:
    """The cell runs on a CUDA device (``tf32`` means something only there)."""
    return str(factors.get("device") or "cpu").startswith("cuda")


#: TF32 for fp32 matmul/conv on CUDA; shared by the torch-based backends.
TF32_AXIS = Axis("tf32", INFER, ("on", "off"), "TF32 for fp32 matmul/conv on CUDA (torch)",
                 applies=on_cuda, rank=16, default="off")


def torch_unsupported(artifacts: ModelArtifacts, setting: InferSetting, name: str) -> str | None:
    """What every backend running the torch module checks: a torch model, a float precision,
    a visible CUDA device."""
    if artifacts.torch_factory is None:
        return f"the model was given as ONNX only; {name} needs model.torch"
    if setting.precision not in _DTYPES:
        return (f"{name} has no {setting.precision} path for a float model "
                "(int8 runs on onnxruntime and openvino)")
    if setting.device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            return f"device {setting.device}: no CUDA GPU visible to torch here"
    return None


def torch_dtype(precision: str) -> Any:
    import torch
    return getattr(torch, _DTYPES[precision])


def effective_precision(model: Any, setting: InferSetting) -> tuple[str, str]:
    """(precision the module's parameters hold, with tf32 when it applies; their dtype). A
    module without parameters computes in the dtype its input is cast to."""
    import torch
    first = next(model.parameters(), None)
    dtype = first.dtype if first is not None else torch_dtype(setting.precision)
    eff = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype))
    if eff == "fp32" and setting.device.startswith("cuda") and setting.tf32 == "on":
        eff = "tf32"
    return eff, str(dtype)


def torch_forward(torch: Any, module: Any, batch: np.ndarray, setting: InferSetting, dtype: Any,
                  threads: int) -> list[np.ndarray]:
    """Every output of ``module`` on ``batch`` (float32 arrays): a module may return a tensor or
    a tuple/list of tensors. Threads and TF32 are set as the setting says, every call."""
    torch.set_num_threads(threads)
    if setting.device.startswith("cuda"):
        on = setting.tf32 == "on"
        torch.backends.cuda.matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on
    with torch.inference_mode():
        x = torch.from_numpy(batch).to(device=setting.device, dtype=dtype)
        out = module(x)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return [o.float().cpu().numpy() for o in outs]


class TorchRunner(BackendRunner):
    name = "torch"
    precisions = tuple(_DTYPES)
    axes = (TF32_AXIS,)

    @classmethod
    def version(cls) -> str | None:
        import torch
        return torch.__version__

    @classmethod
    def unsupported(cls, artifacts: ModelArtifacts, setting: InferSetting) -> str | None:
        return torch_unsupported(artifacts, setting, cls.name) or super().unsupported(artifacts, setting)

    def _activate(self) -> None:
        import torch
        self._torch = torch
        self.dtype = torch_dtype(self.setting.precision)
        self.model = self.artifacts.build_torch().to(device=self.setting.device, dtype=self.dtype)

    def _infer_all(self, batch: np.ndarray) -> list[np.ndarray]:
        return torch_forward(self._torch, self.model, batch, self.setting, self.dtype, self.threads)

    def _deactivate(self) -> None:
        del self.model

    def info(self) -> dict[str, Any]:
        eff, dtype = effective_precision(self.model, self.setting)
        return {"backend": "torch", "version": self._torch.__version__, "device": self.setting.device,
                "precision_effective": eff, "threads": self.threads,
                "properties": {"param_dtype": dtype}}
