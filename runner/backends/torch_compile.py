"""torch.compile with TorchInductor, on CPU (C++/OpenMP kernels) or CUDA (Triton kernels).

Inductor fuses operators (conv + batch-norm + activation, reductions), so its outputs differ from
eager's by rounding: a path many users deploy. The compile is this backend's conversion: it is
made once on the driver before the sweep (its seconds land in the manifest's
``model.conversion`` like an ONNX export), with Inductor's cache (``TORCHINDUCTOR_CACHE_DIR``)
under dmx's cache directory. Its product is Inductor's portable cache
(``torch.compiler.save_cache_artifacts``: the FX graphs and compiled kernels), published like an
ONNX file, so a worker on a node that shares nothing with the driver loads it into its own
cache (``load_cache_artifacts``) and does not compile again. Every batch runs at one static batch size (the ``batch`` axis, else 8; a
smaller batch is padded, a larger one split), so the model compiles once: no recompilation on
the last, shorter batch of a chunk.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dmx.matrix.axes import INFER, Axis
from dmx.runner.cache import cache_dir, cached

from .base import BackendRunner, Conversion, ConversionError, InferSetting, ModelArtifacts
from .torch_backend import (TF32_AXIS, effective_precision, torch_dtype, torch_forward,
                            torch_unsupported)

if TYPE_CHECKING:
    import numpy as np   # imported where used: `import dmx.runner.backends` stays cheap

MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune")
DEFAULT_BATCH = 8


def inductor_cache_dir() -> Path:
    """Inductor's cache, under dmx's: ``<cache>/inductor``."""
    path = cache_dir() / "inductor"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _compile(model: Any, setting: InferSetting) -> Any:
    """The model on the setting's device and dtype, compiled by Inductor (lazily: the first
    call compiles), with Inductor's cache under dmx's."""
    import torch
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor_cache_dir())
    net = model.to(device=setting.device, dtype=torch_dtype(setting.precision)).eval()
    return torch.compile(net, backend="inductor", mode=setting.compile_mode or "default",
                         dynamic=False)


class TorchCompileRunner(BackendRunner):
    name = "torch-compile"
    precisions = ("fp32", "fp16", "bf16")
    axes = (TF32_AXIS,
            Axis("compile_mode", INFER, MODES,
                 "torch.compile mode (Inductor): default, max-autotune-no-cudagraphs, "
                 "reduce-overhead / max-autotune (CUDA graphs on CUDA)"))

    @classmethod
    def version(cls) -> str | None:
        import torch
        return torch.__version__

    @staticmethod
    def batch_size(setting: InferSetting) -> int:
        """The static batch size the model is compiled for."""
        return setting.batch or DEFAULT_BATCH

    @classmethod
    def model_key(cls, setting: InferSetting) -> str:
        return (f"inductor:{setting.compile_mode or 'default'}:{setting.device}:{setting.precision}"
                f":b{cls.batch_size(setting)}" + (":tf32" if setting.tf32 == "on" else ""))

    @classmethod
    def make_model(cls, setting: InferSetting, conv: Conversion) -> tuple[str, dict[str, Any]]:
        """Compile once and run one batch, filling Inductor's cache; the product is that
        compile's portable cache artifacts (empty where Inductor recorded none)."""
        import torch
        model = conv.model
        if model.torch_factory is None:
            raise ConversionError("the model was given as ONNX only; torch-compile needs model.torch")
        if setting.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConversionError(f"device {setting.device}: no CUDA GPU visible to torch here")
        b, crop = cls.batch_size(setting), model.preprocess.crop
        # Inductor's CPU kernels are compiled for a thread count (its cache key holds it):
        # compile for the workers' count, or they would compile again
        threads = setting.threads or conv.threads or torch.get_num_threads()
        key = (f"{conv.digest}-{cls.model_key(setting).replace(':', '-')}-{crop}px-t{threads}"
               f"-torch{torch.__version__}")

        def make(out: Path) -> dict[str, Any]:
            from dmx.runner.models.loading import build_torch_model
            compiled = _compile(build_torch_model(model.torch_factory, model.weights), setting)
            x = torch.zeros(b, 3, crop, crop, device=setting.device,
                            dtype=torch_dtype(setting.precision))
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                with torch.inference_mode():
                    compiled(x)
            except Exception as e:  # dynamo/inductor raise many types; report the step
                raise ConversionError(f"torch.compile failed: {type(e).__name__}: "
                                      f"{str(e).strip().splitlines()[0][:300]}") from e
            finally:
                torch.set_num_threads(before)
            save = getattr(torch.compiler, "save_cache_artifacts", None)   # torch >= 2.7
            saved = save() if save else None
            out.write_bytes(saved[0] if saved else b"")      # empty: each node compiles
            return {"command": f"torch.compile(backend='inductor', mode={setting.compile_mode or 'default'!r}, "
                               f"dynamic=False), batch {b} on {setting.device}, {threads} threads",
                    "torch": torch.__version__, "threads": threads,
                    "inductor_cache": str(inductor_cache_dir())}

        return cached(key, "inductor-cache.bin", make)

    @classmethod
    def unsupported(cls, artifacts: ModelArtifacts, setting: InferSetting) -> str | None:
        return torch_unsupported(artifacts, setting, cls.name) or super().unsupported(artifacts, setting)

    def _activate(self) -> None:
        import numpy as np
        import torch
        from torch._dynamo.utils import counters
        self._torch = torch
        self.dtype = torch_dtype(self.setting.precision)
        self.batch = self.batch_size(self.setting)
        misses = counters["inductor"]["fxgraph_cache_miss"]
        self.model = self.artifacts.build_torch()
        self.compiled = _compile(self.model, self.setting)
        product = self.artifacts.file_for(self.setting)    # the driver's compile, shipped
        load = getattr(torch.compiler, "load_cache_artifacts", None)
        if load and product and product.endswith(".bin") and os.path.getsize(product):
            load(Path(product).read_bytes())
        t = time.perf_counter()
        self._run(np.zeros((self.batch, *self.artifacts.input_shape), np.float32))   # compiles
        self.compile_s = time.perf_counter() - t
        # nothing compiled from scratch: Inductor's on-disk caches (or, in the same process,
        # dynamo's compiled code) served the graph
        self.cache_hit = counters["inductor"]["fxgraph_cache_miss"] == misses

    def _run(self, batch: np.ndarray) -> list[np.ndarray]:
        return torch_forward(self._torch, self.compiled, batch, self.setting, self.dtype,
                             self.threads)

    def _infer_all(self, batch: np.ndarray) -> list[np.ndarray]:
        """Runs at the compiled batch size: pads the last slice with zeros, drops their outputs."""
        import numpy as np
        n, b = len(batch), self.batch
        parts: list[list[np.ndarray]] = []
        for i in range(0, n, b):
            x = batch[i: i + b]
            if len(x) < b:
                x = np.concatenate([x, np.zeros((b - len(x), *x.shape[1:]), x.dtype)])
            parts.append([o[: min(b, n - i)] for o in self._run(x)])
        return [np.concatenate(outs) for outs in zip(*parts)]

    def _deactivate(self) -> None:
        del self.compiled, self.model

    def info(self) -> dict[str, Any]:
        eff, dtype = effective_precision(self.model, self.setting)
        return {"backend": self.name, "version": self._torch.__version__,
                "device": self.setting.device, "precision_effective": eff, "threads": self.threads,
                "properties": {"param_dtype": dtype, "compile_mode": self.setting.compile_mode or "default",
                               "compiled_batch": self.batch, "inductor_cache_hit": self.cache_hit,
                               "compile_s": round(self.compile_s, 3),
                               "inductor_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR")}}
