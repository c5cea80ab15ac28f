"""Real torch models that behave as models do on a bad day, for the cluster fault tests: one
whose forward takes seconds (a chunk stays in flight long enough to lose its node), and one
whose forward never returns on a dark image (a hung inference). Named by a spec as
``model: {torch: "faultmodels:slow"}`` (trusted code) and shipped to bare nodes with
``--runtime-env '{"py_modules": ["tests/faultmodels"]}'``.

Each inference on real input (not the all-zero warm-up batch) leaves a file
``infer-<Ray node id>-<random>`` in ``$DMX_TEST_MARKERS`` when that variable names a folder, so
a test knows a chunk is in flight, and on which node.
"""
from __future__ import annotations

import os
import time
import uuid

import torch
from torch import nn

DARK = -0.95         # mean of an input normalised with mean=std=0.5 below this: a black image


def _node() -> str:
    try:
        import ray
        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
    except ImportError:
        return "local"


class Net(nn.Module):
    def __init__(self, delay_s: float = 0.0, hang_on_dark: bool = False) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(7)
            self.conv = nn.Conv2d(3, 8, 3, stride=2)
            self.fc = nn.Linear(8, 10)
        self.delay_s, self.hang_on_dark = delay_s, hang_on_dark

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.abs().sum() > 0):
            folder = os.environ.get("DMX_TEST_MARKERS")
            if folder:
                open(os.path.join(folder, f"infer-{_node()}-{uuid.uuid4().hex}"), "w").close()
            if self.hang_on_dark and bool((x.flatten(1).mean(1) < DARK).any()):
                time.sleep(3600)
            time.sleep(self.delay_s)
        y = nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 1).flatten(1)
        return self.fc(y)


def slow() -> nn.Module:
    """Each batch of real input takes ``$DMX_TEST_DELAY_S`` seconds (default 3)."""
    return Net(delay_s=float(os.environ.get("DMX_TEST_DELAY_S", "3"))).eval()


def hangs_on_dark() -> nn.Module:
    """Never returns from a batch holding a black image; fast otherwise."""
    return Net(hang_on_dark=True).eval()
