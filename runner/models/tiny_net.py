"""The ``tiny`` model's network (``tiny.py`` registers it without importing torch).

Weights come from a fixed seed drawn inside ``torch.random.fork_rng`` so building it
neither depends on nor disturbs the global RNG. BatchNorm running statistics are
randomised too, so BN folding in backends is actually exercised.
"""

from __future__ import annotations

import torch
from torch import nn

from dmx.runner.models.tiny import NUM_CLASSES, SEED


class TinyNet(nn.Module):
    """conv-bn-relu, maxpool, conv-bn-relu, global average pool, linear."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(x)


def build() -> nn.Module:
    """Build the deterministic tiny model, fp32, CPU, eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = TinyNet()
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.BatchNorm2d):
                    n = module.num_features
                    module.weight.copy_(torch.rand(n) + 0.5)
                    module.bias.copy_(torch.randn(n) * 0.1)
                    module.running_mean.copy_(torch.randn(n) * 0.1)
                    module.running_var.copy_(torch.rand(n) + 0.5)
    return model.float().eval()
