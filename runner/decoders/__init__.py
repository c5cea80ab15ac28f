"""Decoder registry: a level label (``pil``, ``opencv``, ``libjpeg:9e``) -> a Decoder instance.

Adding a decoder is one module with a ``Decoder`` subclass plus one line in ``_FACTORIES``.
Optional libraries are imported inside each decoder, so a missing one only makes its level
unavailable (skipped cells). A label with a package version (``pil[pillow==9.4.0]``) is an
``IsolatedDecoder`` in its own environment (``dmx.runner.envs``), built on first use.
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping

from .base import DecodeError, Decoder, DecoderUnavailable, DecodeOptions


def _libjpeg(label: str) -> Decoder:
    from .libjpeg import LibjpegDecoder
    build = label.partition(":")[2]
    if not build:
        raise DecoderUnavailable("libjpeg needs a build, e.g. libjpeg:9e "
                                 "({name: libjpeg, build: 9e})")
    return LibjpegDecoder(build)


def _pil(label: str) -> Decoder:
    from .pil import PilDecoder
    return PilDecoder()


def _opencv(label: str) -> Decoder:
    from .opencv import OpenCVDecoder
    return OpenCVDecoder()


def _simplejpeg(label: str) -> Decoder:
    from .simplejpeg import SimplejpegDecoder
    return SimplejpegDecoder()


def _turbojpeg(label: str) -> Decoder:
    from .turbojpeg import TurboJpegDecoder
    return TurboJpegDecoder()


def _nvjpeg(label: str) -> Decoder:
    from .nvjpeg import NvJpegDecoder
    return NvJpegDecoder()


_FACTORIES: dict[str, Callable[[str], Decoder]] = {
    "pil": _pil,
    "opencv": _opencv,
    "simplejpeg": _simplejpeg,
    "turbojpeg": _turbojpeg,
    "libjpeg": _libjpeg,
    "nvjpeg": _nvjpeg,
}
_CACHE: dict[str, Decoder] = {}
_UNAVAILABLE: dict[str, str] = {}   # package-version labels whose env failed: not retried per call


def _isolated(label: str) -> Decoder:
    """A package-version label; a failed environment build is remembered for this process."""
    if label in _UNAVAILABLE:
        raise DecoderUnavailable(_UNAVAILABLE[label])
    from ..envs import EnvBuildError
    from .isolated import IsolatedDecoder
    try:
        return IsolatedDecoder(label)
    except (EnvBuildError, DecoderUnavailable) as e:
        _UNAVAILABLE[label] = str(e)
        raise DecoderUnavailable(str(e)) from None


def get_decoder(label: str) -> Decoder:
    """The decoder for a level label, built once per process (loading a library such as
    libturbojpeg is not free); raises DecoderUnavailable when it cannot run here."""
    if label in _CACHE:
        return _CACHE[label]
    name = label.split(":")[0].split("[")[0]
    if "[" in label:
        _CACHE[label] = decoder = _isolated(label)
        return decoder
    factory = _FACTORIES.get(name)
    if factory is None:
        raise DecoderUnavailable(f"decoder {label!r} is not available in this installation "
                                 f"(available: {', '.join(sorted(_FACTORIES))})")
    if ":" in label and name != "libjpeg":
        raise DecoderUnavailable(f"{label}: only libjpeg takes a build (libjpeg:9e)")
    _CACHE[label] = decoder = factory(label)
    return decoder


def decode_options(factors: Mapping[str, str | None]) -> DecodeOptions:
    """DecodeOptions from a cell's decode factors; an axis that is absent or null there
    (not swept, or not applicable to the cell's decoder) takes the library default."""
    return DecodeOptions(exif=factors.get("exif") or "apply",
                         reduce=int(factors.get("reduce") or 1),
                         dct=factors.get("dct") or "islow",
                         upsample=factors.get("upsample") or "fancy")


def ensure_decoder_envs(labels: Iterable[str | None]) -> None:
    """Build (or find) the environment of every package-version level up front; raises
    ``dmx.runner.envs.EnvBuildError`` naming the requirement and uv's last lines."""
    from .isolated import ensure_decoder_envs as ensure
    ensure(labels)


def unavailable_reason(factors: Mapping[str, str | None]) -> str | None:
    """Why a cell's decoder cannot run here with the cell's decode options, or None."""
    try:
        decoder = get_decoder(factors.get("decoder") or "pil")
    except DecoderUnavailable as e:
        return str(e)
    return decoder.unsupported(decode_options(factors))


__all__ = ["DecodeError", "DecodeOptions", "Decoder", "DecoderUnavailable", "decode_options",
           "ensure_decoder_envs", "get_decoder", "unavailable_reason"]
