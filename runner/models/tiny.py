"""``tiny``: a small randomly initialised CNN (10 classes, 32x32 input) for fast unit tests.

Weights come from a fixed seed drawn inside ``torch.random.fork_rng`` so building it
neither depends on nor disturbs the global RNG (``tiny_net.py``, the only part that imports
torch). BatchNorm running statistics are randomised too, so BN folding in backends is
actually exercised.
"""

from __future__ import annotations

from typing import Any

from dmx.runner.models.base import ModelDef, Preprocess

SEED = 20240601
NUM_CLASSES = 10


def build() -> Any:
    """Build the deterministic tiny model (a torch ``nn.Module``), fp32, CPU, eval mode."""
    from dmx.runner.models.tiny_net import build as build_net
    return build_net()


def model_def() -> ModelDef:
    """Registry entry."""
    return ModelDef(
        name="tiny",
        task="classification",
        preprocess=Preprocess(mode="stretch", resize=32, crop=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
        build=build,
        weights_path=None,
        labels=tuple(f"class{i}" for i in range(NUM_CLASSES)),
        source=f"random init, torch.manual_seed({SEED}); no external weights",
    )
