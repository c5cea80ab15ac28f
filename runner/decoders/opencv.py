"""OpenCV: ``cv2.imdecode``; applies EXIF orientation by default, ignores it when asked.

reduce: ``IMREAD_REDUCED_COLOR_n`` (libjpeg DCT scaling for JPEG; other formats are decoded and
then resized with INTER_AREA by OpenCV). OpenCV exposes no DCT method or upsampling choice.
"""
from __future__ import annotations

import re

import numpy as np

from .base import REDUCTIONS, DecodeError, Decoder, DecodeOptions, source_header


class OpenCVDecoder(Decoder):
    system_name = "opencv"
    native_exif = "apply"
    reductions = REDUCTIONS

    def _decode(self, data: bytes, options: DecodeOptions) -> np.ndarray:
        import cv2
        mode, orientation = source_header(data)
        flags = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2,
                 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}[options.reduce]
        if options.exif == "ignore":
            flags |= cv2.IMREAD_IGNORE_ORIENTATION
        try:
            bgr = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
        except cv2.error as e:
            raise DecodeError(f"OpenCV: {str(e).strip().splitlines()[-1]}") from None
        if bgr is None:
            raise DecodeError("OpenCV: imdecode returned no image (unsupported or corrupt data)")
        self._note_exif(orientation, options, "OpenCV imdecode")
        if mode not in (None, "RGB"):
            self._note(f"{mode}->RGB (OpenCV imdecode)")
        return bgr[..., ::-1]

    def version(self) -> dict[str, str | None]:
        import cv2
        m = re.search(r"^\s*JPEG:\s*(.+)$", cv2.getBuildInformation(), re.M)
        return {"library": "opencv", "version": cv2.__version__,
                "libjpeg": m.group(1).strip() if m else None}
