"""Header-level image properties read straight from the file bytes, pixels never decoded.

One parser: Pillow's own (its lazy ``Image.open`` reads the header only) gives format, size,
colour mode, chroma subsampling (the JPEG component sampling factors, ``im.layer``),
progressive, the EXIF orientation (``getexif``), the ICC profile and Adobe's colour transform,
for JPEG and every other format. What Pillow does not say is read here from the JPEG's frame
segments only: arithmetic coding (the SOF marker type), a height defined by a DNL marker
(Pillow cannot open those), and whether the file is complete (an EOI marker after the first
scan).

Every function here accepts arbitrary bytes and returns a dict; problems are reported in the
``error`` key instead of raised, and library warnings are not printed (the decoders record
them in ``decode_note``). Only a path that cannot be opened raises.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import struct
import warnings
from typing import Any

__all__ = [
    "IMAGE_INFO_COLUMNS",
    "image_info_from_bytes",
    "read_image_info",
]

#: Ordered (column name, pyarrow type alias) pairs; the keys of every info dict.
IMAGE_INFO_COLUMNS: list[tuple[str, str]] = [
    ("format", "string"),
    ("width", "int32"),  # px, as stored (before EXIF rotation)
    ("height", "int32"),  # px, as stored (before EXIF rotation)
    ("subsampling", "string"),
    ("progressive", "bool"),
    ("arithmetic", "bool"),
    ("exif_orientation", "int8"),
    ("components", "int8"),
    ("color_mode", "string"),
    ("icc", "bool"),
    ("bytes", "int64"),  # file size in bytes
    ("sha256", "string"),  # hex digest of the file bytes
    ("error", "string"),
]

# SOFn markers (0xC4 DHT, 0xC8 JPG and 0xCC DAC are not frames).
_SOF_MARKERS = frozenset(
    {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
)
_PROGRESSIVE_SOF = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
_ARITHMETIC_SOF = frozenset({0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
# Markers without a length field: TEM, RST0-7, SOI (EOI handled separately).
_STANDALONE = frozenset({0x01, 0xD8, *range(0xD0, 0xD8)})
_SOS, _EOI = 0xDA, 0xD9

# (luma H / chroma H, luma V / chroma V) -> J:a:b name.
_SUBSAMPLING_NAMES: dict[tuple[int, int], str] = {
    (1, 1): "4:4:4",
    (2, 1): "4:2:2",
    (2, 2): "4:2:0",
    (1, 2): "4:4:0",
    (4, 1): "4:1:1",
}

_ORIENTATION_TAG = 0x0112


def _empty_info(data: bytes) -> dict[str, Any]:
    info: dict[str, Any] = {name: None for name, _ in IMAGE_INFO_COLUMNS}
    info["bytes"] = len(data)
    info["sha256"] = hashlib.sha256(data).hexdigest()
    return info


def read_image_info(path: str) -> dict[str, Any]:
    """Return header-level properties of the image file at ``path``.

    Keys are those of :data:`IMAGE_INFO_COLUMNS`; unknown values are None.
    Never raises for malformed content (see the ``error`` key); raises
    ``OSError`` (e.g. ``FileNotFoundError``) only if the path cannot be read.
    """
    with open(path, "rb") as fh:
        data = fh.read()
    return image_info_from_bytes(data)


def image_info_from_bytes(data: bytes) -> dict[str, Any]:
    """Same as :func:`read_image_info` for an in-memory file; never raises."""
    return image_info_with_header(data)[0]


def image_info_with_header(data: bytes) -> tuple[dict[str, Any], tuple[Any, Any] | None]:
    """``image_info_from_bytes`` and, from the same Pillow open, what the decoders ask Pillow
    first (``decoders.base.source_header``): (mode, EXIF orientation), ("bomb", message), or
    None when not known here."""
    info, header, _ = image_info_for_decoders(data)
    return info, header


def image_info_for_decoders(data: bytes) -> tuple[dict[str, Any], tuple[Any, Any] | None, Any]:
    """``image_info_with_header`` and the Pillow image of that open, not yet loaded, for the
    Pillow decoder to decode (``decoders.base.remember_header``): a JPEG's, when its open
    raised no warning (those belong to the decode's notes), else None."""
    info = _info(data)
    return info, info.pop("_source_header", None), info.pop("_opened", None)


def _info(data: bytes) -> dict[str, Any]:
    info = _empty_info(data)
    if not data:
        info["error"] = "empty file"
        return info
    if data[:2] == b"\xff\xd8":
        info["format"] = "JPEG"
        info["error"] = _parse_jpeg(data, info)
        return info
    info["error"] = _parse_with_pillow(data, info)
    return info


# --------------------------------------------------------------------- JPEG


def _parse_jpeg(data: bytes, info: dict[str, Any]) -> str | None:
    """Pillow's header facts plus what it lacks (arithmetic, DNL height, completeness)."""
    frame = _jpeg_frame(data)
    pillow_error = _parse_with_pillow(data, info)
    info["format"] = "JPEG"
    sof = frame.get("sof")
    if sof is None:
        return frame.get("problem") or "truncated: no SOF marker"
    info["arithmetic"] = sof in _ARITHMETIC_SOF     # Pillow does not keep which SOF it read
    if pillow_error:  # Pillow refuses e.g. 12-bit samples or a DNL height: the frame says these
        info["width"], info["components"] = frame["width"] or None, frame["components"]
        info["height"] = frame["height"] or None
        info["color_mode"] = {1: "L", 3: "RGB", 4: "CMYK"}.get(frame["components"])
        info["progressive"] = sof in _PROGRESSIVE_SOF
    if frame.get("problem"):
        return frame["problem"]
    sos = frame.get("sos")
    if sos is None:
        return "truncated: no SOS marker (no scan data)"
    if not frame["height"]:     # "defined by the DNL marker" after the first scan
        dnl = data.find(b"\xff\xdc\x00\x04", sos)
        info["height"] = struct.unpack(">H", data[dnl + 4: dnl + 6])[0] or None if dnl >= 0 else None
        if info["height"] is None:
            return "corrupt: zero height in SOF and no DNL marker"
    # 0xFF in entropy-coded data is always stuffed (FF 00), so FF D9 after the scan is the EOI
    if data.find(b"\xff\xd9", sos) < 0:
        return "truncated: no EOI marker"
    if not frame["width"]:
        return "corrupt: zero width in SOF"
    return pillow_error if info["width"] is None else None


def _jpeg_frame(data: bytes) -> dict[str, Any]:
    """The first SOF marker and its size and component count, and where the first scan starts
    (header segments only, up to SOS); ``problem`` names a malformed segment."""
    n, pos = len(data), 2
    out: dict[str, Any] = {"sof": None, "sos": None, "problem": None}
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            pos += 1            # stray bytes between segments, tolerated like libjpeg
            continue
        marker = data[pos + 1]
        if marker == 0xFF or marker in _STANDALONE:
            pos += 1 if marker == 0xFF else 2
            continue
        length = (data[pos + 2] << 8) | data[pos + 3]
        if length < 2:
            out["problem"] = f"corrupt: bad length {length} for marker 0x{marker:02X}"
            return out
        if pos + 2 + length > n:
            return out
        if marker in _SOF_MARKERS and out["sof"] is None:
            if length < 8:
                out["problem"] = "corrupt: short SOF segment"
                return out
            height, width, comps = struct.unpack(">HHB", data[pos + 5: pos + 10])
            out.update(sof=marker, width=width, height=height, components=comps)
            if comps == 0 or length < 8 + 3 * comps:
                out["problem"] = "corrupt: SOF component table too short"
                return out
        elif marker == _SOS:
            if out["sof"] is None:
                out["problem"] = "corrupt: SOS before SOF marker"
            else:
                out["sos"] = pos + 2 + length
            return out
        elif marker == _EOI:
            out["problem"] = "corrupt: EOI before SOF marker"
            return out
        pos += 2 + length
    return out


def _subsampling_name(factors: list[tuple[int, int]]) -> str:
    """Name the chroma subsampling from per-component (H, V) sampling factors (Pillow's
    ``get_sampling`` names only 4:4:4, 4:2:2 and 4:2:0 of YCbCr: -1 for 4:4:0, 4:1:1, CMYK)."""
    if len(factors) == 1:
        return "grey"
    if len(factors) not in (3, 4) or any(h == 0 or v == 0 for h, v in factors):
        return "other"
    luma, cb, cr = factors[0], factors[1], factors[2]
    if cb != cr:
        return "other"
    if len(factors) == 4 and factors[3] != luma:  # YCCK/CMYK: K sampled like Y/C
        return "other"
    if luma[0] % cb[0] or luma[1] % cb[1]:
        return "other"
    ratio = (luma[0] // cb[0], luma[1] // cb[1])
    return _SUBSAMPLING_NAMES.get(ratio, "other")


# ------------------------------------------------------------------- Pillow


def _parse_with_pillow(data: bytes, info: dict[str, Any]) -> str | None:
    """Header-only Pillow open (any format; JPEG facts from its JPEG parser); fill ``info``,
    return an error or None. The same open answers what the decoders ask Pillow first
    (``decoders.base.source_header``: colour mode, EXIF orientation, the bomb guard): it is kept
    under ``info["_source_header"]`` - (mode, orientation), or ("bomb", message) - so an image's
    header is parsed once per worker."""
    from PIL import Image, UnidentifiedImageError
    from PIL.JpegImagePlugin import JpegImageFile

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # DecompressionBombWarning etc., kept, not shown
            im = Image.open(io.BytesIO(data))  # lazy: no pixel decode
            with contextlib.closing(im) if im.format != "JPEG" else contextlib.nullcontext():
                info["format"] = im.format
                info["width"], info["height"] = im.size
                info["color_mode"] = im.mode
                info["components"] = len(im.getbands())
                info["icc"] = bool(im.info.get("icc_profile"))
                if isinstance(im, JpegImageFile):  # JPEG, and MPO (a JPEG naming 2+ pictures)
                    _jpeg_facts(im, info)
                late_exif = im.format == "PNG" and "exif" not in im.info  # asked before any load
                info["_source_header"] = header = _source_header(im, caught)
                info["exif_orientation"] = None if late_exif else _exif_orientation(im, header)
            if im.format == "JPEG" and not caught:
                info["_opened"] = im
    except UnidentifiedImageError:
        info["_source_header"] = (None, None)
        return "not an image"
    except Image.DecompressionBombError as exc:
        info["_source_header"] = ("bomb", str(exc))
        return f"decompression bomb: {exc}"
    except Exception as exc:  # noqa: BLE001 - Pillow plugins raise many types on garbage
        if isinstance(exc, _SOURCE_HEADER_ERRORS):
            info["_source_header"] = (None, None)
        return f"unreadable header: {type(exc).__name__}: {exc}"

    if info["format"] == "PNG" and b"IEND" not in data[-16:]:
        return "truncated: no IEND chunk"
    return None


# what ``decoders.base.parse_source_header`` turns into "Pillow cannot read the header"
_SOURCE_HEADER_ERRORS = (OSError, SyntaxError, ValueError, TypeError, IndexError, KeyError,
                         EOFError, struct.error)


def _source_header(im: Any, caught: list) -> tuple[Any, Any]:
    """(mode, EXIF orientation) as ``parse_source_header`` reads them, or ("bomb", message)."""
    from PIL import Image
    bomb = next((w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)), None)
    if bomb is not None:
        return "bomb", str(bomb.message)
    try:
        orientation = im.getexif().get(_ORIENTATION_TAG)
    except _SOURCE_HEADER_ERRORS:
        return None, None
    return im.mode, orientation if isinstance(orientation, int) else None


def _jpeg_facts(im: Any, info: dict[str, Any]) -> None:
    """What Pillow's JPEG parser read: component sampling, progressive, Adobe transform."""
    layers = getattr(im, "layer", None) or []    # (component id, H, V, quantisation table)
    info["components"] = len(layers) or info["components"]
    if layers:
        info["subsampling"] = _subsampling_name([(h, v) for _, h, v, _ in layers])
    info["progressive"] = bool(im.info.get("progressive"))
    if im.mode == "CMYK" and im.info.get("adobe_transform") == 2:
        info["color_mode"] = "YCCK"


def _exif_orientation(im: Any, header: tuple[Any, Any]) -> int | None:
    """EXIF orientation 1-8 as Pillow's ``getexif`` reads it: the decoders' header's (one read),
    or, for a bomb's (which has none), asked here. Not for a PNG without an eXIf chunk before its
    pixels: Pillow would decode the image to look for one after them."""
    value = header[1]
    if header[0] == "bomb":
        try:
            value = im.getexif().get(_ORIENTATION_TAG)
        except Exception:  # noqa: BLE001 - a corrupt EXIF block leaves the orientation unknown
            value = None
    return value if isinstance(value, int) and 1 <= value <= 8 else None
