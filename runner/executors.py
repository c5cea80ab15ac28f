"""Executors run chunks through Workers: in-process (``local``) or on Ray actors (``ray``).

Both call ``on_result`` on the driver for every finished chunk, in completion order, so the
driver streams part files and never holds the whole run.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from .plan import Chunk, Plan
from .worker import ChunkResult, Worker

OnResult = Callable[[ChunkResult], None]


class ExecutorError(RuntimeError):
    """The executor could not start (Ray cluster unreachable, ...)."""


class LocalExecutor:
    """One Worker in this process; same results as Ray, for tests and tiny runs."""

    name = "local"

    def __init__(self, workers: int | None = None) -> None:
        self.workers = 1
        self.threads = max(1, workers or os.cpu_count() or 1)

    def run(self, plan: Plan, chunks: Iterable[Chunk], on_result: OnResult) -> None:
        worker = Worker(plan)
        for chunk in chunks:
            on_result(worker.process_chunk(chunk))


class _WorkerActor:
    """A Ray actor holding one Worker (and its compiled models) for the whole run."""

    def __init__(self, plan: Plan) -> None:
        self.worker = Worker(plan)

    def process(self, chunk: Chunk) -> ChunkResult:
        return self.worker.process_chunk(chunk)

    def pid(self) -> int:
        return os.getpid()


def ray_init(address: str | None, workers: int) -> str:
    """Attach to ``address``/``RAY_ADDRESS``, reuse a running session, or start a local Ray with
    no dashboard, a bounded object store and its temp files under dmx's cache."""
    from .convert import cache_dir
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        # Ray >= 2.59 starts clusters with token auth on; a driver only sends the token in
        # token mode. Sending it to a cluster without auth is harmless, so use it when found.
        if "RAY_AUTH_MODE" not in os.environ and (
                os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
                or (Path.home() / ".ray" / "auth_token").is_file()):
            os.environ["RAY_AUTH_MODE"] = "token"
    import ray  # after RAY_AUTH_MODE: Ray reads it when first imported
    if ray.is_initialized():
        return "existing session"
    # the workers' own output (library warnings, Ray's retry and log-dedup lines) reaches the
    # console only with ``dmx run --verbose``; dmx reports problems in the rows and its summary
    common = dict(logging_level=logging.ERROR, log_to_driver=bool(os.environ.get("DMX_VERBOSE")),
                  include_dashboard=False)
    if address:
        try:
            ray.init(address=address, **common)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ExecutorError(f"cannot attach to the Ray cluster at {address}: {e}") from None
        return f"cluster {address}"
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    tmp = cache_dir() / "ray"
    if len(str(tmp)) > 50:  # Ray's socket paths below it must stay under 107 bytes
        tmp = Path(tempfile.gettempdir()) / f"dmx-ray-{os.getuid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    ray.init(num_cpus=max(workers, 1), object_store_memory=512 * 1024 * 1024,
             _temp_dir=str(tmp), **common)
    return "local"


class RayExecutor:
    """Chunks as tasks on long-lived actors: models are built once per actor, not per task.
    A killed actor is restarted and its in-flight chunk retried (``max_task_retries``)."""

    name = "ray"

    def __init__(self, workers: int | None = None, address: str | None = None) -> None:
        self.workers = max(1, workers or os.cpu_count() or 1)
        self.threads = 1
        self.address = address
        self.where = ""

    def run(self, plan: Plan, chunks: Iterable[Chunk], on_result: OnResult) -> None:
        self.where = ray_init(self.address, self.workers)  # before importing ray: auth mode
        import ray
        # Every actor runs every cell of its chunks (the reference output must be at hand), so
        # when some cells run on CUDA each actor asks for an equal share of one GPU.
        gpus = 1.0 / self.workers if plan.needs_gpu else 0
        actor_cls = ray.remote(num_cpus=1, num_gpus=gpus, max_restarts=3,
                               max_task_retries=3)(_WorkerActor)
        # The plan is passed by value (it is small): an actor restarted after a crash must not
        # depend on an object-store reference that may be gone.
        actors = [actor_cls.remote(plan) for _ in range(self.workers)]
        queue = list(chunks)
        pending: dict = {}
        load = {i: 0 for i in range(len(actors))}
        try:
            while queue or pending:
                for i in sorted(load, key=load.get):
                    if queue and load[i] < 2:
                        pending[actors[i].process.remote(queue.pop(0))] = i
                        load[i] += 1
                ready, _ = ray.wait(list(pending), num_returns=1)
                i = pending.pop(ready[0])
                load[i] -= 1
                on_result(ray.get(ready[0]))
        finally:
            for a in actors:
                ray.kill(a)
