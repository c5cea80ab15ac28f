"""How numbers are written in dmx's text, Markdown and HTML: compact, '-' for missing."""
from __future__ import annotations

import math


def g(v: float | None, digits: int = 3) -> str:
    """Compact number: 3 significant digits, '-' for missing, 'inf' kept."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.{digits - 1}e}"
    return f"{v:.{digits}g}"


def pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"
