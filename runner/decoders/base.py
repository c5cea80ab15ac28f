"""The decoder interface: JPEG/PNG bytes in, an RGB uint8 array (H, W, 3) out."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class DecodeError(RuntimeError):
    """The library could not decode the image; the message is the library's own words."""


class DecoderUnavailable(RuntimeError):
    """The decoder (or the build/version asked for) is not installed: its cells are skipped."""


@dataclass(frozen=True)
class DecodeOptions:
    """Options every decoder honours where its library can: EXIF orientation handling."""

    exif: str = "apply"      # apply | ignore


class Decoder:
    """Base class: subclasses set ``system_name`` and implement ``_decode`` and ``version``."""

    system_name = "decoder"

    def decode(self, data: bytes, options: DecodeOptions) -> np.ndarray:
        """Decode to RGB uint8, shape (H, W, 3); greyscale and CMYK go through the library's
        own conversion. Raises DecodeError with the library's message."""
        if not data:
            raise DecodeError("empty file (0 bytes)")
        out = self._decode(data, options)
        if out.ndim != 3 or out.shape[2] != 3 or out.dtype != np.uint8:
            raise DecodeError(f"{self.system_name} returned {out.dtype} {out.shape}, not RGB uint8")
        return np.ascontiguousarray(out)

    def _decode(self, data: bytes, options: DecodeOptions) -> np.ndarray:
        raise NotImplementedError

    def version(self) -> dict[str, str | None]:
        raise NotImplementedError
