"""Pillow: ``Image.open`` + ``load``; EXIF orientation only when asked (``exif_transpose``).

reduce: ``Image.draft`` (libjpeg DCT scaling) for JPEG; other formats have no draft, so they are
reduced with ``Image.reduce`` (box average), as Pillow's own ``thumbnail`` does. Pillow exposes
no DCT method or upsampling choice.
"""
from __future__ import annotations

import io
import re
import warnings

import numpy as np

from .base import REDUCTIONS, DecodeError, Decoder, DecodeOptions

_ORIENTATION = 0x0112


class PilDecoder(Decoder):
    system_name = "pil"
    reductions = REDUCTIONS

    def _decode(self, data: bytes, options: DecodeOptions) -> np.ndarray:
        from PIL import Image, ImageOps, UnidentifiedImageError
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data))
                n = options.reduce
                if n > 1 and img.format == "JPEG":
                    w, h = img.size
                    img.draft("RGB", (max(1, w // n), max(1, h // n)))
                img.load()
            if n > 1 and img.format != "JPEG":
                img = img.reduce(n)
                self._note(f"reduce {n} by Image.reduce (draft is JPEG-only)")
            orientation = img.getexif().get(_ORIENTATION)
            if options.exif == "apply":
                img = ImageOps.exif_transpose(img)
            self._note_exif(orientation, options, "Pillow exif_transpose")
            if img.mode != "RGB":
                self._note(f"{img.mode}->RGB (Pillow convert)")
            return np.asarray(img.convert("RGB"))
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError,
                Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            message = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e))
            raise DecodeError(f"Pillow: {message}") from None

    def version(self) -> dict[str, str | None]:
        import PIL
        from PIL import features
        turbo = features.version("libjpeg_turbo")
        return {"library": "pillow", "version": PIL.__version__,
                "libjpeg": f"libjpeg-turbo {turbo}" if turbo else f"libjpeg {features.version('jpg')}"}
