"""What this machine can run: the cells whose decoder, decode options, backend and device it
lacks. Asked where the cells will run (each Ray node, or this process for the local executor),
never only on the driver: a CPU-only head must not skip the GPU nodes' work."""
from __future__ import annotations

import platform
from typing import Iterable

from dmx.matrix import Cell

from .backends import BACKENDS, InferSetting
from .backends.base import ModelArtifacts
from .decoders import unavailable_reason


def skip_reasons(cells: Iterable[Cell], artifacts: ModelArtifacts) -> dict[str, str]:
    """cell_id -> why that cell cannot run on this machine (cells that can run are absent)."""
    out: dict[str, str] = {}
    for c in cells:
        reason = unavailable_reason(dict(c.factors))
        if reason is None:
            setting = InferSetting.from_factors(dict(c.factors))
            reason = BACKENDS[setting.backend].unsupported(artifacts, setting)
        if reason:
            out[c.cell_id] = reason
    return out


def node_name(ray_node_id: str | None = None) -> str:
    """The ``node`` column: host name, plus the Ray node id's first 8 hex digits on Ray (several
    Ray nodes can share a host)."""
    host = platform.node() or "localhost"
    return f"{host}/{ray_node_id[:8]}" if ray_node_id else host
