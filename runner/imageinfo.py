"""Header-level image properties read straight from the file bytes.

JPEG files are parsed marker by marker (SOF, SOS, APP1 Exif, APP2 ICC,
APP14 Adobe, DNL, EOI); pixels are never decoded, so the answer describes
the *file* rather than what any particular decoder makes of it.  Other
formats go through Pillow's lazy ``Image.open`` (header only, no ``load``).

Every function here accepts arbitrary bytes and returns a dict; problems
are reported in the ``error`` key instead of raised.  Only a path that
cannot be opened raises (``FileNotFoundError`` and friends).
"""

from __future__ import annotations

import hashlib
import io
import re
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
_SOS, _EOI, _DNL = 0xDA, 0xD9, 0xDC
_APP1, _APP2, _APP14 = 0xE1, 0xE2, 0xEE

# Inside entropy-coded data 0xFF is followed by 0x00 (stuffing), RSTn or
# another 0xFF (fill); anything else starts the next marker.
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")

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
    """Walk the JPEG marker chain, fill ``info`` in place, return an error or None."""
    n = len(data)
    pos = 2
    sof_seen = sos_seen = False
    adobe_transform: int | None = None
    icc = False
    orientation: int | None = None
    exif_seen = False

    def finish(error: str | None) -> str | None:
        info["icc"] = icc
        info["exif_orientation"] = orientation
        comps = info["components"]
        if comps == 1:
            info["color_mode"] = "L"
        elif comps == 3:
            info["color_mode"] = "RGB"
        elif comps == 4:
            info["color_mode"] = "YCCK" if adobe_transform == 2 else "CMYK"
        return error

    while True:
        # Find the next 0xFF (tolerating stray bytes between segments, like libjpeg).
        ff = data.find(b"\xff", pos)
        if ff < 0:
            break
        pos = ff
        while pos < n and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= n:
            break
        marker = data[pos]
        pos += 1
        if marker == 0x00:  # stuffed byte outside a scan: garbage, keep looking
            continue
        if marker == _EOI:
            if not sof_seen:
                return finish("corrupt: EOI before SOF marker")
            if not sos_seen:
                return finish("corrupt: EOI before any scan (SOS)")
            if info["height"] is None:
                return finish("corrupt: zero height in SOF and no DNL marker")
            return finish(None)
        if marker in _STANDALONE:
            continue
        if pos + 2 > n:
            break
        length = (data[pos] << 8) | data[pos + 1]
        if length < 2:
            return finish(f"corrupt: bad length {length} for marker 0x{marker:02X}")
        seg_end = pos + length
        if seg_end > n:
            break
        payload = data[pos + 2 : seg_end]
        pos = seg_end

        if marker in _SOF_MARKERS:
            if not sof_seen:  # hierarchical files may carry several frames
                sof_seen = True
                err = _parse_sof(marker, payload, info)
                if err:
                    return finish(err)
        elif marker == _SOS:
            if not sof_seen:
                return finish("corrupt: SOS before SOF marker")
            sos_seen = True
            m = _NEXT_MARKER.search(data, pos)
            if m is None:
                break
            pos = m.start()
        elif marker == _DNL:
            if sof_seen and info["height"] is None and len(payload) >= 2:
                info["height"] = (payload[0] << 8) | payload[1]
        elif marker == _APP1 and payload.startswith(b"Exif\x00") and not exif_seen:
            exif_seen = True
            orientation = _tiff_orientation(payload[6:])
        elif marker == _APP2 and payload.startswith(b"ICC_PROFILE\x00"):
            icc = True
        elif marker == _APP14 and payload.startswith(b"Adobe") and len(payload) >= 12:
            adobe_transform = payload[11]

    # Ran off the end of the data without EOI.
    if not sof_seen:
        return finish("truncated: no SOF marker")
    if not sos_seen:
        return finish("truncated: no SOS marker (no scan data)")
    return finish("truncated: no EOI marker")


def _parse_sof(marker: int, payload: bytes, info: dict[str, Any]) -> str | None:
    """Fill size/components/subsampling/coding flags from an SOFn payload."""
    info["progressive"] = marker in _PROGRESSIVE_SOF
    info["arithmetic"] = marker in _ARITHMETIC_SOF
    if len(payload) < 6:
        return "corrupt: short SOF segment"
    height, width, ncomp = struct.unpack(">HHB", payload[1:6])
    info["height"], info["width"], info["components"] = height, width, ncomp
    if len(payload) < 6 + 3 * ncomp or ncomp == 0:
        return "corrupt: SOF component table too short"
    factors = [(payload[6 + 3 * i + 1] >> 4, payload[6 + 3 * i + 1] & 0x0F) for i in range(ncomp)]
    info["subsampling"] = _subsampling_name(factors)
    if width == 0:
        return "corrupt: zero width in SOF"
    if height == 0:
        info["height"] = None  # defined by a DNL marker after the first scan
    return None


def _subsampling_name(factors: list[tuple[int, int]]) -> str:
    """Name the chroma subsampling from per-component (H, V) sampling factors."""
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


def _tiff_orientation(tiff: bytes) -> int | None:
    """Return the IFD0 Orientation (1-8) of a TIFF/Exif block, or None."""
    if len(tiff) < 8:
        return None
    if tiff[:4] == b"II*\x00":
        endian = "<"
    elif tiff[:4] == b"MM\x00*":
        endian = ">"
    else:
        return None
    (ifd,) = struct.unpack(endian + "I", tiff[4:8])
    if ifd + 2 > len(tiff):
        return None
    (count,) = struct.unpack(endian + "H", tiff[ifd : ifd + 2])
    for i in range(count):
        entry = ifd + 2 + 12 * i
        if entry + 12 > len(tiff):
            return None
        tag, typ, cnt = struct.unpack(endian + "HHI", tiff[entry : entry + 8])
        if tag != _ORIENTATION_TAG or cnt < 1:
            continue
        if typ == 3:  # SHORT, left-justified in the value field
            (value,) = struct.unpack(endian + "H", tiff[entry + 8 : entry + 10])
        elif typ == 4:  # LONG (non-standard but seen in the wild)
            (value,) = struct.unpack(endian + "I", tiff[entry + 8 : entry + 12])
        elif typ == 1:  # BYTE
            value = tiff[entry + 8]
        else:
            return None
        return value if 1 <= value <= 8 else None
    return None


# ------------------------------------------------------------------- Pillow


def _parse_with_pillow(data: bytes, info: dict[str, Any]) -> str | None:
    """Header-only Pillow open for non-JPEG data; fill ``info``, return an error or None."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning etc.
            with Image.open(io.BytesIO(data)) as im:  # lazy: no pixel decode
                info["format"] = im.format
                info["width"], info["height"] = im.size
                info["color_mode"] = im.mode
                info["components"] = len(im.getbands())
                info["icc"] = bool(im.info.get("icc_profile"))
                info["exif_orientation"] = _pillow_orientation(im)
    except UnidentifiedImageError:
        return "not an image"
    except Image.DecompressionBombError as exc:
        return f"decompression bomb: {exc}"
    except Exception as exc:  # noqa: BLE001 - Pillow plugins raise many types on garbage
        return f"unreadable header: {type(exc).__name__}: {exc}"

    if info["format"] == "PNG" and b"IEND" not in data[-16:]:
        return "truncated: no IEND chunk"
    return None


def _pillow_orientation(im: Any) -> int | None:
    """EXIF orientation from header metadata only (never triggers ``load``)."""
    tag_v2 = getattr(im, "tag_v2", None)  # TIFF: orientation is a plain tag
    if tag_v2 is not None:
        value = tag_v2.get(_ORIENTATION_TAG)
        return value if isinstance(value, int) and 1 <= value <= 8 else None
    exif = im.info.get("exif")  # PNG eXIf before IDAT, WebP EXIF chunk, ...
    if not isinstance(exif, (bytes, bytearray)):
        return None
    exif = bytes(exif)
    if exif.startswith(b"Exif\x00\x00"):
        exif = exif[6:]
    return _tiff_orientation(exif)
