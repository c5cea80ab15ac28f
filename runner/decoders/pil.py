"""Pillow: ``Image.open`` + ``load``; EXIF orientation only when asked (``exif_transpose``)."""
from __future__ import annotations

import io
import re
import warnings

import numpy as np

from .base import DecodeError, Decoder, DecodeOptions


class PilDecoder(Decoder):
    system_name = "pil"

    def _decode(self, data: bytes, options: DecodeOptions) -> np.ndarray:
        from PIL import Image, ImageOps, UnidentifiedImageError
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data))
                img.load()
            if options.exif == "apply":
                img = ImageOps.exif_transpose(img)
            return np.asarray(img.convert("RGB"))
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError,
                Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            message = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e))
            raise DecodeError(f"Pillow: {message}") from None

    def version(self) -> dict[str, str | None]:
        import PIL
        from PIL import features
        return {"library": "pillow", "version": PIL.__version__,
                "libjpeg": features.version("jpg"),
                "libjpeg_turbo": str(features.check_feature("libjpeg_turbo"))}
