"""OpenCV: ``cv2.imdecode``; applies EXIF orientation by default, ignores it when asked."""
from __future__ import annotations

import re

import numpy as np

from .base import DecodeError, Decoder, DecodeOptions


class OpenCVDecoder(Decoder):
    system_name = "opencv"

    def _decode(self, data: bytes, options: DecodeOptions) -> np.ndarray:
        import cv2
        flags = cv2.IMREAD_COLOR
        if options.exif == "ignore":
            flags |= cv2.IMREAD_IGNORE_ORIENTATION
        try:
            bgr = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
        except cv2.error as e:
            raise DecodeError(f"OpenCV: {str(e).strip().splitlines()[-1]}") from None
        if bgr is None:
            raise DecodeError("OpenCV: imdecode returned no image (unsupported or corrupt data)")
        return bgr[..., ::-1]

    def version(self) -> dict[str, str | None]:
        import cv2
        m = re.search(r"^\s*JPEG:\s*(.+)$", cv2.getBuildInformation(), re.M)
        return {"library": "opencv", "version": cv2.__version__,
                "libjpeg": m.group(1).strip() if m else None}
