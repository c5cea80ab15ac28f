"""OpenCV: ``cv2.imdecode``; applies EXIF orientation by default, ignores it when asked.

reduce: ``IMREAD_REDUCED_COLOR_n`` (libjpeg DCT scaling for JPEG; other formats are decoded and
then resized with INTER_AREA by OpenCV). OpenCV exposes no DCT method or upsampling choice. The
decode itself is ``portable.decode_opencv``: the same source a pinned OpenCV runs in its own
environment (``isolated.py``); the notes on the source (colour mode, EXIF orientation) and
Pillow's decompression-bomb guard come from a header-only parse here.
"""
from __future__ import annotations

import re

import numpy as np

from .base import REDUCTIONS, DecodeError, Decoder, DecodeOptions, source_header
from .portable import DecodeFailed, decode_opencv


class OpenCVDecoder(Decoder):
    system_name = "opencv"
    native_exif = "apply"
    reductions = REDUCTIONS

    def _decode(self, data: bytes, options: DecodeOptions) -> np.ndarray:
        mode, orientation = source_header(data)
        try:
            rgb, notes = decode_opencv(data, options.exif, options.reduce)
        except DecodeFailed as e:
            raise DecodeError(str(e)) from None
        self.note_source(mode, orientation, options)
        for note in notes:
            self._note(note)
        return rgb

    def note_source(self, mode: str | None, orientation: int | None, options: DecodeOptions) -> None:
        """Notes on what OpenCV did to the source (EXIF rotation, colour conversion)."""
        self._note_exif(orientation, options, "OpenCV imdecode")
        if mode not in (None, "RGB"):
            self._note(f"{mode}->RGB (OpenCV imdecode)")

    def version(self) -> dict[str, str | None]:
        import cv2
        m = re.search(r"^\s*JPEG:\s*(.+)$", cv2.getBuildInformation(), re.M)
        return {"library": "opencv", "version": cv2.__version__,
                "libjpeg": m.group(1).strip() if m else None}
