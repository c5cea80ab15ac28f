"""examples/slurm/dmx-ray.sbatch on a real single-node Slurm (Debian's slurm-wlm with munge,
started here as root with a private config, ports and spool): the batch job starts a Ray head
on its node, runs dmx against it and leaves no Ray behind. Dataset and run directory on moto's
S3 server. Skipped with the reason when Slurm or munge is not installed or not root."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster_nodes import BUCKET, REPO, RAY, clean_env, free_port, moto_s3, stop_group, upload_dir

pytestmark = pytest.mark.slow(reason="a private Slurm and a Ray job under sbatch (~50 s)")

SCRIPT = REPO / "examples" / "slurm" / "dmx-ray.sbatch"
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch")
N_IMAGES = 8


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "a private Slurm needs root (slurmd runs jobs as their user)"
    gone = [d for d in DAEMONS if not (shutil.which(d) or Path(f"/usr/sbin/{d}").exists())]
    if gone:
        return f"{', '.join(gone)} not installed (apt-get install slurm-wlm munge)"
    if not Path("/etc/munge/munge.key").is_file():
        return "no munge key (/etc/munge/munge.key)"
    return None


def _bin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """munged, slurmctld and slurmd in the foreground with a config naming this host; yields
    the environment that points Slurm's commands at them."""
    why = _missing()
    if why:
        pytest.skip(why)
    d = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool", "munge"):
        (d / sub).mkdir()
    os.chmod(d / "munge", 0o700)
    host = socket.gethostname().split(".")[0]
    sock = d / "munge" / "munge.socket"
    conf = d / "slurm.conf"
    conf.write_text(f"""ClusterName=dmxtest
SlurmctldHost={host}
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={sock}
CredType=cred/munge
StateSaveLocation={d / 'state'}
SlurmdSpoolDir={d / 'spool'}
SlurmctldPidFile={d / 'slurmctld.pid'}
SlurmdPidFile={d / 'slurmd.pid'}
SlurmctldLogFile={d / 'slurmctld.log'}
SlurmdLogFile={d / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/builtin
NodeName={host} CPUs={os.cpu_count()} RealMemory=2000 State=UNKNOWN
PartitionName=dmx Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")
    env = {**clean_env(), "SLURM_CONF": str(conf)}
    procs = []
    try:
        procs.append(subprocess.Popen(
            [_bin("munged"), "-F", "--force", f"--socket={sock}", "--key-file=/etc/munge/munge.key",
             f"--pid-file={d / 'munge' / 'munged.pid'}", f"--log-file={d / 'munge' / 'munged.log'}",
             f"--seed-file={d / 'munge' / 'munged.seed'}"],
            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _wait(lambda: sock.exists(), 30, "munged did not start")
        for daemon in ("slurmctld", "slurmd"):
            procs.append(subprocess.Popen([_bin(daemon), "-D", "-f", str(conf)], env=env,
                                          start_new_session=True, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
        _wait(lambda: "idle" in subprocess.run([_bin("sinfo"), "-h", "-o", "%t"], env=env,
                                               capture_output=True, text=True).stdout,
              60, f"the Slurm node did not come up: {_tail(d / 'slurmd.log')} {_tail(d / 'slurmctld.log')}")
        yield env, d
    finally:
        for p in reversed(procs):
            stop_group(p)


def _tail(p: Path) -> str:
    return p.read_text(errors="replace")[-800:] if p.exists() else ""


def _wait(ok, timeout: float, message: str) -> None:
    deadline = time.time() + timeout
    while not ok():
        if time.time() > deadline:
            raise RuntimeError(message)
        time.sleep(0.5)


@pytest.fixture(scope="module")
def s3():
    try:
        with moto_s3() as (fs, env):
            yield fs, env
    except FileNotFoundError as e:
        pytest.skip(str(e))


def test_the_sbatch_script_starts_ray_runs_dmx_and_leaves_no_ray_behind(
        slurm, s3, photo_dir: Path, tmp_path: Path):
    env, _ = slurm
    fs, aws = s3
    photos = tmp_path / "photos"
    photos.mkdir()
    good = sorted(photo_dir.glob("*.jpg"))
    for i in range(N_IMAGES):
        shutil.copy(good[i % len(good)], photos / f"img{i}.jpg")
    upload_dir(fs, photos, "slurm/photos")
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"name: slurm\ndataset: {{path: 's3://{BUCKET}/slurm/photos'}}\nmodel: tiny\n"
                    "axes: {decoder: [pil, opencv], backend: [torch, onnxruntime]}\n")
    ray_tmp = Path(__import__("tempfile").mkdtemp(prefix="dmxs", dir="/tmp"))
    ports = (f"--temp-dir {ray_tmp} --node-manager-port {free_port()} "
             f"--object-manager-port {free_port()} --dashboard-agent-listen-port {free_port()} "
             f"--dashboard-agent-grpc-port {free_port()} --metrics-export-port {free_port()} "
             f"--runtime-env-agent-port {free_port()}")
    job_env = {**env, **aws, "DMX_SPEC": str(spec), "DMX_OUT": f"s3://{BUCKET}/slurm/run",
               "DMX": f"{sys.executable} -m dmx", "RAY": RAY, "RAY_PORT": str(free_port()),
               "RAY_START_ARGS": ports, "DMX_CACHE": str(tmp_path / "cache"),
               "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    log = tmp_path / "job.log"
    r = subprocess.run([_bin("sbatch"), "--wait", "--nodes=1", f"--output={log}",
                        f"--chdir={tmp_path}", str(SCRIPT)], env=job_env, capture_output=True,
                       text=True, timeout=420)
    text = log.read_text(errors="replace") if log.exists() else ""
    print(text[-4000:])
    assert r.returncode == 0, (r.stdout + r.stderr + text)[-3000:]
    assert "dmx-slurm: Ray up with" in text and "dmx-slurm: run complete" in text
    assert f"x {N_IMAGES} images" in text
    with fs.open_input_stream(f"{BUCKET}/slurm/run/manifest.json") as f:
        m = json.loads(f.read())
    assert m["status"] == "complete" and m["counters"]["images"] == N_IMAGES
    # the job's Ray stopped with the job (only its own: identified by its temp dir)
    _wait(lambda: str(ray_tmp) not in subprocess.run(["ps", "-eo", "args"], capture_output=True,
                                                     text=True).stdout, 60,
          "the job's Ray processes outlived the job")
    shutil.rmtree(ray_tmp, ignore_errors=True)


def test_the_sbatch_script_without_a_spec_fails_with_one_line(slurm, tmp_path: Path):
    env, _ = slurm
    log = tmp_path / "job.log"
    r = subprocess.run([_bin("sbatch"), "--wait", "--nodes=1", f"--output={log}", str(SCRIPT)],
                       env={k: v for k, v in env.items() if not k.startswith("DMX_")},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "set DMX_SPEC" in log.read_text()
