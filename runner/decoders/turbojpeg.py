"""PyTurboJPEG: ``TurboJPEG().decode`` through the system's libturbojpeg (3.0 or later).

PyTurboJPEG 2.x loads libturbojpeg with ctypes and needs its 3.x API; when the library is missing
or too old the level is unavailable (skipped cells, with the loader's reason). It never applies
EXIF orientation, so dmx does with numpy for exif=apply. libjpeg-turbo refuses CMYK/YCCK to RGB,
so those decode to CMYK and are converted with Pillow's formula; greyscale goes through
libjpeg-turbo's own conversion. ``TJFLAG_STOPONWARNING``: any libjpeg warning, a truncated file
included, is an error. Offers reduce (scaling factor 1/n), dct (islow, ifast: TJFLAG_FASTDCT)
and upsample (fancy, fast: TJFLAG_FASTUPSAMPLE); no float DCT.
"""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from .base import (REDUCTIONS, UPSAMPLING, DecodeError, Decoder, DecoderUnavailable,
                   DecodeOptions, apply_orientation, inverted_cmyk_to_rgb, source_header)


class TurboJpegDecoder(Decoder):
    system_name = "turbojpeg"
    reductions = REDUCTIONS
    dct_methods = ("islow", "ifast")
    upsamplings = UPSAMPLING

    def __init__(self, lib_path: str | None = None) -> None:
        """``lib_path``: libturbojpeg to load; None lets PyTurboJPEG search the usual places."""
        try:
            import turbojpeg
        except ImportError:
            raise DecoderUnavailable("turbojpeg needs the PyTurboJPEG package "
                                     "(pip install PyTurboJPEG, or dmx[decoders])") from None
        try:
            self._tj: Any = turbojpeg.TurboJPEG(lib_path)
        except (OSError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0].split(". ")[0].rstrip(".")
            raise DecoderUnavailable(f"turbojpeg: PyTurboJPEG {turbojpeg.__version__} cannot load "
                                     f"libturbojpeg 3.x ({first}); install libjpeg-turbo 3's "
                                     "libturbojpeg") from None

    def _decode(self, data: bytes, options: DecodeOptions) -> np.ndarray:
        import turbojpeg as tj
        mode, orientation = source_header(data)
        flags = tj.TJFLAG_STOPONWARNING
        if options.dct == "ifast":
            flags |= tj.TJFLAG_FASTDCT
        if options.upsample == "fast":
            flags |= tj.TJFLAG_FASTUPSAMPLE
        scaling = None if options.reduce == 1 else (1, options.reduce)
        try:
            with warnings.catch_warnings():
                # PyTurboJPEG reports recoverable damage as a UserWarning; we want an error
                warnings.simplefilter("error", UserWarning)
                _, _, _, colorspace = self._tj.decode_header(data)
                cmyk = colorspace in (tj.TJCS_CMYK, tj.TJCS_YCCK)
                pixels = self._tj.decode(data, pixel_format=tj.TJPF_CMYK if cmyk else tj.TJPF_RGB,
                                         scaling_factor=scaling, flags=flags)
        except (OSError, ValueError, UserWarning) as e:
            raise DecodeError(f"turbojpeg: {e}") from None
        if cmyk:
            pixels = inverted_cmyk_to_rgb(pixels)
            self._note(f"{'YCCK' if colorspace == tj.TJCS_YCCK else 'CMYK'}->RGB "
                       "(libjpeg-turbo to CMYK, then dmx with Pillow's formula)")
        elif mode not in (None, "RGB"):
            self._note(f"{mode}->RGB (libjpeg-turbo)")
        if options.exif == "apply":
            pixels = apply_orientation(pixels, orientation)
        self._note_exif(orientation, options, "dmx numpy")
        return pixels

    def version(self) -> dict[str, str | None]:
        import turbojpeg
        return {"library": "pyturbojpeg", "version": turbojpeg.__version__,
                "libjpeg": "libjpeg-turbo (system libturbojpeg)"}
