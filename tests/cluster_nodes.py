"""Real clusters on this machine for the tests: a Ray head started by `ray start`, worker nodes
that share nothing with the driver (each a `ray start --block` in its own mount and PID
namespace), and moto's S3 server on localhost as the only storage every node can reach.

An isolated node sees the Python interpreter and the virtual environment's libraries (what an
image of a cluster node would hold), and nothing else of this machine's that a dmx driver
wrote or owns: private tmpfs over /tmp, ~/.cache and ~/.ray, and over the checkout of dmx
(the virtual environment inside it is bound back). Its launcher checks that the paths named in
``hidden`` are gone before Ray starts, and prints ``dmx-node: isolated`` (the tests read it).
"""
from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pyarrow.fs as pafs

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
BUCKET = "audits"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without what would leak the driver's state into a node or
    a driver under test: Ray auth settings an embedded session left, dmx's cache, the address."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_AUTH", "DMX_")) and k not in ("RAY_ADDRESS", "PYTHONPATH")}
    env["RAY_AUTH_MODE"] = "disabled"
    # where Ray reads (and, in its default token mode, creates) a token: never the user's
    # ~/.ray/auth_token, which would switch every later `ray start` on the machine to tokens
    env["RAY_AUTH_TOKEN_PATH"] = str(Path(tempfile.gettempdir()) / f"dmx-test-ray-token-{os.getpid()}")
    env.update(extra)
    return env


def namespaces_permitted() -> str | None:
    """None when this process may make mount+PID namespaces and mount tmpfs (root, or a
    container allowing it), else why not."""
    if not shutil.which("unshare"):
        return "unshare (util-linux) is not installed"
    r = subprocess.run(["unshare", "--mount", "--pid", "--fork", "--mount-proc", "/bin/sh", "-c",
                        "mount --make-rprivate / && mount -t tmpfs tmpfs /mnt"],
                       capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        return f"mount namespaces are not permitted here ({r.stderr.strip().splitlines()[-1:]})"
    return None


_BLOCK = 250                      # ports per node: six fixed ones, then its workers'


def _port_block() -> int:
    """The first of ``_BLOCK`` consecutive free ports between 20000 and 32000: below Linux's
    ephemeral range (``free_port``'s picks and outgoing connections never land in it) and
    above Ray's default worker ports (10002-19999, other Rays on this machine)."""
    import random
    for _ in range(200):
        base = random.randrange(20000, 32000 - _BLOCK, 10)
        socks = []
        try:
            for p in range(base, base + _BLOCK):
                s = socket.socket()
                socks.append(s)
                s.bind(("0.0.0.0", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no block of free ports between 20000 and 32000")


def _node_ports(node_manager_port: int | None = None) -> list[str]:
    """Every port a Ray node opens, from a block of its own, so nodes on one machine (and other
    engineers' Rays) never collide on Ray's fixed defaults (the agent's 52365, the metrics
    port) or on each other's worker ports."""
    b = _port_block()
    return ["--node-manager-port", str(node_manager_port or b),
            "--object-manager-port", str(b + 1), "--dashboard-agent-listen-port", str(b + 2),
            "--dashboard-agent-grpc-port", str(b + 3), "--metrics-export-port", str(b + 4),
            "--runtime-env-agent-port", str(b + 5),
            "--min-worker-port", str(b + 10), "--max-worker-port", str(b + _BLOCK - 1)]


def stop_group(proc: subprocess.Popen, grace_s: float = 3.0) -> None:
    """SIGTERM the process group, SIGKILL it after ``grace_s``."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 30)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


class Head:
    """`ray start --head --block` with no CPUs (no worker runs on it), in its own process group
    and temp dir; ``dashboard=True`` also starts the dashboard and its job server, which
    `ray job submit` talks to (``job_address``)."""

    def __init__(self, env: dict[str, str], dashboard: bool = False, num_cpus: int = 0) -> None:
        self.port = free_port()
        self.dashboard_port = free_port()
        self.tmp = Path(tempfile.mkdtemp(prefix="dmxh", dir="/tmp"))
        cmd = [RAY, "start", "--head", "--block", "--port", str(self.port),
               "--num-cpus", str(num_cpus), "--disable-usage-stats", "--temp-dir", str(self.tmp),
               *_node_ports()]
        cmd += (["--include-dashboard=true", "--dashboard-host", "127.0.0.1",
                 "--dashboard-port", str(self.dashboard_port)] if dashboard
                else ["--include-dashboard=false"])
        self.log = open(self.tmp / "head.log", "w")
        self.proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        self.address = f"127.0.0.1:{self.port}"
        self.job_address = f"http://127.0.0.1:{self.dashboard_port}"

    def nodes(self) -> list[dict]:
        """The cluster's alive nodes, as ``ray.nodes()`` says, asked of one long-lived process
        attached to this head (a ``ray.init`` per question took tens of seconds under load)."""
        if getattr(self, "_watcher", None) is None or self._watcher.poll() is not None:
            code = ("import json, sys, ray\n"
                    f"ray.init(address={self.address!r}, logging_level='ERROR')\n"
                    "for _ in sys.stdin:\n"
                    "    print(json.dumps([n for n in ray.nodes() if n['Alive']]), flush=True)\n")
            env = clean_env()
            env.pop("RAY_AUTH_MODE")
            self._watcher = subprocess.Popen([sys.executable, "-c", code], env=env, text=True,
                                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                             stderr=subprocess.DEVNULL)
        self._watcher.stdin.write("\n")
        self._watcher.stdin.flush()
        while True:
            line = self._watcher.stdout.readline()
            if not line:
                raise RuntimeError("lost the connection to the Ray head")
            if line.startswith("["):     # Ray may print its own lines to stdout first
                return json.loads(line)

    def wait_nodes(self, n: int, timeout: float = 180) -> list[dict]:
        """Block until ``n`` nodes (this head included) are alive; returns them."""
        deadline = time.time() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the Ray head exited: {(self.tmp / 'head.log').read_text()[-1500:]}")
            try:
                nodes = self.nodes()
            except RuntimeError:
                nodes = []
                self._watcher = None
            if len(nodes) >= n:
                return nodes
            if time.time() > deadline:
                raise RuntimeError(f"{n} Ray nodes did not come up in {timeout} s "
                                   f"({len(nodes)} alive)")
            time.sleep(0.5)

    def stop(self) -> None:
        if getattr(self, "_watcher", None) is not None:
            self._watcher.kill()
            self._watcher.wait()
        stop_group(self.proc)
        self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


_LAUNCHER = r"""
set -e
mount --make-rprivate /
keep_venv="$1"; repo="$2"; shift 2
# the venv is set aside before /tmp and the repo are covered: a checkout under /tmp (a CI
# clone in /tmp/x) would otherwise hide its own venv
mount -t tmpfs tmpfs /mnt
if [ -n "$keep_venv" ]; then
  mkdir /mnt/venv && mount --bind "$keep_venv" /mnt/venv
fi
mount -t tmpfs tmpfs /tmp
mkdir -p "$repo" && mount -t tmpfs tmpfs "$repo"
if [ -n "$keep_venv" ]; then
  mkdir -p "$keep_venv" && mount --move /mnt/venv "$keep_venv"
fi
mkdir -p "$HOME/.cache" "$HOME/.ray"
mount -t tmpfs tmpfs "$HOME/.cache"
mount -t tmpfs tmpfs "$HOME/.ray"
while [ "$1" != "--" ]; do
  if [ -e "$1" ]; then echo "dmx-node: $1 is visible"; exit 3; fi
  shift
done
shift
echo "dmx-node: isolated"
exec "$@"
"""


# The launcher makes these folders as mount points for its tmpfs; the folder is made on this
# machine's disk, so it would outlive the nodes. The ones this test session made are removed
# again when it ends, if still empty (rmdir never removes anything inside).
_MOUNT_POINTS = {p: p.exists() for p in (Path.home() / ".cache", Path.home() / ".ray")}


@atexit.register
def _remove_mount_points() -> None:
    for path, existed in _MOUNT_POINTS.items():
        if not existed:
            with contextlib.suppress(OSError):
                path.rmdir()


class IsolatedNode:
    """A Ray worker node in its own mount and PID namespaces (see the module docstring). Killing
    the ``unshare`` process kills every process of the node at once, as a preempted machine
    goes: ``kill()``."""

    def __init__(self, head_address: str, env: dict[str, str], hidden: list[str],
                 num_cpus: int = 1, log: Path | None = None) -> None:
        venv = Path(sys.prefix).resolve()
        keep = str(venv) if REPO in venv.parents else ""
        self.log_path = log or Path(tempfile.mkstemp(prefix="dmx-node-", suffix=".log")[1])
        self.log = open(self.log_path, "w")
        cmd = ["unshare", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc",
               "/bin/sh", "-c", _LAUNCHER, "dmx-node", keep, str(REPO), *hidden, "--",
               RAY, "start", "--block", "--address", head_address, "--num-cpus", str(num_cpus),
               "--disable-usage-stats", *_node_ports()]
        self.proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=self.log,
                                     stderr=subprocess.STDOUT)

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL the node: its raylet, agents and workers die together (PID namespace)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)

    def stop(self) -> None:
        stop_group(self.proc)
        self.log.close()


class PlainNode:
    """A Ray worker node as `ray start --block --address HEAD` on this machine, in its own
    process group (it sees this machine's files: for the fault tests, where what matters is how
    the driver treats a node that vanishes). ``kill()`` is a preemption: SIGKILL to the raylet
    and every worker at once."""

    def __init__(self, head_address: str, env: dict[str, str], num_cpus: int = 1) -> None:
        self.log_path = Path(tempfile.mkstemp(prefix="dmx-plain-node-", suffix=".log")[1])
        self.log = open(self.log_path, "w")
        ports = _node_ports()
        self.port = int(ports[1])     # its node manager's: how ``ray.nodes()`` names it
        self.tmp = Path(tempfile.mkdtemp(prefix="dmxn", dir="/tmp"))   # its own sockets, logs
        self.proc = subprocess.Popen([RAY, "start", "--block", "--address", head_address,
                                      "--num-cpus", str(num_cpus), "--disable-usage-stats",
                                      "--temp-dir", str(self.tmp), *ports], env=env,
                                     start_new_session=True,
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        """What `ray start` printed, and the end of its raylet's error log."""
        self.log.flush()
        raylet = sorted(self.tmp.glob("session_*/logs/raylet.err")) + sorted(
            self.tmp.glob("session_*/logs/raylet.out"))
        tail = "".join(p.read_text(errors="replace")[-1500:] for p in raylet[:2])
        return self.log_path.read_text(errors="replace")[-1500:] + "\n" + tail

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)
        self.stop()                   # nothing left to stop: its files go

    def stop(self) -> None:
        stop_group(self.proc)
        self.log.close()
        self.log_path.unlink(missing_ok=True)
        shutil.rmtree(self.tmp, ignore_errors=True)


#: Ray's GCS marks a silent node dead after period x threshold (defaults 3 s x 5, ~20 s seen
#: here); heads of the fault tests notice a killed node in ~5 s. Tighter (300 ms) made the
#: GCS declare live but busy nodes dead on this loaded 2-core machine.
FAST_NODE_DEATH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "2000",
                   "RAY_health_check_failure_threshold": "5"}


@contextlib.contextmanager
def moto_s3() -> Iterator[tuple[pafs.S3FileSystem, dict[str, str]]]:
    """moto_server on a free port with one bucket: (its filesystem, the AWS variables that point
    an S3 client at it). Raises RuntimeError if moto[server] is missing (callers skip)."""
    server = Path(sys.executable).with_name("moto_server")
    if not server.exists():
        raise FileNotFoundError("moto[server] is not installed (pip install -e '.[test]')")
    port = free_port()
    proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto_server did not start")
                time.sleep(0.2)
        fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http",
                               access_key="testing", secret_key="testing", region="us-east-1",
                               allow_bucket_creation=True)
        fs.create_dir(BUCKET)
        yield fs, env
    finally:
        stop_group(proc)


def s3_keys(fs: pafs.S3FileSystem, prefix: str) -> list[str]:
    """Every object under ``BUCKET/prefix`` (paths relative to it)."""
    sel = pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True, allow_not_found=True)
    return sorted(i.path.split(f"{BUCKET}/{prefix}/", 1)[1] for i in fs.get_file_info(sel)
                  if i.type == pafs.FileType.File)


def upload_dir(fs: pafs.S3FileSystem, local: Path, prefix: str) -> None:
    pafs.copy_files(str(local), f"{BUCKET}/{prefix}", source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)
