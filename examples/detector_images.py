"""Build the detector example's dataset: dmx's demo photos plus three text-bearing images that
ship with scikit-image (a scanned page, a photographed text sign, a stereo-motorcycle photo with
lettering), all re-encoded as baseline 4:2:0 JPEGs by Pillow. Nothing is downloaded.

Usage: python examples/detector_images.py [DEST]   (default: examples/detector-images)
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

from dmx.demo_data import build_demo_images

TEXT_IMAGES = ("page", "text", "stereo_motorcycle")


def build(dest: str) -> list[str]:
    import skimage.data
    out = list(build_demo_images(dest))
    for name in TEXT_IMAGES:
        img = getattr(skimage.data, name)()
        img = img[0] if isinstance(img, tuple) else img  # stereo_motorcycle: (left, right, disparity)
        path = Path(dest) / f"{name}_420.jpg"
        Image.fromarray(np.asarray(img, np.uint8)).save(path, quality=90, subsampling=2)
        out.append(str(path))
    return out


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).with_name("detector-images"))
    print(f"{len(build(target))} images in {target}")
