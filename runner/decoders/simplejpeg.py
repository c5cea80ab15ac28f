"""simplejpeg: ``simplejpeg.decode_jpeg`` (libjpeg-turbo 3 built into the wheel), JPEG only.

simplejpeg never applies EXIF orientation, so dmx applies it with numpy for exif=apply. Greyscale
and CMYK go through libjpeg-turbo's own conversion to RGB. ``strict=True`` (its default): any
libjpeg warning, a truncated file included, is an error. Offers reduce (libjpeg-turbo DCT
scaling, asked for as a minimum output size), dct (islow, ifast: ``fastdct``) and upsample
(fancy, fast: ``fastupsample``); no float DCT.
"""
from __future__ import annotations

import numpy as np

from .base import (REDUCTIONS, UPSAMPLING, DecodeError, Decoder, DecoderUnavailable,
                   DecodeOptions, apply_orientation, source_header)


class SimplejpegDecoder(Decoder):
    system_name = "simplejpeg"
    reductions = REDUCTIONS
    dct_methods = ("islow", "ifast")
    upsamplings = UPSAMPLING

    def __init__(self) -> None:
        try:
            import simplejpeg  # noqa: F401
        except ImportError:
            raise DecoderUnavailable("simplejpeg is not installed here "
                                     "(pip install simplejpeg, or dmx[decoders])") from None

    def _decode(self, data: bytes, options: DecodeOptions) -> np.ndarray:
        import simplejpeg
        mode, orientation = source_header(data)
        try:
            size: dict[str, int] = {}
            if options.reduce > 1:
                n = options.reduce
                h, w, _, _ = simplejpeg.decode_jpeg_header(data)
                # the largest scale whose output is at least ceil(side / n) is exactly 1/n
                size = {"min_height": -(-h // n), "min_width": -(-w // n), "min_factor": n}
            rgb = simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=options.dct == "ifast",
                                         fastupsample=options.upsample == "fast", strict=True,
                                         **size)
        except ValueError as e:
            raise DecodeError(f"simplejpeg: {e}") from None
        if mode not in (None, "RGB"):
            self._note(f"{mode}->RGB (libjpeg-turbo via simplejpeg)")
        if options.exif == "apply":
            rgb = apply_orientation(rgb, orientation)
        self._note_exif(orientation, options, "dmx numpy")
        return rgb

    def version(self) -> dict[str, str | None]:
        import simplejpeg
        return {"library": "simplejpeg", "version": simplejpeg.__version__,
                "libjpeg": "libjpeg-turbo (bundled)"}
