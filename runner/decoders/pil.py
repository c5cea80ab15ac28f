"""Pillow: ``Image.open`` + ``load``; EXIF orientation only when asked (``exif_transpose``).

reduce: ``Image.draft`` (libjpeg DCT scaling) for JPEG; other formats have no draft, so they are
reduced with ``Image.reduce`` (box average), as Pillow's own ``thumbnail`` does. Pillow exposes
no DCT method or upsampling choice. The decode itself is ``portable.decode_pil``: the same
source a pinned Pillow runs in its own environment (``isolated.py``).
"""
from __future__ import annotations

import numpy as np

from .base import REDUCTIONS, DecodeError, Decoder, DecodeOptions, take_opened
from .portable import DecodeFailed, decode_pil


class PilDecoder(Decoder):
    system_name = "pil"
    reductions = REDUCTIONS

    def _decode(self, data: bytes, options: DecodeOptions) -> np.ndarray:
        try:
            rgb, notes = decode_pil(data, options.exif, options.reduce, take_opened(data))
        except DecodeFailed as e:
            raise DecodeError(str(e)) from None
        for note in notes:
            self._note(note)
        return rgb

    def version(self) -> dict[str, str | None]:
        import PIL
        from PIL import features
        turbo = features.version("libjpeg_turbo")
        return {"library": "pillow", "version": PIL.__version__,
                "libjpeg": f"libjpeg-turbo {turbo}" if turbo else f"libjpeg {features.version('jpg')}"}
