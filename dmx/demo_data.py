"""Build the demo dataset: real photos re-encoded with real JPEG encoders.

Sources are photos shipped inside installed packages (matplotlib,
scikit-image, scikit-learn), so nothing is downloaded.  Each photo becomes
a baseline 4:2:0 JPEG (Pillow, quality 90); a few photos also get encoding
variants (4:4:4, 4:2:2, progressive, OpenCV-encoded, greyscale, CMYK and
EXIF orientation 6) and ``bad/`` holds three broken files.

The build is deterministic for given library versions and idempotent: a
``MANIFEST.json`` records the build key and the sha256 of every output, and
a matching, intact manifest short-circuits the rebuild.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
from pathlib import Path

from PIL import Image, ImageOps

__all__ = [
    "BAD_FILES",
    "MAX_SIDE",
    "MANIFEST_NAME",
    "QUALITY",
    "VARIANTS",
    "build_demo_images",
    "demo_sources",
]

#: Longest side (px) of every demo image; bigger sources are downscaled.
MAX_SIDE = 640
#: JPEG quality used for every encoded demo file (Pillow and OpenCV scale).
QUALITY = 90
#: Names of the deliberately broken files, written under ``bad/``.
BAD_FILES: tuple[str, ...] = ("truncated.jpg", "empty.jpg", "not_an_image.jpg")
MANIFEST_NAME = "MANIFEST.json"
_BUILD_VERSION = 1
_MIN_SOURCES = 4

# (demo name, package, path inside the package), in preference order.
_SOURCE_TABLE: tuple[tuple[str, str, str], ...] = (
    ("grace_hopper", "matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
    ("astronaut", "skimage", "data/astronaut.png"),
    ("chelsea", "skimage", "data/chelsea.png"),
    ("coffee", "skimage", "data/coffee.png"),
    ("rocket", "skimage", "data/rocket.jpg"),
    ("motorcycle", "skimage", "data/motorcycle_left.png"),
    ("retina", "skimage", "data/retina.jpg"),
    ("china", "sklearn", "datasets/images/china.jpg"),
    ("flower", "sklearn", "datasets/images/flower.jpg"),
)

#: Variant suffix -> photos it is made from (first available ones; if none of
#: them is available the first found source is used instead).
VARIANTS: dict[str, tuple[str, ...]] = {
    "444": ("astronaut", "chelsea"),
    "422": ("astronaut",),
    "prog": ("astronaut", "coffee"),
    "cv2": ("astronaut", "coffee"),
    "grey": ("chelsea",),
    "cmyk": ("astronaut",),
    "exif6": ("astronaut", "grace_hopper"),
}


def _package_dir(package: str) -> Path | None:
    """Directory of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def demo_sources() -> dict[str, str]:
    """Map demo name -> absolute path of every source photo found on this machine."""
    found: dict[str, str] = {}
    for name, package, rel in _SOURCE_TABLE:
        root = _package_dir(package)
        if root is not None and (root / rel).is_file():
            found[name] = str(root / rel)
    return found


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _build_key(sources: dict[str, str]) -> dict[str, object]:
    """Everything the output bytes depend on: sources, settings and encoder versions."""
    import cv2
    import PIL

    return {
        "build_version": _BUILD_VERSION,
        "max_side": MAX_SIDE,
        "quality": QUALITY,
        "variants": {k: list(v) for k, v in VARIANTS.items()},
        "sources": {name: _sha256_file(Path(p)) for name, p in sources.items()},
        "pillow": PIL.__version__,
        "opencv": cv2.__version__,
    }


def _load_photo(path: str) -> Image.Image:
    """Load a source photo upright, as plain RGB (no metadata), longest side <= MAX_SIDE."""
    with Image.open(path) as src:
        icc = src.info.get("icc_profile")
        img = ImageOps.exif_transpose(src).convert("RGB")
    if max(img.size) > MAX_SIDE:
        scale = MAX_SIDE / max(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.LANCZOS)
    img.info = {"icc_profile": icc} if icc else {}
    return img


def _pil_jpeg(img: Image.Image, **kwargs: object) -> bytes:
    """Encode with Pillow's libjpeg at QUALITY, baseline unless told otherwise."""
    buf = io.BytesIO()
    params: dict[str, object] = {"quality": QUALITY, "optimize": False, "progressive": False}
    params.update(kwargs)
    icc = img.info.get("icc_profile")
    if icc and img.mode == "RGB" and "icc_profile" not in params:
        params["icc_profile"] = icc  # keep the source's colour profile on RGB outputs
    clean = img.copy()
    clean.info = {}  # no stray comment/exif carried over from the source
    clean.save(buf, format="JPEG", **params)
    return buf.getvalue()


def _encode_variant(img: Image.Image, variant: str) -> bytes:
    """Encoded bytes of ``img`` for one variant suffix."""
    if variant == "420":
        return _pil_jpeg(img, subsampling="4:2:0")
    if variant == "444":
        return _pil_jpeg(img, subsampling="4:4:4")
    if variant == "422":
        return _pil_jpeg(img, subsampling="4:2:2")
    if variant == "prog":
        return _pil_jpeg(img, subsampling="4:2:0", progressive=True)
    if variant == "grey":
        return _pil_jpeg(img.convert("L"))
    if variant == "cmyk":
        return _pil_jpeg(img.convert("CMYK"))  # 4 components, Adobe APP14
    if variant == "exif6":
        # Orientation 6 means "rotate 90 deg clockwise to display", so store the
        # upright photo rotated 90 deg counter-clockwise.
        exif = Image.Exif()
        exif[0x0112] = 6
        stored = img.transpose(Image.Transpose.ROTATE_90)
        stored.info = img.info
        return _pil_jpeg(stored, subsampling="4:2:0", exif=exif.tobytes())
    if variant == "cv2":
        # Note: with opencv-python 5 and Pillow 13 (both bundling libjpeg-turbo,
        # same quality, 4:2:0, islow DCT, standard Huffman tables) this is
        # byte-identical to Pillow's ``_420`` output minus the ICC APP2 segment.
        import cv2
        import numpy as np

        bgr = np.ascontiguousarray(np.asarray(img)[:, :, ::-1])
        ok, enc = cv2.imencode(
            ".jpg",
            bgr,
            [
                cv2.IMWRITE_JPEG_QUALITY,
                QUALITY,
                cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
                cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420,
            ],
        )
        if not ok:
            raise RuntimeError("cv2.imencode failed")
        return enc.tobytes()
    raise ValueError(f"unknown variant {variant!r}")


def _plan(sources: dict[str, str]) -> list[tuple[str, str, str]]:
    """(file name, source name, variant) for every good demo image."""
    names = list(sources)
    plan = [(f"{n}_420.jpg", n, "420") for n in names]
    for variant, wanted in VARIANTS.items():
        chosen = [n for n in wanted if n in sources] or names[:1]
        plan.extend((f"{n}_{variant}.jpg", n, variant) for n in chosen)
    return plan


class DemoDirError(RuntimeError):
    """The demo folder holds files dmx did not write where it would write its own."""


def _inside(root: Path, rel: str) -> bool:
    """``rel`` names a file under ``root`` (no absolute path, no ``..``)."""
    return bool(rel) and not Path(rel).is_absolute() and ".." not in Path(rel).parts


def _write_atomic(path: Path, data: bytes) -> None:
    """Write via a temp file + rename so concurrent builders never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _manifest_ok(dest: Path, key: dict[str, object]) -> list[str] | None:
    """Relative file names of a complete, intact build matching ``key``; else None."""
    try:
        manifest = json.loads((dest / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("key") != key:
        return None
    files = manifest.get("files")
    if not isinstance(files, dict):
        return None
    for rel, digest in files.items():
        path = dest / rel
        if not path.is_file() or _sha256_file(path) != digest:
            return None
    return list(files)


def build_demo_images(dest: str) -> list[str]:
    """Write the demo dataset into ``dest`` and return all file paths, sorted.

    The returned list includes the broken files in ``dest/bad/`` (names in
    :data:`BAD_FILES`).  Skips work when ``dest`` already holds an intact
    build with the same manifest key.  Raises ``RuntimeError`` if fewer than
    4 source photos are installed.
    """
    sources = demo_sources()
    if len(sources) < _MIN_SOURCES:
        raise RuntimeError(
            f"need at least {_MIN_SOURCES} demo source photos, found {sorted(sources)}"
        )
    root = Path(dest)
    key = _build_key(sources)
    existing = _manifest_ok(root, key)
    if existing is not None:
        return sorted(str(root / rel) for rel in existing)

    (root / "bad").mkdir(parents=True, exist_ok=True)
    outputs: dict[str, bytes] = {}
    photos: dict[str, Image.Image] = {}
    for fname, src, variant in _plan(sources):
        if src not in photos:
            photos[src] = _load_photo(sources[src])
        outputs[fname] = _encode_variant(photos[src], variant)

    good = outputs[min(f for f in outputs if f.endswith("_420.jpg"))]
    outputs["bad/truncated.jpg"] = good[: len(good) // 2]
    outputs["bad/empty.jpg"] = b""
    outputs["bad/not_an_image.jpg"] = b"This is a text file with a .jpg name, not an image.\n"

    # Only files this builder wrote (recorded in its manifest) may be replaced - a damaged one is
    # repaired - or removed (only while unchanged). A file at one of our names that no build
    # of ours recorded is the user's, and the build stops before touching any file.
    try:
        old = json.loads((root / MANIFEST_NAME).read_text(encoding="utf-8")).get("files", {})
    except FileNotFoundError:
        old = {}
    except (OSError, ValueError, AttributeError):
        raise DemoDirError(f"{root / MANIFEST_NAME} exists and was not written by dmx; "
                           "choose another --out") from None
    old = {rel: d for rel, d in (old.items() if isinstance(old, dict) else ())
           if isinstance(rel, str) and _inside(root, rel)}

    def ours(rel: str) -> bool:
        path = root / rel
        return not os.path.lexists(path) or (rel in old and path.is_file()
                                             and not path.is_symlink())

    foreign = [rel for rel in outputs if not ours(rel)]
    if foreign:
        raise DemoDirError(f"{root / foreign[0]} exists and was not written by dmx"
                           f"{f' (and {len(foreign) - 1} more)' if len(foreign) > 1 else ''}; "
                           "dmx never overwrites it: choose another --out")
    for rel in old:
        path = root / rel
        if rel not in outputs and path.is_file() and not path.is_symlink() \
                and _sha256_file(path) == old[rel]:
            path.unlink()

    for rel, data in outputs.items():
        _write_atomic(root / rel, data)
    manifest = {
        "key": key,
        "files": {rel: hashlib.sha256(data).hexdigest() for rel, data in outputs.items()},
    }
    _write_atomic(root / MANIFEST_NAME, json.dumps(manifest, indent=2, sort_keys=True).encode())
    return sorted(str(root / rel) for rel in outputs)
