"""YAML in, plain data out - safely and within bounds.

A spec is data from anyone (a colleague's repo, a CI job), so reading one must never run code,
exhaust memory or the stack, or end in a traceback. ``load_yaml_bounded`` reads through PyYAML's
safe loader after a pass over the event stream that bounds what the safe loader alone does not:
file size, nesting depth, node count with aliases expanded (a "billion laughs" is a few lines),
aliases that refer to the node they are in, integers with thousands of digits; and it refuses
duplicate keys (YAML says a key is unique; PyYAML lets the last one win silently). Dates are left
as text: no spec value is a date, and a date key broke every later step.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import yaml

from .errors import SpecError

try:  # libyaml's parser is iterative and fast; the pure-Python one is the fallback
    from yaml import CSafeLoader as _BaseLoader
except ImportError:  # pragma: no cover - libyaml is in every wheel we install
    from yaml import SafeLoader as _BaseLoader  # type: ignore[assignment]


@dataclass(frozen=True)
class YamlLimits:
    """What a spec may cost to read. Real specs are a few KB, depth < 8, < 500 nodes."""

    max_bytes: int = 1 << 20
    max_depth: int = 64
    max_nodes: int = 100_000  # with aliases expanded
    max_int_digits: int = 30


LIMITS = YamlLimits()


class _Loader(_BaseLoader):  # type: ignore[misc, valid-type]
    """Safe loader without timestamps, refusing duplicate keys, non-text keys and huge ints."""

    limits = LIMITS


# The safe resolver's implicit types minus timestamps: `2020-01-01` stays the text it reads as.
_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for ch, resolvers in _BaseLoader.yaml_implicit_resolvers.copy().items()
}


def _where(node: yaml.Node) -> str:
    m = node.start_mark
    return f"line {m.line + 1}, column {m.column + 1}"


def _key_path(path: list[str]) -> str:
    return ".".join(path)


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    out: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            raise SpecError("", f"{_where(key_node)}: a key must be a plain name, not a "
                                f"{'list' if isinstance(key_node, yaml.SequenceNode) else 'mapping'}")
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, str):
            # `1:`, `true:`, `null:`: YAML reads them as numbers/booleans; spec keys are names.
            raise SpecError(str(key_node.value), f"{_where(key_node)}: a key must be a name "
                            f"(YAML reads {key_node.value!r} as a {type(key).__name__}); quote it "
                            "if you mean the text")
        if key in out:
            raise SpecError(key, f"{_where(key_node)}: duplicate key (YAML keys are unique; "
                                 "remove one of them)")
        out[key] = loader.construct_object(value_node, deep=deep)
    return out


def _construct_int(loader: _Loader, node: yaml.ScalarNode) -> int:
    digits = len(re.sub(r"[^0-9a-fA-F]", "", str(node.value)))
    if digits > loader.limits.max_int_digits:
        raise SpecError("", f"{_where(node)}: an integer with {digits} digits; "
                            f"at most {loader.limits.max_int_digits}")
    return loader.construct_yaml_int(node)


_Loader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)
_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)


_CORE = "tag:yaml.org,2002:"
_PLAIN_TAGS = {_CORE + t for t in ("str", "int", "float", "bool", "null", "map", "seq")}


def _check_events(text: str, where: str, limits: YamlLimits) -> None:
    """Walk the event stream (iterative, cheap) and refuse what would blow up construction."""
    sizes: dict[str, int] = {}        # anchor -> nodes it expands to
    stack: list[list[Any]] = []       # [anchor or None, node count] per open collection
    open_anchors: set[str] = set()
    total = 0

    def add(n: int) -> None:
        nonlocal total
        if stack:
            stack[-1][1] += n
        else:
            total += n
        if total + sum(f[1] for f in stack) > limits.max_nodes:
            raise SpecError("", f"{where}: more than {limits.max_nodes:,} YAML nodes once aliases "
                                "are expanded (an alias bomb?); a spec is a few hundred")

    for ev in yaml.parse(text, Loader=_BaseLoader):
        tag = getattr(ev, "tag", None)
        if tag and tag != "!" and tag not in _PLAIN_TAGS:
            m = ev.start_mark
            raise SpecError("", f"{where}: line {m.line + 1}: the YAML tag {tag.replace(_CORE, '!!')} "
                                f"is not used in specs (allowed: "
                                f"{', '.join(t.replace(_CORE, '!!') for t in sorted(_PLAIN_TAGS))})")
        if isinstance(ev, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            if len(stack) >= limits.max_depth:
                m = ev.start_mark
                raise SpecError("", f"{where}: line {m.line + 1}: nested more than "
                                    f"{limits.max_depth} levels deep; a spec needs fewer than 10")
            stack.append([ev.anchor, 1])
            if ev.anchor:
                open_anchors.add(ev.anchor)
        elif isinstance(ev, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            anchor, n = stack.pop()
            if anchor:
                open_anchors.discard(anchor)
                sizes[anchor] = n
            add(n)
        elif isinstance(ev, yaml.ScalarEvent):
            if ev.anchor:
                sizes[ev.anchor] = 1
            add(1)
        elif isinstance(ev, yaml.AliasEvent):
            if ev.anchor in open_anchors:
                m = ev.start_mark
                raise SpecError("", f"{where}: line {m.line + 1}: alias *{ev.anchor} refers to the "
                                    "node it is inside (a cycle)")
            add(sizes.get(ev.anchor, 1))


def load_yaml_bounded(data: bytes, where: str, limits: YamlLimits = LIMITS) -> Any:
    """Parse one YAML document from ``data`` (UTF-8) into plain Python data, or raise SpecError."""
    if len(data) > limits.max_bytes:
        raise SpecError("", f"{where} is {len(data):,} bytes; a spec may be at most "
                            f"{limits.max_bytes:,}")
    if data[:2] in (b"\xff\xfe", b"\xfe\xff") or data[:4] in (b"\x00\x00\xfe\xff", b"\xff\xfe\x00\x00"):
        raise SpecError("", f"{where} is UTF-16/32 text; save the spec as UTF-8")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise SpecError("", f"{where}: line {line}: byte 0x{data[e.start]:02x} is not UTF-8; "
                            "save the spec as UTF-8") from None
    if "\x00" in text:
        raise SpecError("", f"{where} holds NUL bytes: not a text file")
    try:
        _check_events(text, where, limits)
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        loc = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = e.problem or e.context or "not valid YAML"
        raise SpecError("", f"{where} is not valid YAML: {loc}{what}") from None
    except yaml.YAMLError as e:
        raise SpecError("", f"{where} is not valid YAML: {str(e).splitlines()[0]}") from None
    except SpecError as e:
        if e.key == "" and not str(e).startswith(where):
            raise SpecError("", f"{where}: {e}") from None
        if e.key:
            raise SpecError(e.key, f"{str(e)[len(e.key) + 2:]} (in {where})") from None
        raise
    except Exception as e:  # noqa: BLE001 - PyYAML's constructors raise what int()/float() do
        # an explicit tag on a value it cannot read (`!!int resize`, `!!bool x`)
        first = (str(e).splitlines() or [""])[0][:200]
        raise SpecError("", f"{where} is not valid YAML: {type(e).__name__} {first}") from None
