"""The backend interface (after Polygraphy's runners and NNSmith's backends).

A backend is one module holding one ``BackendRunner`` subclass that declares everything about it:

- ``name`` (the ``backend`` level) and ``version()`` (its library's version, None if absent);
- ``axes``: its own settings as matrix axes (``openvino_hint``, ``ort_opt``, ``conversion``...),
  registered with ``dmx.matrix.axes`` when the class is defined, so the matrix knows them;
- ``precisions`` it can run, and ``unsupported``: why a setting cannot run here (a skip reason);
- ``model_key`` and ``make_model``: the model product a setting runs and how it is made on the
  driver before the sweep (an ONNX export, an fp16 graph, an int8 quantisation, a compile),
  cached under dmx's cache; None for backends that build from the torch module in the worker;
- the runner: ``_activate`` builds the session lazily where it runs (inside the worker),
  ``_infer_all`` maps a batch to outputs, ``_deactivate`` frees it; ``info()`` reads back what
  ran, above all ``precision_effective``, the precision the library really used.

The base class owns the lifecycle (activate / infer / deactivate), input checks and timing.
Defining a subclass with a ``name`` registers it in ``BACKENDS``; ``dmx.runner.backends`` imports
every module of its folder, so adding a backend is adding one file.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Protocol

from dmx.matrix.axes import AXES, BACKEND_AXES, Axis, register_backend

if TYPE_CHECKING:
    import numpy as np   # imported where used: `import dmx.runner.backends` stays cheap


class BackendUnavailable(RuntimeError):
    """The backend, or this setting of it, cannot run here: its cells are skipped with this reason."""


class ConversionError(RuntimeError):
    """A model could not be converted (export failed); names the step and the library's message."""


#: Registered backends, by name (the ``backend`` axis's levels).
BACKENDS: dict[str, type["BackendRunner"]] = {}

_CORE = ("backend", "precision", "threads", "device", "batch")


class InferSetting:
    """Everything that decides how one backend runs the model: the backend, precision, device,
    threads and batch, plus the backend's own axes (``setting.openvino_hint``; None where the
    setting does not set a registered backend axis). Immutable and hashable."""

    __slots__ = ("_items",)

    def __init__(self, backend: str = "torch", precision: str = "fp32", threads: int | None = None,
                 device: str = "cpu", batch: int | None = None, **options: str | None) -> None:
        core = {"backend": backend, "precision": precision, "threads": threads, "device": device,
                "batch": batch}
        items = tuple(core.items()) + tuple(sorted((k, str(v)) for k, v in options.items()
                                                   if v is not None))
        object.__setattr__(self, "_items", items)

    @classmethod
    def from_factors(cls, factors: Mapping[str, str | None]) -> "InferSetting":
        """The setting of a cell, from its factors (the infer-stage ones are used)."""
        threads, batch = factors.get("threads"), factors.get("batch")
        return cls(backend=factors.get("backend") or "torch",
                   precision=factors.get("precision") or "fp32",
                   threads=int(threads) if threads else None,
                   device=factors.get("device") or "cpu",
                   batch=int(batch) if batch else None,
                   **{a: v for a, v in factors.items() if a in BACKEND_AXES and v is not None})

    @property
    def options(self) -> dict[str, str]:
        """The backend-specific axes this setting sets (axis -> level)."""
        return {k: v for k, v in self._items if k not in _CORE}

    @property
    def __dict__(self) -> dict[str, Any]:  # type: ignore[override]
        """Every field (core fields first), as a dataclass's ``__dict__`` would read."""
        return dict(self._items)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        for k, v in self._items:
            if k == name:
                return v
        if name in BACKEND_AXES or name in AXES:
            return None
        raise AttributeError(f"InferSetting has no field {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("InferSetting is immutable")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, InferSetting) and self._items == other._items

    def __hash__(self) -> int:
        return hash(self._items)

    def __reduce__(self) -> tuple:
        return (_setting_from_items, (self._items,))

    def __repr__(self) -> str:
        return "InferSetting(" + ", ".join(f"{k}={v!r}" for k, v in self._items if v is not None) + ")"


def _setting_from_items(items: tuple) -> InferSetting:
    d = dict(items)
    core = {k: d.pop(k) for k in _CORE}
    return InferSetting(**core, **d)


@dataclass(frozen=True)
class ModelArtifacts:
    """What the backends build sessions from. Plain data, shipped to workers.

    ``torch_factory`` is ``builtin:<name>`` or a user ``pkg.module:factory``; ``files`` maps a
    backend's model key (``ort:onnx-dynamo:fp16``, ``ov:torch``...) to the product made on the
    driver before the sweep; ``conversion_notes`` says how each was made (or why it failed).
    On a cluster the products are also ``published`` to the run directory, and a worker builds
    from its node's copies (``dmx.runner.artifacts.materialise``), never from the driver's paths.
    """

    name: str
    task: str
    torch_factory: str | None
    weights: str | None
    files: Mapping[str, str] = field(default_factory=dict)
    conversion_notes: Mapping[str, Any] = field(default_factory=dict)
    input_shape: tuple[int, int, int] = (3, 224, 224)
    max_batch: int | None = None        # an ONNX file exported with a fixed batch (often 1)
    #: model key -> ``dmx.runner.artifacts.Published``: on a cluster, where each product lies in
    #: the run directory; workers fetch it into their node's cache (``files`` are the driver's)
    published: Mapping[str, Any] = field(default_factory=dict)
    digest: str | None = None           # convert.conversion_digest: weights, code, shape, versions

    def file_for(self, setting: InferSetting) -> str | None:
        """The model product ``setting`` runs, or None (none needed, or its making failed)."""
        key = BACKENDS[setting.backend].model_key(setting)
        return self.files.get(key) if key else None

    def missing_reason(self, setting: InferSetting) -> str:
        """Why no model product exists for this setting (the conversion's error, if any)."""
        key = BACKENDS[setting.backend].model_key(setting)
        note = self.conversion_notes.get(key or "")
        return note if isinstance(note, str) else f"no model file for {key}"

    def build_torch(self) -> Any:
        from dmx.runner.models.loading import build_torch_model
        return build_torch_model(self.torch_factory, self.weights)


class Conversion(Protocol):
    """What ``make_model`` gets from the driver (``dmx.runner.convert.prepare_artifacts``)."""

    model: Any          # dmx.runner.convert.ResolvedModel
    digest: str         # hash of the weights (or of the user's ONNX file): the cache key's root
    threads: int | None  # the workers' intra-op threads where a setting names none

    def onnx(self, exporter: str) -> str:
        """The model as ONNX made by ``exporter`` (or the user's file); raises ConversionError."""

    def calibration(self) -> tuple[np.ndarray, list[str]]:
        """(N, 3, H, W) float32 calibration inputs and their image ids, made once per run."""


class BackendRunner:
    """Base class of every backend: see the module docstring for what a subclass declares."""

    #: The ``backend`` level; defining a subclass with a name registers it.
    name: ClassVar[str] = ""
    #: The backend's own axes (stage ``infer``); their ``applies`` is narrowed to this backend.
    axes: ClassVar[tuple[Axis, ...]] = ()
    #: Precisions (``precision`` levels) it has a path for.
    precisions: ClassVar[tuple[str, ...]] = ("fp32",)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name"):
            BACKENDS[cls.name] = cls
            register_backend(cls.name, cls.axes)

    @property
    def system_name(self) -> str:  # the older name of ``name``
        return self.name

    def __init__(self, artifacts: ModelArtifacts, setting: InferSetting, threads: int) -> None:
        self.artifacts = artifacts
        self.setting = setting
        self.threads = setting.threads or threads
        self.active = False
        self.build_s = 0.0           # activate: session build plus one warm-up batch
        self.infer_s = 0.0           # total seconds in ``infer``/``infer_all``
        self.last_infer_s = 0.0
        self.batches = 0

    # -- what the backend declares --

    @classmethod
    def version(cls) -> str | None:
        """The backend library's version, or None when it is not installed."""
        return None

    @classmethod
    def model_key(cls, setting: InferSetting) -> str | None:
        """Key of the model product ``setting`` runs (``ModelArtifacts.files``), or None when
        the worker builds it from the torch module."""
        return None

    @classmethod
    def make_model(cls, setting: InferSetting, conv: Conversion) -> tuple[str, dict[str, Any]]:
        """Make the product ``model_key(setting)`` names (cached): (path, notes). Raises
        ConversionError; a failure becomes the skip reason of the setting's cells."""
        raise ConversionError(f"{cls.name} makes no model product")

    @classmethod
    def unsupported(cls, artifacts: ModelArtifacts, setting: InferSetting) -> str | None:
        """Why this setting cannot run here (its cells are skipped with this reason), or None.
        The base checks the library, the precision, levels of shared axes this backend lacks,
        and that the model product exists; subclasses add their own checks."""
        if cls.version() is None:
            return f"{cls.name}: its library is not installed"
        if setting.precision not in cls.precisions:
            return f"{cls.name} has no {setting.precision} path (it runs {', '.join(cls.precisions)})"
        for axis in cls.axes:
            level = getattr(setting, axis.name)
            if level is not None and level not in axis.levels:
                return (f"{axis.name} {level} does not apply to {cls.name} "
                        f"(its levels: {', '.join(axis.levels)})")
        if cls.model_key(setting) is not None and artifacts.file_for(setting) is None:
            return artifacts.missing_reason(setting)
        return None

    # -- the lifecycle, owned here --

    def activate(self) -> None:
        """Build the session, then run one warm-up batch so latencies exclude lazy init."""
        import numpy as np
        t = time.perf_counter()
        self._activate()
        self._infer_all(np.zeros((1, *self.artifacts.input_shape), np.float32))
        self.build_s = time.perf_counter() - t
        self.active = True

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) float32 -> (N, ...) float32: the model's first output."""
        return self.infer_all(batch)[0]

    def infer_all(self, batch: np.ndarray) -> list[np.ndarray]:
        """(N, 3, H, W) float32 -> every output of the model, each (N, ...) float32, in the
        model's output order (detectors often have several: boxes, scores, ...)."""
        import numpy as np
        if not self.active:
            self.activate()
        if batch.dtype != np.float32 or batch.ndim != 4:
            raise ValueError(f"expected a float32 NCHW batch, got {batch.dtype} {batch.shape}")
        t = time.perf_counter()
        outs = [np.asarray(o, dtype=np.float32) for o in self._infer_all(np.ascontiguousarray(batch))]
        self.last_infer_s = time.perf_counter() - t
        self.infer_s += self.last_infer_s
        self.batches += 1
        return outs

    def deactivate(self) -> None:
        """Free the session; a later ``infer`` activates again."""
        if self.active:
            self._deactivate()
        self.active = False

    # -- what a backend implements --

    def _activate(self) -> None:
        raise NotImplementedError

    def _infer_all(self, batch: np.ndarray) -> list[np.ndarray]:
        raise NotImplementedError

    def _deactivate(self) -> None:
        pass

    def info(self) -> dict[str, Any]:
        """Version, precision actually used (``precision_effective``, read back from the
        library), and properties of the built session."""
        raise NotImplementedError

