#!/usr/bin/env python3
"""Ship dmx's subpackages under dmx's own import name (issue 24): ``runner``, ``matrix``,
``results`` and ``analysis`` are names of other packages on PyPI, so a wheel that installs them at
the top level of site-packages overwrites those packages' files.

The folders stay where they are (runner/, matrix/, ... beside dmx/); pyproject.toml's
``[tool.setuptools] package-dir`` maps them into the ``dmx`` package (``dmx.runner`` is runner/),
and every reference to them as a module becomes ``dmx.runner...``:

- absolute imports (``from runner.x import``, ``import runner.backends``, ``import results``);
  relative imports (``from .x import``) are left alone;
- Python strings whose whole value is one of dmx's modules (``"runner.models.tiny"`` in the
  model registry, ``sys.modules.get("runner.executors")``, ``"runner.models.ddddocr_det:build"``,
  ``monkeypatch`` targets) - a string is rewritten only when the module exists in this checkout,
  so user modules (``"pkg.mod:factory"``, ``"test_truth:batch_dependent"``) are never touched;
- code inside strings (``python -c "from runner.envs import ..."``, ``-m runner.x``);
- references in docstrings, comments and Markdown, inside backticks (``runner.backends``),
  again only when they name an existing module;
- pyproject.toml: package-dir, the packages list, package-data keys;
- applied once (20c7244), the hand-written edits it also made (dmx/__init__.py's finder for a
  checkout imported without an install, runner/runtime_env.py's one ``dmx`` py_module,
  tests/conftest.py's refusal of a top-level ``runner``) now live in those files, not here; what
  it keeps doing is the rewrite above and pyproject.toml's packages list after a new folder.

Idempotent: a second run changes nothing. Usage:

    python3 scripts/rename_packages.py [ROOT] [--check]

``--check`` changes nothing and exits 1 if anything would change. Exits 2 when a file needs a
hand (listed at the end).
"""
from __future__ import annotations

import argparse
import ast
import io
import re
import subprocess
import sys
import tokenize
from pathlib import Path

TOP = "dmx"
SUBPACKAGES = ("runner", "matrix", "results", "analysis")
_HEAD = "|".join(SUBPACKAGES)
SELF = Path(__file__).resolve()
# Text files other than Python and pyproject.toml whose module references are rewritten.
TEXT_SUFFIXES = {".md", ".yaml", ".yml", ".sh", ".sbatch", ".cfg", ".ini"}
SKIP_DIRS = {".git", ".venv", "venv", "build", "dist", "__pycache__", "node_modules", "site",
             ".pytest_cache", ".hypothesis"}


# ---------------------------------------------------------------------------------------------
# Which dotted names are dmx's modules


class Modules:
    """The modules and packages of the four subpackages in this checkout (``runner.models.tiny``)."""

    def __init__(self, root: Path):
        self.names: set[str] = set()
        for sub in SUBPACKAGES:
            base = root / sub
            if not (base / "__init__.py").is_file():
                continue
            for p in base.rglob("*"):
                rel = p.relative_to(root)
                if "__pycache__" in rel.parts:
                    continue
                if p.is_dir():
                    self.names.add(".".join(rel.parts))
                elif p.suffix == ".py":
                    parts = rel.with_suffix("").parts
                    self.names.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
            self.names.add(sub)

    def names_module(self, dotted: str) -> bool:
        """``dotted`` (``pkg.mod``, ``pkg.mod.attr``, ``pkg.mod:attr``) starts with one of dmx's
        modules below the top level: ``runner.convert`` yes, ``results.md`` or ``runner`` no."""
        mod = dotted.split(":", 1)[0]
        parts = mod.split(".")
        if parts[0] not in SUBPACKAGES:
            return False
        for n in range(len(parts), 1, -1):
            if ".".join(parts[:n]) in self.names:
                return True
        return False


# Code inside a string or a code span: an import statement or ``-m module``.
_IMPORT_IN_TEXT = re.compile(rf"(?:(?<![\w.])|(?<=\\[nt]))((?:from|import)[ \t]+)({_HEAD})(?=[ \t.]|$)", re.M)
_DASH_M = re.compile(rf"(?<![\w-])(-m[ \t]+)({_HEAD})(?=\.)")
# A dotted reference: runner.backends, analysis.db.open_run (not dmx.runner..., not a/b paths).
_DOTTED = re.compile(rf"(?<![\w./-])({_HEAD})((?:\.[A-Za-z_]\w*)+(?::[A-Za-z_][\w.]*)?)")
_WHOLE = re.compile(rf"^({_HEAD})(?:\.[A-Za-z_]\w*)+(?::[A-Za-z_][\w.]*)?$")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)


def _code_text(text: str, mods: Modules, dotted: bool, imports: bool = True) -> tuple[str, int]:
    """Import statements and ``-m`` in code text; with ``dotted`` also module references."""
    n = 0

    def imp(m: re.Match) -> str:
        nonlocal n
        n += 1
        return f"{m.group(1)}{TOP}.{m.group(2)}"

    if imports:
        text = _IMPORT_IN_TEXT.sub(imp, text)
        text = _DASH_M.sub(imp, text)
    if dotted:
        def ref(m: re.Match) -> str:
            nonlocal n
            if not mods.names_module(m.group(0)):
                return m.group(0)
            n += 1
            return f"{TOP}.{m.group(0)}"
        text = _DOTTED.sub(ref, text)
    return text, n


def _prose(text: str, mods: Modules) -> tuple[str, int]:
    """Docstrings, comments, Markdown prose: module references that name an existing module
    (``runner.convert.ResolvedModel``), and import statements inside backticks."""
    n = 0

    def span(m: re.Match) -> str:
        nonlocal n
        new, k = _code_text(m.group(2), mods, dotted=False)
        n += k
        return f"{m.group(1)}{new}{m.group(1)}"

    text = _CODE_SPAN.sub(span, text)
    text, k = _code_text(text, mods, dotted=True, imports=False)
    return text, n + k


def rewrite_markdown(text: str, mods: Modules) -> tuple[str, int]:
    out, n, fence = [], 0, None
    chunk: list[str] = []

    def flush_prose():
        nonlocal n
        if chunk:
            new, k = _prose("".join(chunk), mods)
            out.append(new)
            n += k
            chunk.clear()

    for line in text.splitlines(keepends=True):
        stripped = line.lstrip()
        if fence is None and stripped.startswith(("```", "~~~")):
            flush_prose()
            fence = stripped[:3]
            out.append(line)
        elif fence is not None:
            if stripped.startswith(fence):
                fence = None
                out.append(line)
            else:
                new, k = _code_text(line, mods, dotted=True)
                out.append(new)
                n += k
        else:
            chunk.append(line)
    flush_prose()
    return "".join(out), n


def rewrite_plain(text: str, mods: Modules) -> tuple[str, int]:
    """YAML, shell, sbatch: imports and ``-m`` in commands, module references as values."""
    return _code_text(text, mods, dotted=True)


# ---------------------------------------------------------------------------------------------
# Python


class PyResult:
    def __init__(self):
        self.imports = 0
        self.strings = 0
        self.prose = 0
        self.problems: list[str] = []

    @property
    def total(self) -> int:
        return self.imports + self.strings + self.prose


def _byte_col(line: str, col: int) -> int:
    return len(line[:col].encode("utf-8"))


def _docstring_starts(tree: ast.AST) -> set[tuple[int, int]]:
    """(line, byte column) of every string statement: docstrings and other bare strings."""
    out = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)):
            out.add((node.value.lineno, node.value.col_offset))
    return out


def _name_used(tree: ast.AST, name: str) -> bool:
    """Whether ``name`` is read anywhere (``runner.backends.X`` after ``import runner.backends``)."""
    return any(isinstance(n, ast.Name) and n.id == name and isinstance(n.ctx, ast.Load)
               for n in ast.walk(tree))


def rewrite_python(text: str, mods: Modules, path: str) -> tuple[str, PyResult]:
    res = PyResult()
    try:
        tree = ast.parse(text)
    except SyntaxError as e:
        res.problems.append(f"{path}: not parsed ({e.msg}, line {e.lineno}): left as is")
        return text, res
    lines = text.splitlines(keepends=True)
    toks = list(tokenize.generate_tokens(io.StringIO(text).readline))
    edits: list[tuple[int, int, int, int, str]] = []   # (row, col, end row, end col, new text)

    # import statements: the token where each starts
    starts: dict[tuple[int, int], ast.stmt] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] in SUBPACKAGES:
            starts[(node.lineno, node.col_offset)] = node
        elif isinstance(node, ast.Import) and any(a.name.split(".")[0] in SUBPACKAGES
                                                  for a in node.names):
            starts[(node.lineno, node.col_offset)] = node
    docstrings = _docstring_starts(tree)

    i = 0
    while i < len(toks):
        t = toks[i]
        row, col = t.start
        key = (row, _byte_col(lines[row - 1], col)) if row <= len(lines) else None
        if t.type == tokenize.NAME and key in starts:
            node = starts[key]
            j = i + 1
            if isinstance(node, ast.ImportFrom):
                head = toks[j]                      # the first name after ``from``
                edits.append((*head.start, *head.start, f"{TOP}."))
                res.imports += 1
            else:
                # aliases: NAME(.NAME)* [as NAME] separated by commas, up to the statement's end
                alias_start, aliases = True, iter(node.names)
                while j < len(toks) and toks[j].type not in (tokenize.NEWLINE, tokenize.ENDMARKER) \
                        and toks[j].string != ";":
                    tk = toks[j]
                    if alias_start and tk.type == tokenize.NAME:
                        alias = next(aliases)
                        head = alias.name.split(".")[0]
                        if head in SUBPACKAGES:
                            if alias.asname or "." in alias.name:
                                if not alias.asname and _name_used(tree, head):
                                    res.problems.append(
                                        f"{path}:{row}: 'import {alias.name}' binds {head!r}, which "
                                        f"the module reads; now 'import {TOP}.{alias.name}' binds "
                                        f"{TOP!r}: fix the uses of {head}.")
                                edits.append((*tk.start, *tk.start, f"{TOP}."))
                                res.imports += 1
                            elif len(node.names) == 1:
                                edits.append((*toks[i].start, *tk.end, f"from {TOP} import {head}"))
                                res.imports += 1
                            else:
                                res.problems.append(f"{path}:{row}: 'import {alias.name}' among "
                                                    "other names: split the statement by hand")
                        alias_start = False
                    elif tk.string == ",":
                        alias_start = True
                    j += 1
            i = j
            continue
        if t.type == tokenize.STRING:
            is_doc = key in docstrings
            new = _rewrite_string_token(t.string, mods, prose=is_doc)
            if new is not None:
                s, n = new
                edits.append((*t.start, *t.end, s))
                if is_doc:
                    res.prose += n
                else:
                    res.strings += n
        elif t.type == tokenize.COMMENT:
            s, n = _prose(t.string, mods)
            if n:
                edits.append((*t.start, *t.end, s))
                res.prose += n
        elif getattr(tokenize, "FSTRING_MIDDLE", None) == t.type:
            s, n = _code_text(t.string, mods, dotted=False)
            if n:
                edits.append((*t.start, *t.end, s))
                res.strings += n
        i += 1

    if not edits:
        return text, res
    # apply from the end so earlier positions stay valid
    out = lines[:]
    for row, col, erow, ecol, s in sorted(edits, reverse=True):
        if row == erow:
            ln = out[row - 1]
            out[row - 1] = ln[:col] + s + ln[ecol:]
        else:
            first, last = out[row - 1], out[erow - 1]
            out[row - 1] = first[:col] + s + last[ecol:]
            for r in range(row, erow):
                out[r] = ""
    new_text = "".join(out)
    try:
        ast.parse(new_text)
    except SyntaxError as e:
        res.problems.append(f"{path}: the rewrite would not parse ({e.msg}, line {e.lineno}): "
                            "left as is")
        return text, PyResult()
    return new_text, res


_STR_PREFIX = re.compile(r"^([rRbBuUfF]*)('''|\"\"\"|'|\")")


def _rewrite_string_token(src: str, mods: Modules, prose: bool) -> tuple[str, int] | None:
    m = _STR_PREFIX.match(src)
    if not m or "b" in m.group(1).lower():
        return None
    prefix, quote = m.groups()
    body = src[len(prefix) + len(quote):len(src) - len(quote)]
    if prose:
        new, n = _prose(body, mods)
    elif _WHOLE.match(body) and mods.names_module(body):
        new, n = f"{TOP}.{body}", 1        # "runner.models.tiny", "runner.executors"
    else:
        new, n = _code_text(body, mods, dotted=False)
    if not n:
        return None
    return f"{prefix}{quote}{new}{quote}", n


# ---------------------------------------------------------------------------------------------
# pyproject.toml

_BEGIN = "# BEGIN dmx packages (scripts/rename_packages.py writes this table; rerun it after adding"
_BEGIN2 = "# a subpackage folder). runner/, matrix/, results/, analysis/ ship inside dmx."
_END = "# END dmx packages"


def package_list(root: Path) -> list[str]:
    """Every folder of dmx's code as a package name (data folders too, as packages.find's
    namespace discovery found them: analysis/sql, analysis/templates)."""
    out = []
    for base, name in [(root / TOP, TOP)] + [(root / s, f"{TOP}.{s}") for s in SUBPACKAGES]:
        if not base.is_dir():
            continue
        out.append(name)
        for d in sorted(p for p in base.rglob("*") if p.is_dir()):
            rel = d.relative_to(base)
            if any(part in SKIP_DIRS or part.startswith(".") or part.endswith(".egg-info")
                   for part in rel.parts):
                continue
            if not any(f.is_file() for f in d.rglob("*") if "__pycache__" not in f.parts):
                continue
            out.append(".".join([name, *rel.parts]))
    return out


def rewrite_pyproject(text: str, root: Path) -> tuple[str, list[str]]:
    notes = []
    pkgs = package_list(root)
    block = "\n".join([
        _BEGIN, _BEGIN2,
        "[tool.setuptools]",
        "package-dir = {" + ", ".join(f'"{TOP}.{s}" = "{s}"' for s in SUBPACKAGES) + "}",
        "packages = [",
        *(f'    "{p}",' for p in pkgs),
        "]",
        _END,
    ])
    if _BEGIN in text:
        start = text.index(_BEGIN)
        end = text.index(_END, start) + len(_END)
        new = text[:start] + block + text[end:]
        if new != text:
            notes.append(f"packages list regenerated ({len(pkgs)} packages)")
        text = new
    else:
        find = re.compile(r"^\[tool\.setuptools\.packages\.find\]\n(?:(?!\[).*\n)*", re.M)
        if find.search(text):
            text = find.sub(lambda _m: block + "\n\n", text, count=1)
            notes.append("[tool.setuptools.packages.find] -> [tool.setuptools] package-dir "
                         f"(dmx.runner = \"runner\", ...) and packages ({len(pkgs)})")
        else:
            raise ValueError("pyproject.toml has neither [tool.setuptools.packages.find] nor the "
                             "block this script writes")
    # package-data keys: "analysis" = [...] -> "dmx.analysis" = [...]
    def key(m: re.Match) -> str:
        notes.append(f"package-data key {m.group(2)!r} -> '{TOP}.{m.group(2)}'")
        return f"{m.group(1)}{TOP}.{m.group(2)}{m.group(3)}"

    m = re.search(r"^\[tool\.setuptools\.package-data\]\n((?:(?!\[).*\n?)*)", text, re.M)
    if m:
        body = re.sub(rf'^(\s*")({_HEAD})((?:\.[\w.]+)?"\s*=)', key, m.group(1), flags=re.M)
        text = text[:m.start(1)] + body + text[m.end(1):]
    # entry points naming a subpackage's module
    def ep(m: re.Match) -> str:
        notes.append(f"entry point -> {TOP}.{m.group(2)}")
        return f"{m.group(1)}{TOP}.{m.group(2)}"
    text = re.sub(rf'^(\s*[\w.-]+\s*=\s*")({_HEAD})(?=[.:])', ep, text, flags=re.M)
    return text, notes


def candidate_files(root: Path) -> list[Path]:
    try:
        out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard"], capture_output=True, check=True).stdout
        files = [root / p for p in out.decode().split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        files = [p for p in root.rglob("*") if p.is_file()]
    keep = []
    for p in files:
        rel = p.relative_to(root)
        if any(part in SKIP_DIRS or part.endswith(".egg-info") for part in rel.parts[:-1]):
            continue
        if not p.is_file() or p.resolve() == SELF:
            continue
        if p.suffix in (".py", *TEXT_SUFFIXES) or rel.as_posix() == "pyproject.toml":
            keep.append(p)
    return sorted(set(keep))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", nargs="?", default=str(SELF.parents[1]), help="the checkout")
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a file would change")
    a = ap.parse_args(argv)
    root = Path(a.root).resolve()
    if not (root / "pyproject.toml").is_file() or not (root / TOP).is_dir():
        print(f"{root}: not a dmx checkout (no pyproject.toml and dmx/)", file=sys.stderr)
        return 2
    mods = Modules(root)
    problems: list[str] = []
    changed: list[tuple[str, str]] = []
    totals = {"files": 0, "imports": 0, "module strings": 0, "doc references": 0, "pyproject": 0}

    for p in candidate_files(root):
        rel = p.relative_to(root).as_posix()
        text = p.read_text(encoding="utf-8")
        notes: list[str] = []
        if rel == "pyproject.toml":
            try:
                new, pn = rewrite_pyproject(text, root)
            except ValueError as e:
                problems.append(f"pyproject.toml: {e}")
                continue
            notes += pn
            totals["pyproject"] += len(pn)
        elif p.suffix == ".py":
            new, r = rewrite_python(text, mods, rel)
            problems += r.problems
            parts = [f"{n} {w}" for n, w in ((r.imports, "imports"), (r.strings, "module strings"),
                                              (r.prose, "doc references")) if n]
            if parts:
                notes.append(", ".join(parts))
            totals["imports"] += r.imports
            totals["module strings"] += r.strings
            totals["doc references"] += r.prose
        elif p.suffix == ".md":
            new, n = rewrite_markdown(text, mods)
            if n:
                notes.append(f"{n} doc references")
            totals["doc references"] += n
        else:
            new, n = rewrite_plain(text, mods)
            if n:
                notes.append(f"{n} module references")
            totals["module strings"] += n
        if new != text:
            changed.append((rel, "; ".join(notes)))
            totals["files"] += 1
            if not a.check:
                p.write_text(new, encoding="utf-8")

    verb = "would change" if a.check else "changed"
    for rel, what in changed:
        print(f"{verb} {rel}: {what}")
    print(f"{verb} {totals['files']} files: {totals['imports']} imports, "
          f"{totals['module strings']} module strings, {totals['doc references']} doc references, "
          f"{totals['pyproject']} pyproject.toml edits"
          if changed else "nothing to change: the rename is applied")
    if problems:
        print(f"\nneeds a hand ({len(problems)}):")
        for line in problems:
            print(f"  {line}")
        return 2
    return 1 if a.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
