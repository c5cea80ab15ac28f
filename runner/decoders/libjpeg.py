"""A chosen libjpeg build via ``jpeglib``: level ``libjpeg:<build>``, e.g. ``libjpeg:9e``.

jpeglib bundles IJG libjpeg 6b-9f, libjpeg-turbo 1.2-2.1 and mozjpeg 1.0-4.0 as shared libraries
in one process; dmx build names are jpeglib's own strings, verbatim (``9e``, ``turbo210``,
``mozjpeg403``; ``jpeglib.version.versions()`` lists them). The build is a process-wide switch
in jpeglib, so every decode selects it under a lock.

jpeglib reads from a path (bytes go through a temporary file), never applies EXIF orientation
(dmx does it with numpy for exif=apply), hands back CMYK samples for CMYK/YCCK files (converted
with Pillow's formula) and one channel for greyscale (replicated). libjpeg only warns on a
truncated file and returns grey rows, so a file without its EOI marker is refused up front, like
Pillow, OpenCV and simplejpeg do. libjpeg prints its messages to stderr: they are captured, to
become the DecodeError's message, or a "libjpeg warning: ..." in the decode note.

Offers dct (islow, ifast, float) and upsample (fancy, fast); jpeglib exposes no DCT scaling, so
no reduce.
"""
from __future__ import annotations

import os
import sys
import tempfile
import threading
from contextlib import contextmanager
from typing import Iterator

import numpy as np

from .base import (DCT_METHODS, UPSAMPLING, DecodeError, Decoder, DecoderUnavailable,
                   DecodeOptions, apply_orientation, grey_to_rgb, inverted_cmyk_to_rgb,
                   jpeg_header, source_header)

_LOCK = threading.Lock()   # jpeglib.version.set switches the build for the whole process
_DCT = {"islow": "JDCT_ISLOW", "ifast": "JDCT_IFAST", "float": "JDCT_FLOAT"}


@contextmanager
def _stderr_lines() -> Iterator[list[str]]:
    """Collect what C code writes to stderr inside the block: libjpeg prints its error and
    warning messages there instead of returning them. The list is filled when the block ends."""
    lines: list[str] = []
    with tempfile.TemporaryFile() as log:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            log.seek(0)
            text = log.read().decode("utf-8", "replace")
            lines.extend(line.strip() for line in text.splitlines() if line.strip())


def available_builds() -> list[str]:
    """The libjpeg builds the installed jpeglib bundles, as its version strings."""
    import jpeglib
    return sorted(jpeglib.version.versions())


class LibjpegDecoder(Decoder):
    system_name = "libjpeg"
    dct_methods = DCT_METHODS
    upsamplings = UPSAMPLING

    def __init__(self, build: str) -> None:
        try:
            import jpeglib  # noqa: F401
        except ImportError:
            raise DecoderUnavailable(f"libjpeg:{build} needs the jpeglib package "
                                     "(pip install jpeglib, or dmx[decoders])") from None
        builds = available_builds()
        if build not in builds:
            raise DecoderUnavailable(f"libjpeg build {build!r} is not bundled by jpeglib here; "
                                     f"available: {', '.join(builds)}")
        self.build = build
        self.system_name = f"libjpeg:{build}"

    def _decode(self, data: bytes, options: DecodeOptions) -> np.ndarray:
        import jpeglib
        header = jpeg_header(data)
        if header["format"] != "JPEG":
            raise DecodeError(f"{self.system_name}: not a JPEG file")
        if header["error"]:
            raise DecodeError(f"{self.system_name}: {header['error']}")
        kwargs: dict = {"dct_method": jpeglib.DCTMethod[_DCT[options.dct]]}
        if options.upsample == "fast":
            kwargs["flags"] = ["-DO_FANCY_UPSAMPLING"]
        source_header(data)  # Pillow's decompression-bomb guard, before any allocation
        fd, path = tempfile.mkstemp(suffix=".jpg", prefix="dmx-libjpeg-")
        error: Exception | None = None
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            with _LOCK, _stderr_lines() as messages:
                try:
                    if jpeglib.version.get() != self.build:
                        jpeglib.version.set(self.build)
                    pixels = jpeglib.read_spatial(path, **kwargs).spatial
                except (OSError, RuntimeError, ValueError) as e:
                    error = e
        finally:
            os.unlink(path)
        if error is not None:   # libjpeg's own words when it printed any
            raise DecodeError(f"{self.system_name}: {messages[-1] if messages else error}")
        for message in dict.fromkeys(messages):
            self._note(f"libjpeg warning: {message}")
        mode = header["color_mode"]
        if pixels.shape[2] == 4:
            pixels = inverted_cmyk_to_rgb(pixels)
            self._note(f"{mode}->RGB (libjpeg to CMYK, then dmx with Pillow's formula)")
        elif pixels.shape[2] == 1:
            pixels = grey_to_rgb(pixels)
            self._note("L->RGB (replicated)")
        orientation = header["exif_orientation"]
        if options.exif == "apply":
            pixels = apply_orientation(pixels, orientation)
        self._note_exif(orientation, options, "dmx numpy")
        return pixels

    def version(self) -> dict[str, str | None]:
        from importlib.metadata import version
        return {"library": "jpeglib", "version": version("jpeglib"), "libjpeg": self.build}
