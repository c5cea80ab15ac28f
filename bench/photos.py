"""Benchmark datasets, built offline from the demo source photos with real JPEG encoders.

``build_photo_set(dest, n)`` writes ``n`` distinct JPEGs: each is a random crop (55-100 % of
each side, sometimes mirrored) of one of the installed demo photos (``dmx.demo_data``), scaled
to a long side of 320-640 px, then encoded by Pillow or OpenCV with a random quality (70-95),
chroma subsampling (4:2:0 / 4:2:2 / 4:4:4) and baseline/progressive. A few are greyscale,
CMYK or carry an EXIF orientation (3, 6, 8) with the pixels stored rotated, as cameras do.
``build_tiny_set(dest, n)`` writes ``n`` distinct 64x64 crops (for memory-scaling runs).

Both are deterministic (seeded) and cached: a ``BUILD.json`` with the build key short-circuits
a rebuild. File names sort in generation order, so a set of N is a prefix of a set of M > N.
"""
from __future__ import annotations

import io
import json
import os
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from dmx.demo_data import demo_sources

_BUILD_VERSION = 1
_SUBSAMPLING = ("4:2:0", "4:2:2", "4:4:4")


def _sources() -> dict[str, Image.Image]:
    found = demo_sources()
    if len(found) < 4:
        raise RuntimeError(f"need at least 4 demo source photos (matplotlib, scikit-image, "
                           f"scikit-learn), found {sorted(found)}")
    out = {}
    for name, path in sorted(found.items()):
        with Image.open(path) as im:
            out[name] = ImageOps.exif_transpose(im).convert("RGB")
    return out


def _crop(rng: random.Random, img: Image.Image, long_lo: int, long_hi: int) -> Image.Image:
    w, h = img.size
    cw, ch = max(8, int(w * rng.uniform(0.55, 1.0))), max(8, int(h * rng.uniform(0.55, 1.0)))
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    out = img.crop((x, y, x + cw, y + ch))
    if rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    target = rng.randint(long_lo, long_hi)
    scale = target / max(cw, ch)
    size = (max(1, round(cw * scale)), max(1, round(ch * scale)))
    return out.resize(size, Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC)


def _encode_pil(img: Image.Image, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **params)
    return buf.getvalue()


def _encode_cv2(img: Image.Image, quality: int, subsampling: str, progressive: bool) -> bytes:
    import cv2
    factor = {"4:2:0": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420,
              "4:2:2": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422,
              "4:4:4": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444}[subsampling]
    bgr = np.ascontiguousarray(np.asarray(img)[:, :, ::-1])
    ok, enc = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality,
                                         cv2.IMWRITE_JPEG_SAMPLING_FACTOR, factor,
                                         cv2.IMWRITE_JPEG_PROGRESSIVE, int(progressive)])
    if not ok:
        raise RuntimeError("cv2.imencode failed")
    return enc.tobytes()


def _variant(rng: random.Random, img: Image.Image) -> tuple[str, bytes]:
    """(short description, JPEG bytes) of one random encoding of ``img``."""
    quality = rng.randint(70, 95)
    sub = rng.choice(_SUBSAMPLING)
    prog = rng.random() < 0.25
    r = rng.random()
    if r < 0.04:
        return f"grey-q{quality}", _encode_pil(img.convert("L"), quality=quality)
    if r < 0.07:
        return f"cmyk-q{quality}", _encode_pil(img.convert("CMYK"), quality=quality)
    if r < 0.12:
        orientation = rng.choice((3, 6, 8))
        # Store the upright crop as a camera would, so that applying the tag restores it.
        inverse = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90,
                   8: Image.Transpose.ROTATE_270}[orientation]
        exif = Image.Exif()
        exif[0x0112] = orientation
        return (f"exif{orientation}-q{quality}",
                _encode_pil(img.transpose(inverse), quality=quality, subsampling=sub,
                            exif=exif.tobytes()))
    tag = f"{sub.replace(':', '')}-q{quality}{'-prog' if prog else ''}"
    if r < 0.45:
        return f"cv2-{tag}", _encode_cv2(img, quality, sub, prog)
    return f"pil-{tag}", _encode_pil(img, quality=quality, subsampling=sub, progressive=prog,
                                     optimize=rng.random() < 0.5)


def _build(dest: Path, n: int, key: dict, make) -> list[str]:
    build = dest / "BUILD.json"
    try:
        old = json.loads(build.read_text())
    except (OSError, ValueError):
        old = None
    if old and old.get("key") == key and all((dest / f).is_file() for f in old["files"]):
        return [str(dest / f) for f in old["files"]]
    dest.mkdir(parents=True, exist_ok=True)
    for p in dest.glob("*.jpg"):
        p.unlink()
    files = []
    for name, data in make():
        tmp = dest / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, dest / name)
        files.append(name)
    build.write_text(json.dumps({"key": key, "files": files}, indent=1))
    return [str(dest / f) for f in files]


def build_photo_set(dest: str | Path, n: int, seed: int = 0) -> list[str]:
    """``n`` distinct real-photo JPEGs in ``dest`` (see the module docstring); their paths."""
    import cv2
    import PIL
    key = {"v": _BUILD_VERSION, "kind": "photos", "n": n, "seed": seed,
           "pillow": PIL.__version__, "opencv": cv2.__version__}

    def make():
        rng = random.Random(seed)
        sources = _sources()
        names = sorted(sources)
        for i in range(n):
            src = names[i % len(names)]
            desc, data = _variant(rng, _crop(rng, sources[src], 320, 640))
            yield f"img{i:06d}-{src}-{desc}.jpg", data

    return _build(Path(dest), n, key, make)


def build_tiny_set(dest: str | Path, n: int, size: int = 64, seed: int = 0) -> list[str]:
    """``n`` distinct ``size`` x ``size`` JPEG crops of the demo photos (Pillow, quality 90)."""
    import PIL
    key = {"v": _BUILD_VERSION, "kind": "tiny", "n": n, "size": size, "seed": seed,
           "pillow": PIL.__version__}

    def make():
        rng = random.Random(seed)
        sources = _sources()
        names = sorted(sources)
        for i in range(n):
            img = sources[names[i % len(names)]]
            w, h = img.size
            side = rng.randint(size, min(w, h))
            x, y = rng.randint(0, w - side), rng.randint(0, h - side)
            tile = img.crop((x, y, x + side, y + side)).resize((size, size), Image.Resampling.BILINEAR)
            yield f"tiny{i:07d}.jpg", _encode_pil(tile, quality=90)

    return _build(Path(dest), n, key, make)
