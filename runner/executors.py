"""Executors run chunks through Workers: in-process (``local``) or on Ray actors (``ray``).

Workers write each chunk's part file themselves; the driver gets a small ``ChunkSummary`` per
chunk (counts, file names, counters, backend infos), in completion order, so its CPU and memory
stay flat however large the cluster or the dataset.
"""
from __future__ import annotations

import dataclasses
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
        from results.environment import fingerprint
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


def ray_init(address: str | None, workers: int | None) -> str:
    """Attach to ``address``/``RAY_ADDRESS`` with Ray's own auth configuration (RAY_AUTH_MODE,
    RAY_AUTH_TOKEN*), reuse a running session, or start an embedded local Ray with no dashboard,
    a bounded object store and temp files under dmx's cache, whose processes die with this one."""
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
            ray.init(address=address, **common)
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
             object_store_memory=512 * 1024 * 1024, _temp_dir=str(tmp), **common)
    return "local"


class _WorkerActor:
    """A Ray actor holding one Worker (and its compiled models) for the whole run. It is made
    before the driver knows which cells every node can run - it answers that itself (``probe``),
    so no separate process imports the libraries first - and each chunk carries the cells
    skipped run-wide (a few ids; a restarted actor gets them with its next chunk)."""

    def __init__(self, plan: Plan) -> None:
        import ray
        self.worker = Worker(plan, node_name(ray.get_runtime_context().get_node_id()))

    def probe(self) -> tuple[str, dict, dict[str, str]]:
        """(node, its environment, cell id -> why this node cannot run that cell)."""
        from results.environment import fingerprint
        plan = self.worker.plan
        return self.worker.node, fingerprint(), skip_reasons(plan.cells, plan.artifacts)

    def _skip(self, skipped: dict[str, str]) -> None:
        if dict(self.worker.plan.skipped) != skipped:
            self.worker.plan = dataclasses.replace(self.worker.plan, skipped=skipped)

    def process(self, chunk: Chunk, skipped: dict[str, str]) -> ChunkSummary:
        """Compute ``chunk`` and write its part file; report a summary."""
        self._skip(skipped)
        return self.worker.run_chunk(chunk)

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


class RayExecutor:
    """Chunks as tasks on long-lived actors, one per CPU the cluster offers (``workers`` caps
    it), spread over the nodes by Ray's SPREAD strategy; models are built once per actor. Ray
    restarts a crashed actor (``max_restarts``); the driver resubmits its chunk to any live
    actor, and a chunk that keeps killing workers is split so the one image at fault ends as
    error rows (quarantine) while the run completes."""

    name = "ray"

    # Ray restarts a dead actor for as long as it takes (a node may come back); the attempt
    # count per chunk, not the restart count, bounds how often one input may kill a worker.
    def __init__(self, workers: int | None = None, address: str | None = None,
                 gpus_per_worker: float | None = None, threads_per_worker: int = 1,
                 worker_memory_mb: int = WORKER_MEMORY_MB) -> None:
        self.cap = workers
        self.workers = max(1, workers or os.cpu_count() or 1)
        self.threads = max(1, threads_per_worker)
        self.memory = int(worker_memory_mb) * 2 ** 20   # bytes Ray reserves per actor
        self.address = address
        self.gpus_option = gpus_per_worker
        self.gpus_per_worker = 0.0
        self.where = ""
        self.actors: list[Any] = []          # started by ``probe``, used by ``run``

    def start(self, cuda_devices: int = 0) -> None:
        """Attach or start Ray and size the pool from the cluster's resources. ``cuda_devices``:
        how many distinct CUDA devices one worker's cells use (cuda:0 and cuda:1 -> 2)."""
        self.where = ray_init(self.address, self.cap and self.cap * self.threads)
        import ray
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
        for ref in [a.probe.remote() for a in self.actors]:
            try:
                name, env, reasons = ray.get(ref)
            except _worker_lost_errors():
                continue            # the scheduler restarts or replaces that worker
            answers[name] = (env, reasons)
        if not answers:
            raise WorkersLost("no Ray worker could start; run the same command again (with "
                              "--verbose to see Ray's own messages)")
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
                               actors=self.actors or None)
        try:
            scheduler.run(chunks)
        finally:
            for a in scheduler.actors:
                ray.kill(a)


class _Scheduler:
    """At most two chunks in flight per actor (one running, one queued behind it). An actor whose
    task died is pinged; it gets work again once Ray has restarted it and the ping returns."""

    def __init__(self, plan: Plan, new_actor: Callable[[], Any], workers: int,
                 on_summary: OnSummary, actors: list[Any] | None = None) -> None:
        self.plan, self.new_actor, self.on_summary = plan, new_actor, on_summary
        self.skipped = dict(plan.skipped)
        self.actors = list(actors) if actors else [new_actor() for _ in range(workers)]
        workers = len(self.actors)
        self.node: dict[int, str] = {}                   # actor -> node id, once it answered
        self.replacements = workers * MAX_ATTEMPTS
        self.lost = _worker_lost_errors()
        self.queue: deque[tuple[Chunk, int, bool]] = deque()   # chunk, attempt, is a piece
        self.pending: dict[Any, tuple[int, Chunk, int, bool]] = {}
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

    def run(self, chunks: Iterable[Chunk]) -> None:
        """Run every chunk of ``chunks``, taken from it only as workers have room (the plan is
        never held whole: chunks are read from the chunk list as they are handed out)."""
        import ray
        self.fresh = iter(chunks)
        self._refill()
        while self.queue or self.pending or self.fresh is not None:
            self._ping_due()
            self._submit()
            waiting = list(self.pending) + list(self.pings)
            if not waiting and not self.later:
                raise WorkersLost("every Ray worker is gone and none could be restarted; finished "
                                  "chunks are saved: run the same command with --resume")
            timeout = min([10.0] + [max(0.0, t - time.monotonic()) for t, _ in self.later])
            if waiting:
                ready, _ = ray.wait(waiting, num_returns=1, timeout=timeout)
            else:                       # only restarting actors, to be pinged later
                time.sleep(timeout)
                ready = []
            if not ready:
                if self.later and min(t for t, _ in self.later) <= time.monotonic():
                    continue
                self._check_nodes()
                if not self.pending and not self._any_node_can_host():
                    raise WorkersLost(
                        "no node of the Ray cluster can run a worker any more (a Ray process died "
                        "or the nodes were removed); finished chunks are saved: run the same "
                        "command with --resume")
                continue
            ref = ready[0]
            if ref in self.pings:
                self._pinged(ref)
                continue
            i, chunk, attempt, piece = self.pending.pop(ref)
            self.load[i] -= 1
            try:
                result = ray.get(ref)
            except self.lost as e:
                self._lost(i, chunk, attempt, piece, e)
                continue
            if piece:
                self._piece_done(chunk, result)
            else:
                self.on_summary(result)

    def _ping_due(self) -> None:
        now = time.monotonic()
        for t, i in [x for x in self.later if x[0] <= now]:
            self.later.remove((t, i))
            self.pings[self.actors[i].ping.remote()] = i

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
            self.queue.append((chunk, 0, False))

    def _submit(self) -> None:
        self._refill()
        for i in sorted(self.healthy, key=self.load.get):
            while self.load[i] < 2:
                if not self.queue:
                    self._refill()
                if not self.queue:
                    break
                chunk, attempt, piece = self.queue.popleft()
                actor = self.actors[i]
                ref = (actor.compute if piece else actor.process).remote(chunk, self.skipped)
                self.pending[ref] = (i, chunk, attempt, piece)
                self.load[i] += 1

    def _lost(self, i: int, chunk: Chunk, attempt: int, piece: bool, error: BaseException) -> None:
        print(f"dmx: a worker died on chunk {chunk.index} ({type(error).__name__}); "
              "its chunk is retried", file=sys.stderr)
        if i in self.healthy:
            self.healthy.discard(i)
            self.pings[self.actors[i].ping.remote()] = i
        self._requeue_behind(i)
        attempt += 1
        if attempt < MAX_ATTEMPTS - 1 or (piece and attempt < MAX_ATTEMPTS):
            self.queue.append((chunk, attempt, piece))
        elif not piece and len(chunk.images) > 1:
            # Kills its worker again and again: run its images one by one to find the culprit.
            self.parents[chunk.index] = chunk
            self.pieces[chunk.index] = {}
            self.queue.extend((Chunk(chunk.index, (img,)), 0, True) for img in chunk.images)
        else:
            message = (f"the worker processing this image died {attempt} times "
                       f"({type(error).__name__}); image quarantined")
            res = error_result(self.plan, chunk, "worker-crash", message)
            if piece:
                self._piece_done(chunk, res)
            else:
                self.on_summary(_write(self.plan, res))

    def _check_nodes(self) -> None:
        """Nothing finished for a while. Chunks queued on an actor whose node has left the
        cluster, or on one that never started while a started worker idles (its node went away
        before it came up, and Ray keeps it pending), may wait forever - Ray does not fail them:
        they go back to the queue for the live workers."""
        import ray
        busy = {i for i, *_ in self.pending.values()}
        if not busy:
            return
        try:
            alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        except Exception:  # noqa: BLE001 - GCS unreachable: the idle check in run handles it
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
        for ref, (j, chunk, attempt, piece) in list(self.pending.items()):
            if j == i:
                del self.pending[ref]
                self.load[i] -= 1
                try:
                    ray.cancel(ref)
                except Exception:  # noqa: BLE001 - best effort: the result is ignored anyway
                    pass
                self.queue.appendleft((chunk, attempt, piece))

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
            self.on_summary(_write(self.plan, merged))


def _sum_counters(counters: Iterable[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for c in counters:
        for k, v in c.items():
            out[k] = max(out.get(k, 0), v) if k.endswith("_max_abs") else out.get(k, 0) + v
    return out


def _write(plan: Plan, res: ChunkResult) -> ChunkSummary:
    """The driver writes a chunk only when it was split or quarantined (rare)."""
    import pyarrow.compute as pc

    from results import RunDir
    run = RunDir(plan.out)
    run.write_chunk(res.chunk, res.rows, res.images)
    errors = pc.sum(pc.equal(res.rows["status"], "error")).as_py() or 0
    return ChunkSummary(res.chunk, res.rows.num_rows, errors, res.images.num_rows,
                        (str(run.part_path(res.chunk)),), res.counters, res.backends, "driver")
