"""The decode logic of Pillow and OpenCV, in one source shared by two worlds.

In dmx's process, ``pil.py`` and ``opencv.py`` call these functions. In a decoder environment
(another package version, another venv: ``isolated.py``), ``decode_server.py`` loads THIS FILE
by path and calls the same functions, so a pinned Pillow 9.4 decodes exactly as the in-process
Pillow would, by construction. Hence the rules of this module: no dmx imports (the other
environment cannot import dmx), only the standard library, numpy and the library being driven,
each imported inside the function that needs it; syntax that the environment's Python reads.

Each ``decode_*`` takes the file's bytes, ``exif`` (``apply`` | ``ignore``) and ``reduce``
(1, 2, 4, 8) and returns ``(rgb, notes)``: an (H, W, 3) uint8 C-contiguous array and the
conversions worth recording; it raises ``DecodeFailed`` with the library's own message.
Library warnings raised while decoding (Pillow's "Corrupt EXIF data", libjpeg's "Corrupt JPEG
data: N extraneous bytes" that OpenCV prints to stderr from C) become notes, not console lines.
"""
from __future__ import annotations

import atexit
import contextlib
import io
import os
import re
import tempfile
import warnings

import numpy as np

ORIENTATION = 0x0112        # EXIF tag


class DecodeFailed(Exception):
    """The library could not decode the image; the message is the library's own words."""


def exif_note(orientation: object, exif: str, how: str) -> str | None:
    """What happened to a non-trivial EXIF orientation (2-8), or None."""
    if isinstance(orientation, int) and 2 <= orientation <= 8:
        return (f"EXIF orientation {orientation} applied ({how})" if exif == "apply"
                else f"EXIF orientation {orientation} ignored")
    return None


_SINK: list = []       # [pid, temporary file, bytes written to it so far]: one per process
_ACTIVE: list = []     # non-empty while a capture runs (captures do not nest)
_SINK_REWIND = 1 << 20  # the sink is emptied once it holds this much


@contextlib.contextmanager
def captured_fd2(lines: list[str]):
    """Collect what C code writes to file descriptor 2 (stderr) meanwhile into ``lines``,
    instead of the terminal. Python-level warnings are the caller's to catch. Five system
    calls when nothing is written (dup, dup2, dup2, close, lseek): the sink is one temporary
    file per process, appended to and read from where the last capture ended."""
    if _ACTIVE:               # nested: the outer capture collects it
        yield
        return
    try:
        saved = os.dup(2)
    except OSError:           # no fd 2 (a daemon): nothing to capture
        yield
        return
    if not _SINK or _SINK[0] != os.getpid():
        _SINK[:] = [os.getpid(), tempfile.TemporaryFile(), 0]
        atexit.register(_SINK[1].close)
    fd, start = _SINK[1].fileno(), _SINK[2]
    try:
        _ACTIVE.append(True)
        os.dup2(fd, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        _ACTIVE.clear()
        end = os.lseek(fd, 0, os.SEEK_CUR)   # fd 2 wrote through the same file offset
        if end > start:
            text = os.pread(fd, end - start, start).decode("utf-8", "replace")
            lines.extend(ln.strip() for ln in text.splitlines() if ln.strip())
        if end >= _SINK_REWIND:
            os.ftruncate(fd, 0)
            end = os.lseek(fd, 0, os.SEEK_SET)
        _SINK[2] = end


def library_notes(caught: list, stderr_lines: list[str]) -> list[str]:
    """Warnings and C-level messages of a decode, each once, in order, shortened."""
    out = [f"warning: {str(w.message).strip().splitlines()[0][:200]}" for w in caught]
    out += [f"warning: {ln[:200]}" for ln in stderr_lines]
    return list(dict.fromkeys(out))


def decode_pil(data: bytes, exif: str, reduce: int, opened=None) -> tuple[np.ndarray, list[str]]:
    """Pillow: ``Image.open`` + ``load`` (``draft`` for a JPEG reduce, ``Image.reduce`` for other
    formats), ``exif_transpose`` when asked, the library's own conversion to RGB. Pillow's
    decompression-bomb guard stays on. ``opened``: ``Image.open`` of these bytes, already made
    (not loaded, and its open raised no warning)."""
    from PIL import Image, ImageOps, UnidentifiedImageError
    notes: list[str] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = opened if opened is not None else Image.open(io.BytesIO(data))
            if reduce > 1 and img.format == "JPEG":
                w, h = img.size
                img.draft("RGB", (max(1, w // reduce), max(1, h // reduce)))
            img.load()
            if reduce > 1 and img.format != "JPEG":
                img = img.reduce(reduce)
                notes.append(f"reduce {reduce} by Image.reduce (draft is JPEG-only)")
            orientation = img.getexif().get(ORIENTATION)
            if exif == "apply" and orientation not in (None, 1):   # else Pillow returns a copy
                img = ImageOps.exif_transpose(img)
        note = exif_note(orientation, exif, "Pillow exif_transpose")
        notes += [note] if note else []
        if img.mode != "RGB":
            notes.append(f"{img.mode}->RGB (Pillow convert)")
        notes += library_notes([w for w in caught
                                if not issubclass(w.category, DeprecationWarning)], [])
        # (convert to the mode an image has already is a copy too)
        return np.ascontiguousarray(np.asarray(img if img.mode == "RGB" else img.convert("RGB"))), notes
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError,
            Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DecodeFailed("Pillow: " + re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "",
                                               str(e))) from None


def decode_opencv(data: bytes, exif: str, reduce: int) -> tuple[np.ndarray, list[str]]:
    """OpenCV: ``cv2.imdecode`` (``IMREAD_REDUCED_COLOR_n`` for a reduce; EXIF orientation
    applied unless ``IMREAD_IGNORE_ORIENTATION``), BGR -> RGB. libjpeg's warnings, which OpenCV
    prints to stderr, are captured into the notes."""
    import cv2
    flags = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2,
             4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}[reduce]
    if exif == "ignore":
        flags |= cv2.IMREAD_IGNORE_ORIENTATION
    said: list[str] = []
    try:
        with captured_fd2(said):
            bgr = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error as e:
        raise DecodeFailed("OpenCV: " + str(e).strip().splitlines()[-1]) from None
    if bgr is None:
        raise DecodeFailed("OpenCV: imdecode returned no image (unsupported or corrupt data)")
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)   # = bgr[..., ::-1], and contiguous
    return rgb, library_notes([], said)


DECODERS = {"pil": decode_pil, "opencv": decode_opencv}
