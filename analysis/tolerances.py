"""Default tolerances per precision: torch.testing's table, scaled for a whole forward pass.

Shared by the gate (``dmx.analysis.check``) and explain's tolerance verdicts; see ``dmx.analysis.check``
for why relative L2 and why the factor 10.
"""
from __future__ import annotations

# torch.testing.assert_close's default (rtol, atol) per dtype; tf32 has fp16's 10-bit mantissa.
TORCH_TESTING = {"fp32": (1.3e-6, 1e-5), "fp16": (1e-3, 1e-5), "bf16": (1.6e-2, 1e-5)}
RTOL = {"fp32": 1.3e-6, "tf32": 1e-3, "fp16": 1e-3, "bf16": 1.6e-2}
WHOLE_MODEL_ALLOWANCE = 10.0  # the table is per op; a forward pass chains many
DEFAULT_MIN_COSINE = 0.999
DEFAULT_MIN_TOP1 = 1.0
MANTISSA_BITS = {"fp32": 23, "tf32": 10, "fp16": 10, "bf16": 7, "int8": 0}
COS_EPS = 1e-6   # a row "diverges" when 1 - cosine exceeds this (or its input/shape differs)


def precision_family(name: str | None) -> str | None:
    """``fp32``/``tf32``/``fp16``/``bf16``/``int8`` for a precision label (``int8+bf16`` -> int8),
    None when unknown."""
    if not name:
        return None
    base = name.split("+")[0].strip().lower()
    return base if base in MANTISSA_BITS else None


def default_limits(family: str | None) -> dict[str, float | None]:
    """Per-row limits when the user sets none, for a cell that ran at ``family``."""
    rtol = RTOL.get(family or "")
    return {"max_abs": None,
            "max_rel_l2": rtol * WHOLE_MODEL_ALLOWANCE if rtol is not None else None,
            "min_cosine": DEFAULT_MIN_COSINE if family != "int8" else None}


def split_text(parts: list[tuple[str | None, int]]) -> str:
    """How a cell's rows split by the precision they ran at, e.g. "ran bf16 on 10 and fp32 on 10
    of 20 images" (``parts``: (precision, rows), most rows first)."""
    named = [f"{p or 'unknown'} on {n}" for p, n in parts]
    return (f"ran {', '.join(named[:-1])} and {named[-1]} of {sum(n for _, n in parts)} images"
            if len(named) > 1 else f"ran {named[0]} images")
