"""Decoder registry: a level label (``pil``, ``opencv``) -> a Decoder instance.

Adding a decoder is one module with a ``Decoder`` subclass plus one line in ``_FACTORIES``.
"""
from __future__ import annotations

from typing import Callable

from .base import DecodeError, Decoder, DecoderUnavailable, DecodeOptions
from .opencv import OpenCVDecoder
from .pil import PilDecoder

_FACTORIES: dict[str, Callable[[str], Decoder]] = {
    "pil": lambda label: PilDecoder(),
    "opencv": lambda label: OpenCVDecoder(),
}


def get_decoder(label: str) -> Decoder:
    """The decoder for a level label; raises DecoderUnavailable when it cannot run here."""
    name = label.split(":")[0].split("[")[0]
    if "[" in label:
        raise DecoderUnavailable(f"{label}: decoder package versions in isolated environments "
                                 "are not supported by this dmx version")
    factory = _FACTORIES.get(name)
    if factory is None:
        raise DecoderUnavailable(f"decoder {label!r} is not available in this installation "
                                 f"(available: {', '.join(sorted(_FACTORIES))})")
    return factory(label)


__all__ = ["DecodeError", "DecodeOptions", "Decoder", "DecoderUnavailable", "get_decoder"]
