"""MkDocs hook: the reference pages' tables are generated from the code, never written twice.

A page holds a marker line and the build replaces it:

- ``<!-- dmx:spec-axes -->``, ``<!-- dmx:spec-keys -->``: from the spec's JSON Schema
  (``dmx schema --spec``, built from the axis registry) - every axis, its levels, every key of a
  spec with its type, bounds and meaning;
- ``<!-- dmx:row-columns -->``: the Parquet row columns (``dmx schema``);
- ``<!-- dmx:layer-columns -->``: the columns of ``dmx localize``'s layer rows.

``python docs/hooks/reference.py spec|rows|layers`` prints a table, to read it without a build.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _schema() -> dict[str, Any]:
    import dmx.runner.backends  # noqa: F401  (the backends register their axes, as dmx's CLI does)
    from dmx.matrix.schema import spec_json_schema
    return spec_json_schema()


def _code(v: Any) -> str:
    return f"`{v}`"


def _bounds(s: dict[str, Any]) -> str:
    lo = s.get("minimum", s.get("exclusiveMinimum"))
    hi = s.get("maximum", s.get("exclusiveMaximum"))
    lo_s = f"> {lo}" if "exclusiveMinimum" in s else f"{lo}"
    if lo is not None and hi is not None:
        return f" {lo_s}..{hi:,}" if isinstance(hi, int) else f" {lo_s}..{hi}"
    if lo is not None:
        return f" > {lo}" if "exclusiveMinimum" in s else f" >= {lo}"
    if hi is not None:
        return f" <= {hi}"
    return ""


def _type(s: dict[str, Any], defs: dict[str, Any]) -> str:
    """A JSON Schema node as words: ``integer 1..8192``, ``one of `a`, `b```, ``list of ...``."""
    if "$ref" in s:
        name = s["$ref"].rsplit("/", 1)[-1]
        anchor = "axes" if name in ("Axes", "Cell") else name.lower()  # both listed under Axes
        return f"[{name}](#{anchor})"
    if "anyOf" in s:
        parts = [_type(x, defs) for x in s["anyOf"] if x.get("type") != "null"]
        return " or ".join(dict.fromkeys(parts))
    if "enum" in s:
        return "one of " + ", ".join(_code(v) for v in s["enum"])
    if "const" in s:
        return _code(s["const"])
    t = s.get("type")
    if t == "array":
        n = ""
        if "minItems" in s and s.get("minItems") == s.get("maxItems"):
            n = f" ({s['minItems']} items)"
        elif "minItems" in s and "maxItems" in s:
            n = f" ({s['minItems']}..{s['maxItems']:,} items)"
        elif "maxItems" in s:
            n = f" (at most {s['maxItems']:,} items)"
        elif "minItems" in s:
            n = f" (at least {s['minItems']} items)"
        return f"list of {_type(s.get('items', {}), defs)}{n}"
    if t == "object":
        props = s.get("properties")
        return "mapping {" + ", ".join(props) + "}" if props else "mapping"
    if t == "string":
        extra = f" matching `{s['pattern']}`" if "pattern" in s else ""
        if "maxLength" in s:
            extra += f" of {s.get('minLength', 0)}..{s['maxLength']} characters"
        return "string" + extra
    if t in ("integer", "number"):
        return t + _bounds(s)
    if t == "boolean":
        return "true or false"
    return t or "any"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _keys_table(props: dict[str, Any], required: list[str], defs: dict[str, Any]) -> list[str]:
    out = ["| key | type | required | meaning |", "| --- | --- | --- | --- |"]
    for key, s in props.items():
        desc = s.get("description", "")
        if "default" in s and s["default"] is not None:
            desc += f" (default {_code(s['default'])})"
        out.append(f"| `{key}` | {_cell(_type(s, defs))} | {'yes' if key in required else ''} "
                   f"| {_cell(desc)} |")
    return out


def spec_keys_markdown() -> str:
    """Every key of a spec file, then one table per nested mapping (Dataset, Model, ...)."""
    schema = _schema()
    defs = schema.get("$defs", {})
    out = ["### Top level", ""]
    out += _keys_table(schema["properties"], schema.get("required", []), defs)
    for name, d in defs.items():
        if name in ("Axes", "Cell"):
            continue   # the axes table below lists them
        out += ["", f"### {name}", ""]
        if d.get("description"):
            out += [d["description"], ""]
        out += _keys_table(d.get("properties", {}), d.get("required", []), defs)
    out += ["", "### Axes", "",
            "`axes` maps each axis to a list of its levels (a single level is a list of one). "
            "`include`, `exclude` and `reference` hold **cells**: mappings axis -> one level. "
            "The axes and their levels are in the [axis table](#axes-and-levels)."]
    return "\n".join(out)


def spec_axes_markdown() -> str:
    """One row per axis: the pipeline stage it acts on, its levels, what it means."""
    schema = _schema()
    from dmx.matrix.axes import AXES
    axes = schema["$defs"]["Axes"]["properties"]
    out = ["| axis | stage | levels | meaning |", "| --- | --- | --- | --- |"]
    for name, s in axes.items():
        # an optional axis takes one level or a list of them: describe the one level
        one = s
        while "anyOf" in one and any(x.get("type") in ("null", "array") for x in one["anyOf"]):
            one = next(x for x in one["anyOf"] if x.get("type") not in ("null", "array"))
        desc = one.get("description") or s.get("description", "")
        axis = AXES.get(name)
        stage = getattr(axis, "stage", "")
        if getattr(axis, "mapping_levels", False):
            enum = next(x for x in one.get("anyOf", [one]) if "enum" in x)
            levels = (_type(enum, {}) + "; a mapping `{name: LIB, build: B}` or "
                      "`{name: LIB, package: \"REQ\"}` (short: `LIB:B`, `LIB[REQ]`)")
        else:
            levels = _type(one, {})
        out.append(f"| `{name}` | {stage} | {_cell(levels)} | {_cell(desc)} |")
    return "\n".join(out)


def _columns_table(columns) -> str:
    out = ["| column | type | unit | meaning |", "| --- | --- | --- | --- |"]
    for name, typ, unit, meaning in columns:
        out.append(f"| `{name}` | {typ} | {unit} | {_cell(meaning)} |")
    return "\n".join(out)


def row_columns_markdown() -> str:
    from dmx.results.schema import columns_markdown
    return columns_markdown()


def layer_columns_markdown() -> str:
    from dmx.results.layers import LAYER_COLUMNS
    return _columns_table(LAYER_COLUMNS)


MARKERS = {
    "<!-- dmx:spec-axes -->": spec_axes_markdown,
    "<!-- dmx:spec-keys -->": spec_keys_markdown,
    "<!-- dmx:row-columns -->": row_columns_markdown,
    "<!-- dmx:layer-columns -->": layer_columns_markdown,
}


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 (MkDocs API)
    for marker, make in MARKERS.items():
        if marker in markdown:
            markdown = markdown.replace(marker, make())
    return markdown


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "spec"
    print({"spec": lambda: spec_axes_markdown() + "\n\n" + spec_keys_markdown(),
           "rows": row_columns_markdown, "layers": layer_columns_markdown}[what]())
