"""nvJPEG on the GPU through ``torchvision.io.decode_jpeg(device="cuda")``.

Needs torchvision and a CUDA GPU; where either is missing the level is a skipped cell. nvJPEG
applies EXIF orientation only when asked (``apply_exif_orientation``), and fails on CMYK files
(measured on an H100): those become error rows with nvJPEG's message.
"""
from __future__ import annotations

import numpy as np

from .base import DecodeError, Decoder, DecoderUnavailable, DecodeOptions, source_header


class NvJpegDecoder(Decoder):
    system_name = "nvjpeg"

    def __init__(self) -> None:
        try:
            import torch
            import torchvision.io  # noqa: F401
        except (ImportError, RuntimeError) as e:
            raise DecoderUnavailable(f"nvjpeg needs torchvision with GPU decoding: {e}") from None
        if not torch.cuda.is_available():
            raise DecoderUnavailable("nvjpeg: no CUDA GPU visible to torch here")

    def _decode(self, data: bytes, options: DecodeOptions) -> np.ndarray:
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg
        mode, orientation = source_header(data)
        try:
            t = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                            mode=ImageReadMode.RGB, device="cuda",
                            apply_exif_orientation=options.exif == "apply")
        except RuntimeError as e:
            raise DecodeError(f"nvjpeg: {str(e).splitlines()[0]}") from None
        if mode not in (None, "RGB"):
            self._note(f"{mode}->RGB (nvJPEG)")
        self._note_exif(orientation, options, "nvJPEG")
        return t.permute(1, 2, 0).contiguous().cpu().numpy()

    def version(self) -> dict[str, str | None]:
        import torch
        import torchvision
        return {"library": "torchvision-nvjpeg", "version": torchvision.__version__,
                "libjpeg": f"nvJPEG (CUDA {torch.version.cuda})"}
