"""Ray workers are sized by each node's CPUs *and* memory: a worker holds three frameworks and
its models, so a node whose memory holds two starts two, whatever its CPU count."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import json, os
    os.environ.pop("RAY_ADDRESS", None)
    from ray.cluster_utils import Cluster
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 4, "memory": int(3.2 * 2 ** 30), "object_store_memory": 80 * 2 ** 20,
        "include_dashboard": False})
    from dmx.runner.executors import RayExecutor
    out = {}
    for name, kwargs in (("memory", {}), ("threads", {"threads_per_worker": 2, "worker_memory_mb": 64}),
                         ("cap", {"workers": 1})):
        ex = RayExecutor(address=cluster.address, **kwargs)
        ex.start()
        out[name] = [ex.workers, ex.threads, ex.memory]
    print(json.dumps(out))
    import ray
    ray.shutdown()
    cluster.shutdown()
""")


def test_a_node_starts_no_more_workers_than_its_memory_holds():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["memory"][0] == 2                 # 4 CPUs, but 3.2 GB holds two 1.5 GB workers
    assert got["threads"][:2] == [2, 2]          # 4 CPUs / 2 threads each
    assert got["cap"][0] == 1
