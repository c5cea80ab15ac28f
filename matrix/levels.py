"""Levels of an axis as a spec writes them, checked and made canonical. Shared by the spec
parser (``spec``) and the schema (``schema``), below both."""
from __future__ import annotations

import re
from typing import Any, Mapping

from .axes import AXES
from .errors import SpecError

_CUDA = re.compile(r"^cuda(:\d+)?$")
_VARIANT = re.compile(r"^(\w+)(?::[0-9a-z]+|\[[^\]]+\])$")  # libjpeg:9e, pil[pillow==9.4.0]

# Caps on integer levels, with the reason a user sees beyond them.
INTEGER_CAPS: dict[str, tuple[int, str]] = {
    "threads": (1024, "more threads than cores only oversubscribe them, and libgomp runs out of "
                      "memory near 100000"),
    "batch": (4096, "a batch holds its inputs in memory at once: 4096 x 3 x 224 x 224 float32 "
                    "is 2.5 GB"),
}
DEFAULT_INTEGER_CAP = (65536, "an integer level this large is surely a typo")


def _reject_unknown(where: str, d: Mapping, allowed: tuple[str, ...]) -> None:
    for k in d:
        if k not in allowed:
            key = f"{where}.{k}" if where else str(k)
            raise SpecError(key, f"unknown key; allowed: {', '.join(allowed)}")


def normalise_level(axis: str, level: Any, key: str) -> str:
    """Canonical string for a level; mappings become ``name:build`` or ``name[package]``."""
    spec = AXES[axis]
    if isinstance(level, dict) and spec.mapping_levels:
        _reject_unknown(key, level, ("name", "build", "package"))
        name = level.get("name")
        if name not in spec.levels:
            raise SpecError(f"{key}.name", f"unknown {axis} {name!r}; allowed: {', '.join(spec.levels)}")
        if level.get("build") and level.get("package"):
            raise SpecError(key, "give build or package, not both")
        if level.get("build"):
            return normalise_level(axis, f"{name}:{level['build']}", key)
        if level.get("package"):
            return normalise_level(axis, f"{name}[{level['package']}]", key)
        return name
    if isinstance(level, bool) and set(spec.levels) == {"on", "off"}:
        level = "on" if level else "off"  # YAML 1.1 reads a bare on/off as a boolean
    if isinstance(level, bool) or not isinstance(level, (str, int)):
        raise SpecError(key, f"a level must be a string, got {level!r}")
    text = str(level)
    if spec.integer:
        if not text.isdigit() or int(text) < 1 or len(text) > 12:
            raise SpecError(key, f"{axis} levels are positive integers, got {text!r}")
        cap, why = INTEGER_CAPS.get(axis, DEFAULT_INTEGER_CAP)
        if int(text) > cap:
            raise SpecError(key, f"{axis} {text} is above {cap}: {why}")
        return text
    if axis == "device" and _CUDA.match(text):
        return text
    variant = _VARIANT.match(text) if spec.mapping_levels else None
    if variant and variant.group(1) in spec.levels:
        return text
    if text not in spec.levels:
        raise SpecError(key, f"unknown level {text!r}; allowed: {', '.join(spec.levels)}")
    if axis == "decoder" and text == "libjpeg":
        raise SpecError(key, "libjpeg needs a build, e.g. {name: libjpeg, build: 9e}")
    return text
