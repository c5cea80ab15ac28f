"""The decoder interface: image bytes in, an RGB uint8 array (H, W, 3) out, plus a note.

Every decoder honours ``DecodeOptions`` where its library can; the matrix nulls an option axis for
decoders that lack it (``dmx.matrix.axes``), and ``Decoder.decode`` refuses a non-default option a
decoder cannot honour rather than silently ignoring it. Warnings a library raises or prints to
stderr while decoding become notes (``warning: ...``), never console lines. After each decode ``Decoder.last_note``
says what conversion happened beyond an ordinary YCbCr/RGB decode (a CMYK or greyscale source,
an EXIF rotation, a reduction done another way), or is None when there is nothing to say.
"""
from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .portable import captured_fd2, library_notes

EXIF_MODES = ("apply", "ignore", "native")
REDUCTIONS = (1, 2, 4, 8)
DCT_METHODS = ("islow", "ifast", "float")
UPSAMPLING = ("fancy", "fast")
_ORIENTATION = 0x0112   # EXIF tag


class DecodeError(RuntimeError):
    """The library could not decode the image; the message is the library's own words."""


class DecoderUnavailable(RuntimeError):
    """The decoder (or the build, version or option asked for) cannot run here: cells skipped."""


@dataclass(frozen=True)
class DecodeOptions:
    """How to decode. The defaults are every library's own defaults.

    ``exif``: apply | ignore the EXIF orientation, or ``native``: whatever the library does by
    default (OpenCV applies it, Pillow and the libjpeg-level decoders ignore it). ``reduce``: decode at 1/reduce of the stored
    size per side (1, 2, 4, 8; pixels rounded up) with the library's DCT scaling. ``dct``: the
    inverse DCT, libjpeg's ``dct_method`` (islow | ifast | float). ``upsample``: chroma
    upsampling, libjpeg's ``do_fancy_upsampling`` (fancy | fast).
    """

    exif: str = "apply"
    reduce: int = 1
    dct: str = "islow"
    upsample: str = "fancy"

    def __post_init__(self) -> None:
        for name, value, allowed in (("exif", self.exif, EXIF_MODES),
                                     ("reduce", self.reduce, REDUCTIONS),
                                     ("dct", self.dct, DCT_METHODS),
                                     ("upsample", self.upsample, UPSAMPLING)):
            if value not in allowed:
                raise ValueError(f"DecodeOptions.{name}={value!r}; allowed: "
                                 + ", ".join(map(str, allowed)))


class Decoder:
    """Base class: subclasses set ``system_name`` and what they support, and implement
    ``_decode`` and ``version``; they call ``_note`` to record a conversion."""

    system_name = "decoder"
    #: Reduction factors the library can decode at (1 = full size).
    reductions: tuple[int, ...] = (1,)
    #: DCT methods the library offers.
    dct_methods: tuple[str, ...] = ("islow",)
    #: Chroma upsampling modes the library offers.
    upsamplings: tuple[str, ...] = ("fancy",)

    #: What the library does with EXIF orientation when nobody asks (``exif: native``).
    native_exif: str = "ignore"

    last_note: str | None = None

    def unsupported(self, options: DecodeOptions) -> str | None:
        """Why this decoder cannot honour ``options``, or None when it can."""
        for name, value, offered in (("reduce", options.reduce, self.reductions),
                                     ("dct", options.dct, self.dct_methods),
                                     ("upsample", options.upsample, self.upsamplings)):
            if value not in offered:
                return (f"{self.system_name} cannot decode with {name}={value} "
                        f"(it offers {', '.join(map(str, offered))})")
        return None

    def decode(self, data: bytes, options: DecodeOptions) -> np.ndarray:
        """Decode to RGB uint8, shape (H, W, 3); greyscale and CMYK go through the library's
        own conversion. Raises DecodeError with the library's message, DecoderUnavailable for
        options this library lacks. Sets ``last_note``."""
        self.last_note = None
        self._notes: list[str] = []
        reason = self.unsupported(options)
        if reason:
            raise DecoderUnavailable(reason)
        if not data:
            raise DecodeError("empty file (0 bytes)")
        if options.exif == "native":
            options = replace(options, exif=self.native_exif)
        said: list[str] = []
        with warnings.catch_warnings(record=True) as caught, captured_fd2(said):
            warnings.simplefilter("always")
            out = self._decode(data, options)
        # library warnings (Python's, and C's on stderr) belong to the row, not the console
        for note in library_notes([w for w in caught if not issubclass(w.category, DeprecationWarning)],
                                  said):
            self._note(note)
        if out.ndim != 3 or out.shape[2] != 3 or out.dtype != np.uint8:
            raise DecodeError(f"{self.system_name} returned {out.dtype} {out.shape}, not RGB uint8")
        self.last_note = "; ".join(self._notes) or None
        return np.ascontiguousarray(out)

    def _note(self, text: str) -> None:
        self._notes.append(text)

    def _note_exif(self, orientation: int | None, options: DecodeOptions, how: str) -> None:
        """Record what happened to a non-trivial EXIF orientation (2-8)."""
        if isinstance(orientation, int) and 2 <= orientation <= 8:
            self._note(f"EXIF orientation {orientation} applied ({how})" if options.exif == "apply"
                       else f"EXIF orientation {orientation} ignored")

    def _decode(self, data: bytes, options: DecodeOptions) -> np.ndarray:
        raise NotImplementedError

    def version(self) -> dict[str, str | None]:
        raise NotImplementedError


# the source_header of the images being decoded, by identity of their bytes (id -> [bytes,
# result or error, Pillow's opened image or None]): the worker parses a group of images'
# headers, then decodes the group
_memo: dict[int, list] = {}
_memo_bytes = [0]
_MEMO_IMAGES, _MEMO_BYTES = 64, 64 * 2 ** 20


def remember_header(data: bytes, header: tuple[str | None, int | None] | DecodeError,
                    opened: Any = None) -> None:
    """What ``source_header(data)`` returns (or raises), already known from a parse of the same
    bytes (the worker reads every image's header once, for images.parquet), and ``opened``:
    that parse's Pillow image, not loaded, which the Pillow decoder may take once
    (``take_opened``) instead of opening the file again. The most recent are kept (at most
    ``_MEMO_IMAGES`` images and, past the newest, ``_MEMO_BYTES``) until ``forget_headers``."""
    _forget(id(data))
    while _memo and (len(_memo) >= _MEMO_IMAGES or _memo_bytes[0] + len(data) > _MEMO_BYTES):
        _forget(next(iter(_memo)))
    _memo[id(data)] = [data, header, opened]
    _memo_bytes[0] += len(data)


def take_opened(data: bytes) -> Any:
    """The remembered Pillow image of ``data`` (``remember_header``), once; else None."""
    known = _memo.get(id(data))
    if known is None or known[0] is not data:
        return None
    opened, known[2] = known[2], None
    return opened


def _forget(key: int) -> None:
    old = _memo.pop(key, None)
    if old is not None:
        _memo_bytes[0] -= len(old[0])


def forget_headers() -> None:
    """Drop the remembered headers (and the bytes they keep alive)."""
    _memo.clear()
    _memo_bytes[0] = 0


def source_header(data: bytes) -> tuple[str | None, int | None]:
    """(colour mode as Pillow names it: L, RGB, CMYK, RGBA, P, ...; EXIF orientation 1-8 or
    None) from a header-only parse (Pillow's lazy ``open``, no pixels decoded, ~0.03 ms).
    (None, None) when Pillow cannot read the header: the decoding library reports its own error.
    Raises DecodeError for a decompression bomb: Pillow's guard is kept on for every decoder.
    Bytes parsed before are remembered (by identity), so the decoders of one image share it."""
    known = _memo.get(id(data))
    if known is not None and known[0] is data:
        if isinstance(known[1], DecodeError):
            raise known[1]
        return known[1]
    try:
        header = parse_source_header(data)
    except DecodeError as e:
        remember_header(data, e)
        raise
    remember_header(data, header)
    return header


def parse_source_header(data: bytes) -> tuple[str | None, int | None]:
    """``source_header`` without the memo."""
    from PIL import Image
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")     # the decode itself records the library's warnings
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                orientation = img.getexif().get(_ORIENTATION)
                return img.mode, orientation if isinstance(orientation, int) else None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DecodeError(f"decompression bomb: {e}") from None
    except (OSError, SyntaxError, ValueError, TypeError, IndexError, KeyError, EOFError,
            struct.error):
        return None, None  # UnidentifiedImageError is an OSError


def jpeg_header(data: bytes) -> dict[str, Any]:
    """Header facts of an image file without decoding pixels: ``color_mode`` (L, RGB, CMYK,
    YCCK, ...), ``exif_orientation`` (1-8 or None), ``width``/``height`` (px, as stored),
    ``format`` and ``error`` (truncated, corrupt markers, ...); see ``dmx.runner.imageinfo``."""
    from ..imageinfo import image_info_from_bytes
    return image_info_from_bytes(data)


def apply_orientation(img: np.ndarray, orientation: int | None) -> np.ndarray:
    """Turn a decoded (H, W, C) array upright for an EXIF orientation (1-8), exactly as Pillow's
    ``ImageOps.exif_transpose`` does, with numpy flips and transposes. For libraries that never
    apply EXIF orientation themselves (jpeglib, simplejpeg, PyTurboJPEG), so that exif=apply
    means the same for every decoder."""
    if orientation == 2:        # mirrored horizontally
        return img[:, ::-1]
    if orientation == 3:        # rotated 180
        return img[::-1, ::-1]
    if orientation == 4:        # mirrored vertically
        return img[::-1]
    if orientation == 5:        # transposed
        return img.swapaxes(0, 1)
    if orientation == 6:        # stored rotated 90 CCW: turn 90 CW
        return np.rot90(img, -1)
    if orientation == 7:        # transversed
        return img[::-1, ::-1].swapaxes(0, 1)
    if orientation == 8:        # stored rotated 90 CW: turn 90 CCW
        return np.rot90(img, 1)
    return img


def grey_to_rgb(img: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, 1) luminance -> (H, W, 3) by replicating the channel, as every library's
    greyscale-to-RGB conversion does."""
    return np.repeat(img.reshape(img.shape[0], img.shape[1], 1), 3, axis=2)


def inverted_cmyk_to_rgb(cmyk: np.ndarray) -> np.ndarray:
    """Raw (H, W, 4) CMYK samples as stored in Adobe CMYK JPEGs (inverted: 255 = no ink) ->
    RGB with Pillow's formula (``R = (255 - K) - (255 - K) * C / 255``, rounded like Pillow's
    MULDIV255), so a decoder that hands back CMYK converts exactly like ``Image.convert``."""
    inv = cmyk.astype(np.int32)
    nk = inv[..., 3:4]                      # 255 - K
    ink = 255 - inv[..., :3]                # C, M, Y
    t = ink * nk + 128
    return np.clip(nk - (((t >> 8) + t) >> 8), 0, 255).astype(np.uint8)
