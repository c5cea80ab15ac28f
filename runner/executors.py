"""Executors run chunks through Workers: in-process (``local``) or on Ray actors (``ray``).

Workers write each chunk's part file themselves; the driver gets a small ``ChunkSummary`` per
chunk (counts, file names, counters, backend infos), in completion order, so its CPU and memory
stay flat however large the cluster or the dataset.
"""
from __future__ import annotations

import dataclasses
import errno
import gc
import logging
import os
import secrets
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from .capabilities import node_name, skip_reasons
from .plan import Chunk, Plan
from .worker import ChunkResult, ChunkSummary, Worker, error_result

OnSummary = Callable[[ChunkSummary], None]
MAX_ATTEMPTS = 3   # a chunk (or, once split, one image) that kills its worker this often is an error
# Ray's memory reservation per worker actor: peak RSS measured for an actor that has imported
# torch, ONNX Runtime and OpenVINO and built MobileNetV2 for all three (see docs/benchmarks.md).
WORKER_MEMORY_MB = 1536


class WorkersLost(RuntimeError):
    """Every worker of the run is gone and no node can host another (a Ray process died, the
    nodes were removed): the machine failed the run, finished chunks are kept."""


class ExecutorError(RuntimeError):
    """The executor could not start or lost its cluster (Ray unreachable, auth mismatch, ...)."""


class LocalExecutor:
    """One Worker in this process; same results as Ray, for tests and tiny runs."""

    name = "local"

    def __init__(self, workers: int | None = None) -> None:
        self.workers = 1
        self.threads = max(1, workers or os.cpu_count() or 1)
        self.where = "local"
        self.gpus_per_worker = 0.0

    def start(self, cuda_devices: int = 0) -> None:
        pass

    def probe(self, plan: Plan) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
        from dmx.results.environment import fingerprint
        return skip_reasons(plan.cells, plan.artifacts), {node_name(): fingerprint()}

    def run(self, plan: Plan, chunks: Iterable[Chunk], on_summary: OnSummary) -> None:
        worker = Worker(plan, node_name())
        for chunk in chunks:
            on_summary(worker.run_chunk(chunk))


def _auth_help(address: str, error: BaseException | None) -> str | None:
    """One line naming what to set when the driver's auth mode is not the cluster's (``error``:
    what attaching raised; None when the cluster accepted us but our actors die)."""
    text = f"{type(error).__name__}: {error}".lower()
    if error is not None and "authenticat" not in text and "token" not in text:
        return None
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        return (f"the Ray cluster at {address} rejected this driver's token: it runs without token "
                "auth (unset RAY_AUTH_MODE, or set RAY_AUTH_MODE=disabled), or with another token "
                "(set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH to the cluster's)")
    return (f"the Ray cluster at {address} requires token authentication: set RAY_AUTH_MODE=token "
            "and the cluster's token in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token")


class _Probe:
    def ping(self) -> bool:
        return True


def _check_actors_start(address: str) -> None:
    """A driver in token mode attached to a cluster without auth can run tasks, but every actor
    it creates dies ("actor creation cancelled"): try one, and say what to set if it dies."""
    import ray
    import ray.exceptions as rex
    actor = ray.remote(num_cpus=0)(_Probe).remote()
    try:
        ray.get(actor.ping.remote(), timeout=300)
    except (rex.RayActorError, rex.GetTimeoutError):
        ray.shutdown()
        raise ExecutorError(_auth_help(address, None)) from None
    ray.kill(actor)


def _embedded_auth() -> None:
    """The embedded cluster authenticates with a token, as Ray does by default, but one kept in
    dmx's cache: Ray would otherwise write ~/.ray/auth_token, and every later ``ray start`` on
    this machine would then switch to token mode. What the user configured is left alone."""
    if any(os.environ.get(v) for v in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")):
        return
    if (Path.home() / ".ray" / "auth_token").is_file():
        return
    from .convert import cache_dir
    path = cache_dir() / "ray-auth-token"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(path)


def _with_job_env(env: dict[str, Any] | None) -> dict[str, Any] | None:
    """Inside a Ray job (``ray job submit``) Ray merges ``ray.init``'s runtime_env with the
    job's and refuses one field set in both: combine them here instead - lists (py_modules,
    excludes) and env_vars joined, ours winning elsewhere - and tell Ray to take the result."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not env or not raw:
        return env
    import json
    job = (json.loads(raw) or {}).get("runtime_env") or {}
    merged = {**job, **env}
    for key in ("py_modules", "excludes"):
        if job.get(key) or env.get(key):
            merged[key] = list(dict.fromkeys([*(env.get(key) or []), *(job.get(key) or [])]))
    if job.get("env_vars") or env.get("env_vars"):
        merged["env_vars"] = {**(job.get("env_vars") or {}), **(env.get("env_vars") or {})}
    os.environ["RAY_OVERRIDE_JOB_RUNTIME_ENV"] = "1"
    return merged


def ray_init(address: str | None, workers: int | None,
             runtime_env: dict[str, Any] | None = None) -> str:
    """Attach to ``address``/``RAY_ADDRESS`` with Ray's own auth configuration (RAY_AUTH_MODE,
    RAY_AUTH_TOKEN*), reuse a running session, or start an embedded local Ray with no dashboard,
    a bounded object store and temp files under dmx's cache, whose processes die with this one.
    ``runtime_env`` (``dmx.runner.runtime_env.resolve``) becomes the session's: every actor of the
    run gets it (Ray uploads local ``py_modules`` only at this level)."""
    from .convert import cache_dir
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        _embedded_auth()
    import ray
    if ray.is_initialized():
        return "existing session"
    # the workers' own output (library warnings, Ray's retry and log-dedup lines) reaches the
    # console only with ``dmx run --verbose``; dmx reports problems in the rows and its summary
    common = dict(logging_level=logging.ERROR, log_to_driver=bool(os.environ.get("DMX_VERBOSE")),
                  include_dashboard=False)
    if address:
        try:
            ray.init(address=address, runtime_env=_with_job_env(runtime_env), **common)
            ray.cluster_resources()  # a cluster that rejects our auth fails here, not later
        except Exception as e:  # noqa: BLE001 - Ray raises many types here; all become one line
            ray.shutdown()
            # Ray reports a token it lacks as a plain connection failure (the "Unauthenticated"
            # is only in its C++ log), so a driver without token mode names the setting.
            hint = ("" if os.environ.get("RAY_AUTH_MODE", "").lower() == "token" else
                    "; if the cluster uses token auth, set RAY_AUTH_MODE=token and its token "
                    "(RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)")
            raise ExecutorError(_auth_help(address, e)
                                or f"cannot attach to the Ray cluster at {address}: "
                                   f"{str(e).splitlines()[0] if str(e) else type(e).__name__}{hint}"
                                ) from None
        if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
            _check_actors_start(address)
        return f"cluster {address}"
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    tmp = cache_dir() / "ray"
    if len(str(tmp)) > 50:  # Ray's socket paths below it must stay under 107 bytes
        tmp = Path(tempfile.gettempdir()) / f"dmx-ray-{os.getuid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    from .reaper import start_reaper
    start_reaper()
    ray.init(num_cpus=max(workers or os.cpu_count() or 1, 1),
             object_store_memory=512 * 1024 * 1024, _temp_dir=str(tmp), runtime_env=runtime_env,
             **common)
    return "local"


class _WorkerActor:
    """A Ray actor holding one Worker (and its compiled models) for the whole run. It is made
    before the driver knows which cells every node can run - it answers that itself (``probe``),
    so no separate process imports the libraries first - and each chunk carries the cells
    skipped run-wide (a few ids; a restarted actor gets them with its next chunk)."""

    def __init__(self, plan: Plan) -> None:
        import ray
        self.worker = Worker(plan, node_name(ray.get_runtime_context().get_node_id()))
        self._frozen = False

    def probe(self, dataset_root: str | None = None) -> tuple[str, dict, dict[str, str], bool]:
        """(node, its environment, cell id -> why this node cannot run that cell, whether the
        dataset's local folder ``dataset_root`` exists here - True for object storage)."""
        from .worker import node_environment
        plan = self.worker.plan
        readable = dataset_root is None or os.path.exists(dataset_root)
        return (self.worker.node, node_environment(), skip_reasons(plan.cells, plan.artifacts),
                readable)

    def _skip(self, skipped: dict[str, str]) -> None:
        if dict(self.worker.plan.skipped) != skipped:
            self.worker.plan = dataclasses.replace(self.worker.plan, skipped=skipped)

    def process(self, chunk: Chunk, skipped: dict[str, str]) -> ChunkSummary:
        """Compute ``chunk`` and write its part file; report a summary."""
        self._skip(skipped)
        summary = self.worker.run_chunk(chunk)
        if not self._frozen:
            # What lives after the first chunk (the frameworks, the built models) lives as
            # long as this process: out of the cyclic collector's sight, its passes over each
            # chunk's garbage stop rescanning it (per 10,000 small images 0.26-0.38 s of
            # collection, 0.10-0.12 s frozen). An actor only: never the caller's process.
            gc.freeze()
            self._frozen = True
        return summary

    def compute(self, chunk: Chunk, skipped: dict[str, str]) -> ChunkResult:
        """Compute without writing (pieces of a split chunk, merged by the driver)."""
        self._skip(skipped)
        return self.worker.process_chunk(chunk)

    def ping(self) -> str:
        """The id of the node this actor runs on (the driver watches those nodes)."""
        import ray
        return ray.get_runtime_context().get_node_id()

    def pid(self) -> int:
        return os.getpid()


def _worker_lost_errors() -> tuple[type[BaseException], ...]:
    import ray.exceptions as rex
    return (rex.RayActorError, rex.WorkerCrashedError, rex.ObjectLostError, rex.NodeDiedError,
            rex.LocalRayletDiedError)


def _first_line(e: BaseException) -> str:
    text = str(getattr(e, "cause", None) or e).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # a Ray task error's text ends with the worker's own exception line: the telling one
    return (lines[-1] if lines else type(e).__name__)[:300]


class RayExecutor:
    """Chunks as tasks on long-lived actors, one per CPU the cluster offers (``workers`` caps
    it), spread over the nodes by Ray's SPREAD strategy; models are built once per actor. Ray
    restarts a crashed actor (``max_restarts``); the driver resubmits its chunk to any live
    actor, and a chunk that keeps killing workers is split so the one image at fault ends as
    error rows (quarantine) while the run completes. A worker lost with its node (preemption,
    down-scaling) is no chunk's fault; a chunk past its deadline has its worker killed.

    On a cluster the session gets ``runtime_env`` (``dmx.runner.runtime_env``: dmx's packages by
    ``py_modules`` unless told otherwise), so the actors run on bare Ray nodes."""

    name = "ray"

    # Ray restarts a dead actor for as long as it takes (a node may come back); the attempt
    # count per chunk, not the restart count, bounds how often one input may kill a worker.
    def __init__(self, workers: int | None = None, address: str | None = None,
                 gpus_per_worker: float | None = None, threads_per_worker: int = 1,
                 worker_memory_mb: int = WORKER_MEMORY_MB,
                 runtime_env: str | dict[str, Any] | None = "auto",
                 chunk_deadline_s: float | None = None, node_wait_s: float | None = None) -> None:
        self.cap = workers
        self.workers = max(1, workers or os.cpu_count() or 1)
        self.threads = max(1, threads_per_worker)
        self.memory = int(worker_memory_mb) * 2 ** 20   # bytes Ray reserves per actor
        self.address = address
        self.gpus_option = gpus_per_worker
        self.gpus_per_worker = 0.0
        self.where = ""
        self.actors: list[Any] = []          # started by ``probe``, used by ``run``
        # ``--runtime-env``: "auto"/"none"/JSON/a file, or already parsed ({} is auto)
        if isinstance(runtime_env, str):
            from .runtime_env import parse
            runtime_env = parse(runtime_env)
        self.runtime_env_option = runtime_env
        self.runtime_env: dict[str, Any] | None = None   # what the actors get (``start``)
        self.chunk_deadline_s = chunk_deadline_s
        self.node_wait_s = node_wait_s
        self.dataset_root: str | None = None   # a local dataset folder every node must read

    @property
    def cluster(self) -> bool:
        """Attached to a cluster (``--address``, ``RAY_ADDRESS``, a Ray job), not embedded."""
        return self.where.startswith("cluster")

    def start(self, cuda_devices: int = 0) -> None:
        """Attach or start Ray and size the pool from the cluster's resources. ``cuda_devices``:
        how many distinct CUDA devices one worker's cells use (cuda:0 and cuda:1 -> 2)."""
        import ray

        from .runtime_env import resolve
        cluster = bool(self.address or os.environ.get("RAY_ADDRESS")) and not ray.is_initialized()
        self.runtime_env = resolve(self.runtime_env_option, cluster)
        import copy   # Ray rewrites the dict it is given (local paths -> gcs:// URIs)
        self.where = ray_init(self.address, self.cap and self.cap * self.threads,
                              copy.deepcopy(self.runtime_env))
        if self.where == "existing session":
            self.runtime_env = None      # the session's own, whatever it is
        res = ray.cluster_resources()
        nodes = [nd["Resources"] for nd in ray.nodes() if nd.get("Alive")]
        by_cpu = sum(int(r.get("CPU", 0) // self.threads) for r in nodes)
        # Each actor holds torch, ONNX Runtime and OpenVINO and its models: a node hosts as
        # many as its CPUs allow *and* its memory (Ray's ``memory`` resource) holds.
        fit = sum(min(int(r.get("CPU", 0) // self.threads), int(r.get("memory", 0) // self.memory))
                  for r in nodes)
        if fit == 0:       # no node declares enough memory for one: size by CPUs alone
            self.memory = 0
            fit = by_cpu
        n = max(1, min(self.cap, fit) if self.cap else fit)
        if cuda_devices and res.get("GPU", 0):
            # Ray sets CUDA_VISIBLE_DEVICES to the GPUs it gives an actor, so cuda:N is the
            # actor's N-th GPU: it must get at least N+1 whole ones (a fraction only for cuda:0).
            per = self.gpus_option or 1.0
            self.gpus_per_worker = float(max(per, cuda_devices)) if cuda_devices > 1 else per
            fit = sum(min(int(r.get("CPU", 0)), int(r.get("GPU", 0) / self.gpus_per_worker + 1e-9))
                      for r in (nd["Resources"] for nd in ray.nodes() if nd.get("Alive")))
            n = max(1, min(n, fit))
        self.workers = n

    def _actor_class(self):
        import ray
        return ray.remote(num_cpus=self.threads, num_gpus=self.gpus_per_worker,
                          memory=self.memory, max_restarts=-1, max_task_retries=0,
                          scheduling_strategy="SPREAD")(_WorkerActor)

    def probe(self, plan: Plan) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
        """Start the workers and ask each which cells it cannot run, on its node with the GPUs
        it got. A cell is skipped when some worker's node cannot run it, so every row of a cell
        comes from machines able to run it; the reason names the node when nodes differ."""
        import ray
        actor_cls = self._actor_class()
        # The plan is passed by value (it is small): an actor restarted after a crash must not
        # depend on an object-store reference that may be gone.
        self.actors = [actor_cls.remote(plan) for _ in range(self.workers)]
        answers = {}
        errors: list[str] = []
        unreadable: list[str] = []
        for ref in [a.probe.remote(self.dataset_root) for a in self.actors]:
            try:
                name, env, reasons, readable = ray.get(ref)
            except _worker_lost_errors() as e:
                errors.append(_first_line(e))
                continue            # the scheduler restarts or replaces that worker
            answers[name] = (env, reasons)
            if not readable:
                unreadable.append(name)
        if unreadable:
            raise ExecutorError(f"the dataset {self.dataset_root} is a local path that node "
                                f"{unreadable[0]} cannot read; put it where every node reads it "
                                "(a shared mount at the same path, or s3:// / gs://)")
        if not answers:
            why = f" ({errors[0]})" if errors else ""
            hint = ("; the nodes lack dmx: let dmx ship it (--runtime-env auto) or install it there"
                    if any("No module named" in e for e in errors) else
                    "; run the same command again (with --verbose to see Ray's own messages)")
            raise WorkersLost(f"no Ray worker could start{why}{hint}")
        skipped: dict[str, str] = {}
        for name, (_, reasons) in answers.items():
            for cid, reason in reasons.items():
                everywhere = all(r.get(cid) == reason for _, r in answers.values())
                skipped.setdefault(cid, reason if everywhere else f"on node {name}: {reason}")
        return skipped, {name: env for name, (env, _) in answers.items()}

    def run(self, plan: Plan, chunks: Iterable[Chunk], on_summary: OnSummary) -> None:
        import ray
        actor_cls = self._actor_class()
        scheduler = _Scheduler(plan, lambda: actor_cls.remote(plan), self.workers, on_summary,
                               actors=self.actors or None, deadline_s=self.chunk_deadline_s,
                               node_wait_s=(self.node_wait_s if self.node_wait_s is not None
                                            else NODE_WAIT_S if self.cluster else 0.0))
        try:
            scheduler.run(chunks)
        finally:
            for a in scheduler.actors:
                ray.kill(a)


#: Deadlines: a chunk that has not finished ``DEADLINE_FACTOR`` times the slowest per-image
#: time seen so far (times its images) after it began on its worker - and at least
#: ``DEADLINE_FLOOR_S``, which covers the first chunks' model builds - is hung.
DEADLINE_FACTOR = 10.0
DEADLINE_FLOOR_S = 300.0
#: A loss is judged within this long: a node that is still alive by then (Ray's GCS marks a
#: silent node dead after ~15-20 s by default) lost its worker to a crash, not to preemption.
JUDGE_S = 60.0
NODE_WAIT_S = 300.0   # on a cluster: how long to wait for a node when none can host a worker


@dataclasses.dataclass
class _Job:
    """A chunk (or, once split, one image of it: ``piece``) and what happened to it so far."""

    chunk: Chunk
    piece: bool = False
    crashes: int = 0        # its worker died while processing it, its node surviving
    hangs: int = 0          # it passed its deadline and its worker was killed
    errors: int = 0         # the task itself raised


@dataclasses.dataclass
class _Loss:
    """A worker lost with ``job`` in flight, not yet judged crash or preemption."""

    job: _Job
    actor: int
    node: str | None        # the node the worker was on
    at: float               # time.monotonic() of the loss
    error: str


class _Scheduler:
    """At most two chunks in flight per actor (one running, one queued behind it). An actor whose
    task died is pinged; it gets work again once Ray has restarted it and the ping returns.

    A lost task is judged before it counts: if its worker's node left the cluster (preempted,
    scaled down) the chunk simply runs again; only a worker that died while its node lived -
    Ray restarts the actor there, or the node is still up ``JUDGE_S`` later - counts against
    the chunk. A chunk running past its deadline has its worker killed (Ray restarts it) and is
    rescheduled; hung again, it is split, and an image that hangs alone is quarantined."""

    def __init__(self, plan: Plan, new_actor: Callable[[], Any], workers: int,
                 on_summary: OnSummary, actors: list[Any] | None = None,
                 deadline_s: float | None = None, node_wait_s: float = 0.0) -> None:
        self.plan, self.new_actor, self.on_summary = plan, new_actor, on_summary
        self.node_wait_s = node_wait_s
        self.no_host_since: float | None = None          # when no node could host a worker
        self.skipped = dict(plan.skipped)
        self.actors = list(actors) if actors else [new_actor() for _ in range(workers)]
        workers = len(self.actors)
        self.node: dict[int, str] = {}                   # actor -> node id, once it answered
        self.answered: dict[int, float] = {}             # actor -> when its last ping returned
        self.replacements = workers * MAX_ATTEMPTS
        self.lost = _worker_lost_errors()
        self.queue: deque[_Job] = deque()
        self.pending: dict[Any, tuple[int, _Job]] = {}
        self.order: dict[int, list[Any]] = {i: [] for i in range(workers)}  # refs, as submitted
        self.began: dict[Any, float] = {}                # ref -> when its actor started it
        self.judging: list[_Loss] = []
        self.deadline_s = deadline_s
        self.per_image_s = 0.0                           # the slowest seen so far
        self.pings: dict[Any, int] = {}
        self.later: list[tuple[float, int]] = []          # (when, actor): ping a restarting actor
        self.backoff = {i: 0.2 for i in range(workers)}
        for i, actor in enumerate(self.actors):          # learn where each actor landed
            self.pings[actor.ping.remote()] = i
        self.healthy = set(range(workers))
        self.load = {i: 0 for i in range(workers)}
        self.pieces: dict[int, dict[str, ChunkResult]] = {}   # split chunk -> image id -> result
        self.parents: dict[int, Chunk] = {}
        self.fresh: Iterator[Chunk] | None = None         # chunks not yet queued
        self._alive: tuple[float, set[str] | None] = (0.0, None)

    def run(self, chunks: Iterable[Chunk]) -> None:
        """Run every chunk of ``chunks``, taken from it only as workers have room (the plan is
        never held whole: chunks are read from the chunk list as they are handed out)."""
        import ray
        import ray.exceptions as rex
        self.fresh = iter(chunks)
        self._refill()
        while self.queue or self.pending or self.fresh is not None or self.judging:
            self._judge()
            self._ping_due()
            self._submit()
            self._check_deadlines()
            if not (self.queue or self.pending or self.fresh is not None or self.judging):
                break                   # the last loss judged finished the run
            waiting = list(self.pending) + list(self.pings)
            if not waiting and not self.later and not self.judging:
                raise WorkersLost("every Ray worker is gone and none could be restarted; finished "
                                  "chunks are saved: run the same command with --resume")
            timeout = min([10.0] + [max(0.0, t - time.monotonic()) for t, _ in self.later]
                          + [self._next_deadline()] + ([1.0] if self.judging else []))
            if waiting:
                ready, _ = ray.wait(waiting, num_returns=1, timeout=timeout)
            else:                       # only restarting actors, to be pinged later
                time.sleep(timeout)
                ready = []
            if not ready:
                # No node with a CPU: the tasks pending on restarting actors cannot run either.
                # Asked first: pings of restarting actors come due every few seconds and would
                # otherwise keep the loop from ever asking (a run that waited forever).
                if not self._any_node_can_host():
                    self._wait_for_a_node()
                    continue
                self.no_host_since = None
                if self.later and min(t for t, _ in self.later) <= time.monotonic():
                    continue
                if self.judging or self._next_deadline() <= 0:
                    continue
                self._check_nodes()
                continue
            ref = ready[0]
            if ref in self.pings:
                self._pinged(ref)
                continue
            i, job = self.pending.pop(ref)
            began = self._finished(i, ref)
            try:
                result = ray.get(ref)
            except self.lost as e:
                self._lost(i, job, e)
                continue
            except rex.RayTaskError as e:     # the task itself raised: the worker lives on
                cause = getattr(e, "cause", None)
                if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise                       # a full disk: every chunk would fail, stop
                self._failed(job, e)
                continue
            if began is not None:
                self.per_image_s = max(self.per_image_s, (time.monotonic() - began)
                                       / max(1, len(job.chunk.images)))
            if job.piece:
                self._piece_done(job.chunk, result)
            else:
                self._report(result)

    def _wait_for_a_node(self) -> None:
        """No node can host a worker: an autoscaler or a preempted pool may bring one back, so
        wait ``node_wait_s`` (the actors Ray is restarting land on it) before giving up."""
        now = time.monotonic()
        if self.no_host_since is None:
            self.no_host_since = now
            if self.node_wait_s > 0:
                print(f"dmx: no node of the Ray cluster can run a worker; waiting up to "
                      f"{self.node_wait_s:g} s for one to join (--wait-for-nodes)", file=sys.stderr)
        # at least 2 s: one failed ``ray.nodes()`` (a GCS hiccup) is not a cluster without nodes
        if now - self.no_host_since >= max(self.node_wait_s, 2.0):
            raise WorkersLost(
                "no node of the Ray cluster can run a worker any more (a Ray process died or the "
                "nodes were removed" + (f"; none joined in {self.node_wait_s:g} s" if self.node_wait_s
                                        else "") + "); finished chunks are saved: run the same "
                "command with --resume")

    # ---------------------------------------------------------------- bookkeeping per actor
    def _finished(self, i: int, ref) -> float | None:
        """``ref`` left actor ``i``'s queue: the next one begins now. Returns when it began."""
        began = self.began.pop(ref, None)
        self.load[i] -= 1
        if ref in self.order[i]:
            self.order[i].remove(ref)
        if self.order[i] and self.order[i][0] not in self.began:
            self.began[self.order[i][0]] = time.monotonic()
        return began

    def _report(self, summary: ChunkSummary) -> None:
        if summary.write_error:
            print(f"dmx: chunk {summary.chunk}: {summary.write_error}; its rows are not saved "
                  "(run the same command with --resume to compute it again)", file=sys.stderr)
        self.on_summary(summary)

    def _ping_due(self) -> None:
        now = time.monotonic()
        for t, i in [x for x in self.later if x[0] <= now]:
            self.later.remove((t, i))
            self.pings[self.actors[i].ping.remote()] = i

    def _alive_nodes(self) -> set[str] | None:
        """Ids of the nodes Ray holds alive (asked at most once a second); None if the GCS is
        unreachable."""
        import ray
        at, alive = self._alive
        if alive is None or time.monotonic() - at > 1.0:
            try:
                alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
            except Exception:  # noqa: BLE001 - GCS unreachable: judged later, or WorkersLost
                alive = None
            self._alive = (time.monotonic(), alive)
        return alive

    def _any_node_can_host(self) -> bool:
        import ray
        try:
            return any(n.get("Alive") and n["Resources"].get("CPU", 0) >= 1 for n in ray.nodes())
        except Exception:  # noqa: BLE001 - the GCS itself is gone: nothing can host a worker
            return False

    def _pinged(self, ref) -> None:
        """A worker that lost a task answers once Ray has restarted it; one that is dead for
        good (restarts exhausted, or killed) is replaced by a new actor, a bounded number of
        times."""
        import ray
        import ray.exceptions as rex
        i = self.pings.pop(ref)
        try:
            self.node[i] = ray.get(ref)
            self.answered[i] = time.monotonic()
            self.healthy.add(i)
            self.backoff[i] = 0.2
        except rex.ActorUnavailableError:
            # Restarting - for as long as no node has a free CPU for it: ask again later, without
            # holding up the chunks the live workers finish meanwhile.
            self.later.append((time.monotonic() + self.backoff[i], i))
            self.backoff[i] = min(5.0, self.backoff[i] * 2)
        except self.lost:
            if self.replacements > 0:
                self.replacements -= 1
                self.actors[i] = self.new_actor()
                self.pings[self.actors[i].ping.remote()] = i

    def _refill(self) -> None:
        """Keep as many chunks queued as the workers can take (two per actor)."""
        want = 2 * len(self.actors) - sum(self.load.values())
        while self.fresh is not None and len(self.queue) < max(1, want):
            chunk = next(self.fresh, None)
            if chunk is None:
                self.fresh = None
                break
            self.queue.append(_Job(chunk))

    def _submit(self) -> None:
        self._refill()
        for i in sorted(self.healthy, key=self.load.get):
            while self.load[i] < 2:
                if not self.queue:
                    self._refill()
                if not self.queue:
                    break
                job = self.queue.popleft()
                actor = self.actors[i]
                ref = (actor.compute if job.piece else actor.process).remote(job.chunk, self.skipped)
                self.pending[ref] = (i, job)
                self.load[i] += 1
                self.order[i].append(ref)
                if len(self.order[i]) == 1:
                    self.began[ref] = time.monotonic()

    # ---------------------------------------------------------------- lost workers
    def _lost(self, i: int, job: _Job, error: BaseException) -> None:
        """A worker died with ``job`` in flight: requeue what waited behind it, and judge the
        loss (``_judge``) before it counts against the chunk."""
        if i in self.healthy:
            self.healthy.discard(i)
            self.pings[self.actors[i].ping.remote()] = i
        self._requeue_behind(i)
        node = self.node.get(i)
        loss = _Loss(job, i, node, time.monotonic(), type(error).__name__)
        if getattr(error, "preempted", False):
            self._preempted(loss)
        else:
            self.judging.append(loss)
            self._judge()

    def _judge(self) -> None:
        """Decide each pending loss: the node left the cluster -> preemption (no count); the
        worker came back on the same node, or the node is still alive after ``JUDGE_S`` (or
        unknown) -> a crash that counts."""
        if not self.judging:
            return
        alive = self._alive_nodes()
        now = time.monotonic()
        for loss in list(self.judging):
            if loss.node is not None and alive is not None and loss.node not in alive:
                verdict = "preempted"
            elif loss.node is None or (self.answered.get(loss.actor, 0.0) > loss.at
                                       and self.node.get(loss.actor) == loss.node):
                verdict = "crash"
            elif now - loss.at > JUDGE_S:
                verdict = "crash"
            else:
                continue
            self.judging.remove(loss)
            if verdict == "preempted":
                self._preempted(loss)
            else:
                self._crash(loss)

    def _preempted(self, loss: _Loss) -> None:
        node = (loss.node or "?")[:8]
        print(f"dmx: node {node} left the cluster with chunk {loss.job.chunk.index} in flight; "
              "the chunk runs again (a lost node is no chunk's fault)", file=sys.stderr)
        self.queue.appendleft(loss.job)

    def _crash(self, loss: _Loss) -> None:
        job = loss.job
        print(f"dmx: a worker died on chunk {job.chunk.index} ({loss.error}); its chunk is "
              "retried", file=sys.stderr)
        job.crashes += 1
        if job.crashes < MAX_ATTEMPTS - 1 or (job.piece and job.crashes < MAX_ATTEMPTS):
            self.queue.append(job)
        elif not job.piece and len(job.chunk.images) > 1:
            self._split(job)
        else:
            self._quarantine(job, "worker-crash",
                             f"the worker processing this image died {job.crashes} times "
                             f"({loss.error}); image quarantined")

    def _failed(self, job: _Job, error: BaseException) -> None:
        """The task raised (a bug, or a store that refused the part file beyond the worker's
        own retries): once more, then error rows naming the error; the run goes on."""
        job.errors += 1
        why = _first_line(error)
        print(f"dmx: chunk {job.chunk.index} failed in its worker ({why})"
              + ("; retried" if job.errors < 2 else "; its images get error rows"), file=sys.stderr)
        if job.errors < 2:
            self.queue.append(job)
        else:
            self._quarantine(job, "worker-error", f"the worker raised twice: {why}")

    def _split(self, job: _Job, hangs: int = 0) -> None:
        """Run a chunk's images one by one, to find the one at fault."""
        chunk = job.chunk
        self.parents[chunk.index] = chunk
        self.pieces[chunk.index] = {}
        self.queue.extend(_Job(Chunk(chunk.index, (img,), chunk.position), piece=True, hangs=hangs)
                          for img in chunk.images)

    def _quarantine(self, job: _Job, stage: str, message: str) -> None:
        res = error_result(self.plan, job.chunk, stage, message)
        if job.piece:
            self._piece_done(job.chunk, res)
        else:
            self._report(_write(self.plan, res))

    # ---------------------------------------------------------------- deadlines
    def _budget(self, job: _Job) -> float:
        """Seconds ``job`` may run once its worker began it."""
        if self.deadline_s:
            return self.deadline_s
        return max(DEADLINE_FLOOR_S, DEADLINE_FACTOR * self.per_image_s * len(job.chunk.images))

    def _next_deadline(self) -> float:
        """Seconds until the next running chunk passes its deadline (10 when none runs)."""
        now, left = time.monotonic(), 10.0
        for refs in self.order.values():
            if refs and refs[0] in self.began and refs[0] in self.pending:
                job = self.pending[refs[0]][1]
                left = min(left, self.began[refs[0]] + self._budget(job) - now)
        return max(0.0, left)

    def _check_deadlines(self) -> None:
        import ray
        now = time.monotonic()
        for i, refs in self.order.items():
            if not refs or refs[0] not in self.began or refs[0] not in self.pending:
                continue
            ref = refs[0]
            job = self.pending[ref][1]
            budget = self._budget(job)
            if now - self.began[ref] <= budget:
                continue
            print(f"dmx: chunk {job.chunk.index} passed its deadline ({budget:.0f} s) on worker "
                  f"{i}; the worker is killed and the chunk rescheduled", file=sys.stderr)
            del self.pending[ref]
            self._finished(i, ref)
            self._requeue_behind(i)
            self.healthy.discard(i)
            try:
                ray.kill(self.actors[i], no_restart=False)   # Ray starts it again
            except Exception:  # noqa: BLE001 - already dead: the ping below finds out
                pass
            self.pings[self.actors[i].ping.remote()] = i
            job.hangs += 1
            if job.hangs < 2:
                self.queue.appendleft(job)
            elif not job.piece and len(job.chunk.images) > 1:
                self._split(job, hangs=1)           # a piece that hangs again is the culprit
            else:
                self._quarantine(job, "worker-hang",
                                 f"inference did not finish within the chunk deadline "
                                 f"({budget:.0f} s) {job.hangs} times; image quarantined")

    def _check_nodes(self) -> None:
        """Nothing finished for a while. Chunks queued on an actor whose node has left the
        cluster, or on one that never started while a started worker idles (its node went away
        before it came up, and Ray keeps it pending), may wait forever - Ray does not fail them:
        they go back to the queue for the live workers."""
        busy = {i for i, _ in self.pending.values()}
        if not busy:
            return
        alive = self._alive_nodes()
        if alive is None:      # GCS unreachable: the idle check in run handles it
            return
        idle = any(self.load[j] == 0 and j in self.node for j in self.healthy)
        for i in busy:
            gone = i in self.node and self.node[i] not in alive
            if gone or (i not in self.node and idle):
                print(f"dmx: worker {i} {'lost its node' if gone else 'never started'}; "
                      "its chunks go to the other workers", file=sys.stderr)
                self.healthy.discard(i)
                self._requeue_behind(i)
                if gone:          # the first ping of one that never started is still out
                    del self.node[i]
                    self.pings[self.actors[i].ping.remote()] = i

    def _requeue_behind(self, i: int) -> None:
        """The chunks queued behind a lost task on the same actor wait for that actor to come
        back, which may be never (its node is gone and no other has a free CPU): they go back to
        the queue for the live workers. Should the old task still run, it writes the same part
        file (atomically, same name) and its summary is never read: no duplicate rows."""
        import ray
        for ref, (j, job) in list(self.pending.items()):
            if j == i:
                del self.pending[ref]
                self._finished(i, ref)
                try:
                    ray.cancel(ref)
                except Exception:  # noqa: BLE001 - best effort: the result is ignored anyway
                    pass
                self.queue.appendleft(job)
        self.order[i].clear()

    def _piece_done(self, piece: Chunk, result: ChunkResult) -> None:
        parts = self.pieces[piece.index]
        parts[piece.images[0].image_id] = result
        parent = self.parents[piece.index]
        if len(parts) == len(parent.images):
            import pyarrow as pa
            ordered = [parts[img.image_id] for img in parent.images]
            merged = ChunkResult(parent.index, pa.concat_tables([r.rows for r in ordered]),
                                 pa.concat_tables([r.images for r in ordered]),
                                 _sum_counters(r.counters for r in ordered),
                                 {k: v for r in ordered for k, v in r.backends.items()})
            del self.pieces[piece.index], self.parents[piece.index]
            self._report(_write(self.plan, merged))


def _sum_counters(counters: Iterable[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for c in counters:
        for k, v in c.items():
            out[k] = max(out.get(k, 0), v) if k.endswith("_max_abs") else out.get(k, 0) + v
    return out


def _write(plan: Plan, res: ChunkResult) -> ChunkSummary:
    """The driver writes a chunk only when it was split or quarantined (rare), with the same
    retries as a worker."""
    import pyarrow.compute as pc

    from dmx.results import RunDir

    from .worker import write_with_retries
    run = RunDir(plan.out)
    failure = write_with_retries(run, res)
    errors = pc.sum(pc.equal(res.rows["status"], "error")).as_py() or 0
    return ChunkSummary(res.chunk, 0 if failure else res.rows.num_rows, 0 if failure else errors,
                        res.images.num_rows, () if failure else (str(run.part_path(res.chunk)),),
                        res.counters, res.backends, "driver", write_error=failure)
