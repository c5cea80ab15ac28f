"""Specification tests for dmx.runner.imageinfo and dmx.demo_data.

Every JPEG here is produced by a real encoder (Pillow or OpenCV) in tmp_path;
a few tests then patch single header bytes to reach cases no installed
encoder writes (arithmetic coding, YCCK, little-endian EXIF).
"""

from __future__ import annotations

import hashlib
import io
import random
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageCms, ImageOps

from dmx.demo_data import BAD_FILES, MAX_SIDE, build_demo_images, demo_sources
from dmx.runner.imageinfo import IMAGE_INFO_COLUMNS, image_info_from_bytes, read_image_info

W, H = 40, 24  # px; deliberately non-square so width/height swaps are caught


def _photo(mode: str = "RGB") -> Image.Image:
    """Small deterministic test image: gradients plus noise."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:H, 0:W]
    rgb = np.stack([x * 6, y * 10, (x + y) * 4], axis=-1) + rng.integers(0, 40, (H, W, 3))
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB").convert(mode)


def _jpeg(img: Image.Image | None = None, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    (img or _photo()).save(buf, format="JPEG", quality=90, **kwargs)
    return buf.getvalue()


def _write(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def _segment(data: bytes, marker: int) -> int:
    """Offset of the first segment with this marker byte in a JPEG."""
    offset = data.find(bytes([0xFF, marker]))
    assert offset > 0, f"marker 0x{marker:02X} not found"
    return offset


def _exif_app1(orientation: int, byte_order: str) -> bytes:
    """An APP1 Exif segment whose IFD0 holds only Orientation (SHORT)."""
    e = "<" if byte_order == "II" else ">"
    magic = b"II*\x00" if byte_order == "II" else b"MM\x00*"
    tiff = magic + struct.pack(e + "I", 8) + struct.pack(e + "H", 1)
    tiff += struct.pack(e + "HHIH2x", 0x0112, 3, 1, orientation) + struct.pack(e + "I", 0)
    payload = b"Exif\x00\x00" + tiff
    return b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload


# ------------------------------------------------------------------ basics


def test_every_info_dict_has_exactly_the_declared_columns(tmp_path: Path) -> None:
    info = read_image_info(_write(tmp_path, "a.jpg", _jpeg()))
    assert list(info) == [name for name, _ in IMAGE_INFO_COLUMNS]
    pa = pytest.importorskip("pyarrow")
    for _, type_name in IMAGE_INFO_COLUMNS:
        pa.type_for_alias(type_name)


def test_width_and_height_are_the_stored_dimensions(tmp_path: Path) -> None:
    info = read_image_info(_write(tmp_path, "a.jpg", _jpeg()))
    assert (info["format"], info["width"], info["height"]) == ("JPEG", W, H)
    assert info["error"] is None


def test_bytes_and_sha256_describe_the_file_contents(tmp_path: Path) -> None:
    data = _jpeg()
    info = read_image_info(_write(tmp_path, "a.jpg", data))
    assert info["bytes"] == len(data)
    assert info["sha256"] == hashlib.sha256(data).hexdigest()


def test_missing_path_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_image_info(str(tmp_path / "nope.jpg"))


# ------------------------------------------------------------- subsampling


@pytest.mark.parametrize("subsampling", ["4:4:4", "4:2:2", "4:2:0"])
def test_pillow_chroma_subsampling_is_reported(tmp_path: Path, subsampling: str) -> None:
    info = read_image_info(_write(tmp_path, "a.jpg", _jpeg(subsampling=subsampling)))
    assert info["subsampling"] == subsampling
    assert (info["components"], info["color_mode"]) == (3, "RGB")


@pytest.mark.parametrize(
    ("flag", "expected"),
    [
        ("IMWRITE_JPEG_SAMPLING_FACTOR_444", "4:4:4"),
        ("IMWRITE_JPEG_SAMPLING_FACTOR_422", "4:2:2"),
        ("IMWRITE_JPEG_SAMPLING_FACTOR_420", "4:2:0"),
        ("IMWRITE_JPEG_SAMPLING_FACTOR_440", "4:4:0"),
        ("IMWRITE_JPEG_SAMPLING_FACTOR_411", "4:1:1"),
    ],
)
def test_opencv_chroma_subsampling_is_reported(tmp_path: Path, flag: str, expected: str) -> None:
    if not hasattr(cv2, flag):
        pytest.skip(f"this OpenCV has no {flag}")
    bgr = np.asarray(_photo())[:, :, ::-1].copy()
    ok, enc = cv2.imencode(
        ".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 90, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, getattr(cv2, flag)]
    )
    assert ok
    info = read_image_info(_write(tmp_path, "a.jpg", enc.tobytes()))
    assert info["subsampling"] == expected
    assert (info["width"], info["height"], info["progressive"]) == (W, H, False)


def test_greyscale_jpeg_is_one_component_grey_L(tmp_path: Path) -> None:
    info = read_image_info(_write(tmp_path, "a.jpg", _jpeg(_photo("L"))))
    assert (info["subsampling"], info["components"], info["color_mode"]) == ("grey", 1, "L")


# -------------------------------------------------------- coding process


def test_baseline_jpeg_is_neither_progressive_nor_arithmetic(tmp_path: Path) -> None:
    info = read_image_info(_write(tmp_path, "a.jpg", _jpeg()))
    assert info["progressive"] is False
    assert info["arithmetic"] is False


def test_progressive_jpeg_is_flagged_progressive(tmp_path: Path) -> None:
    info = read_image_info(_write(tmp_path, "a.jpg", _jpeg(progressive=True)))
    assert info["progressive"] is True
    assert info["error"] is None  # multi-scan entropy data walked to EOI


def test_sof9_marker_means_arithmetic_coding(tmp_path: Path) -> None:
    data = bytearray(_jpeg())
    data[_segment(bytes(data), 0xC0) + 1] = 0xC9  # SOF0 -> SOF9 (header only)
    info = read_image_info(_write(tmp_path, "a.jpg", bytes(data)))
    assert (info["arithmetic"], info["progressive"], info["width"]) == (True, False, W)


def test_zero_height_in_sof_is_taken_from_the_dnl_marker(tmp_path: Path) -> None:
    data = bytearray(_jpeg())
    sof = _segment(bytes(data), 0xC0)
    data[sof + 5 : sof + 7] = b"\x00\x00"  # height 0: "defined by DNL"
    eoi = len(data) - 2
    assert data[eoi:] == b"\xff\xd9"
    with_dnl = bytes(data[:eoi]) + b"\xff\xdc\x00\x04" + struct.pack(">H", H) + b"\xff\xd9"
    info = read_image_info(_write(tmp_path, "a.jpg", with_dnl))
    assert (info["width"], info["height"], info["error"]) == (W, H, None)
    info = read_image_info(_write(tmp_path, "b.jpg", bytes(data)))
    assert info["height"] is None and "DNL" in str(info["error"])


# ----------------------------------------------------------------- EXIF


def test_exif_orientation_6_written_by_pillow_is_reported(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    info = read_image_info(_write(tmp_path, "a.jpg", _jpeg(exif=exif.tobytes())))
    assert info["exif_orientation"] == 6
    assert (info["width"], info["height"]) == (W, H)  # stored, not rotated


@pytest.mark.parametrize("byte_order", ["II", "MM"])
@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_exif_orientation_is_read_in_both_byte_orders(
    tmp_path: Path, byte_order: str, orientation: int
) -> None:
    base = _jpeg()
    data = base[:2] + _exif_app1(orientation, byte_order) + base[2:]
    assert Image.open(io.BytesIO(data)).getexif()[0x0112] == orientation  # Pillow agrees
    info = read_image_info(_write(tmp_path, "a.jpg", data))
    assert info["exif_orientation"] == orientation
    assert info["error"] is None


def test_jpeg_without_exif_has_no_orientation(tmp_path: Path) -> None:
    assert read_image_info(_write(tmp_path, "a.jpg", _jpeg()))["exif_orientation"] is None


def test_out_of_range_orientation_is_treated_as_absent(tmp_path: Path) -> None:
    base = _jpeg()
    data = base[:2] + _exif_app1(9, "MM") + base[2:]
    assert read_image_info(_write(tmp_path, "a.jpg", data))["exif_orientation"] is None


# ------------------------------------------------------------ colour model


def test_pillow_cmyk_jpeg_is_four_component_cmyk(tmp_path: Path) -> None:
    info = read_image_info(_write(tmp_path, "a.jpg", _jpeg(_photo("CMYK"))))
    assert (info["components"], info["color_mode"]) == (4, "CMYK")
    assert info["subsampling"] == "4:4:4"


def test_adobe_transform_2_means_ycck(tmp_path: Path) -> None:
    data = bytearray(_jpeg(_photo("CMYK")))
    app14 = _segment(bytes(data), 0xEE)
    assert data[app14 + 4 : app14 + 9] == b"Adobe"
    data[app14 + 4 + 11] = 2  # transform byte: 0 = CMYK, 2 = YCCK
    info = read_image_info(_write(tmp_path, "a.jpg", bytes(data)))
    assert info["color_mode"] == "YCCK"


def test_icc_profile_presence_is_reported_for_jpeg(tmp_path: Path) -> None:
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    with_icc = read_image_info(_write(tmp_path, "a.jpg", _jpeg(icc_profile=srgb)))
    without = read_image_info(_write(tmp_path, "b.jpg", _jpeg()))
    assert (with_icc["icc"], without["icc"]) == (True, False)


def test_png_is_described_from_its_header(tmp_path: Path) -> None:
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    buf = io.BytesIO()
    _photo("RGBA").save(buf, format="PNG", icc_profile=srgb)
    info = read_image_info(_write(tmp_path, "a.png", buf.getvalue()))
    assert (info["format"], info["width"], info["height"]) == ("PNG", W, H)
    assert (info["color_mode"], info["components"], info["icc"]) == ("RGBA", 4, True)
    assert info["subsampling"] is None and info["progressive"] is None
    assert info["error"] is None


# ---------------------------------------------------------------- bad files


def test_empty_file_is_an_error_not_an_exception(tmp_path: Path) -> None:
    info = read_image_info(_write(tmp_path, "a.jpg", b""))
    assert (info["error"], info["format"], info["bytes"]) == ("empty file", None, 0)


@pytest.mark.parametrize("text", [b"hello world\n", b"P6 not really\n", b"<svg></svg>", b"GIF8"])
def test_text_file_is_not_an_image(tmp_path: Path, text: bytes) -> None:
    info = read_image_info(_write(tmp_path, "a.jpg", text))
    assert info["format"] is None
    assert info["error"]


def test_jpeg_cut_mid_scan_is_truncated_but_keeps_its_header(tmp_path: Path) -> None:
    data = _jpeg()
    cut = (_segment(data, 0xDA) + len(data)) // 2  # halfway through the entropy-coded data
    info = read_image_info(_write(tmp_path, "a.jpg", data[:cut]))
    assert info["error"] == "truncated: no EOI marker"
    assert (info["format"], info["width"], info["subsampling"]) == ("JPEG", W, "4:2:0")


def test_jpeg_cut_before_the_frame_header_has_no_sof(tmp_path: Path) -> None:
    data = _jpeg()
    info = read_image_info(_write(tmp_path, "a.jpg", data[: _segment(data, 0xC0)]))
    assert info["error"] == "truncated: no SOF marker"
    assert info["width"] is None


def test_truncated_png_is_reported(tmp_path: Path) -> None:
    buf = io.BytesIO()
    _photo().save(buf, format="PNG")
    info = read_image_info(_write(tmp_path, "a.png", buf.getvalue()[:-20]))
    assert info["format"] == "PNG"
    assert info["error"] and info["error"].startswith("truncated")


def test_any_bytes_give_a_complete_dict_and_never_raise() -> None:
    """Fuzz: every prefix of a JPEG header region, byte flips and random noise."""
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif[0x0112] = 6
    good = _jpeg(icc_profile=srgb, exif=exif.tobytes(), progressive=True)
    rng = random.Random(1234)
    cases = [good[:n] for n in range(0, len(good), 7)]
    for _ in range(300):
        mutated = bytearray(good)
        for _ in range(rng.randint(1, 8)):
            mutated[rng.randrange(2, len(mutated))] = rng.randrange(256)
        cases.append(bytes(mutated))
    cases += [rng.randbytes(rng.randint(1, 300)) for _ in range(100)]
    cases += [b"\xff\xd8" + rng.randbytes(rng.randint(0, 300)) for _ in range(200)]
    cases += [b"\xff\xd8\xff", b"\xff\xd8\xff\xe1\x00\x00", b"\xff\xd8\xff\xc0\x00\x02", b"\xff" * 50]
    columns = [name for name, _ in IMAGE_INFO_COLUMNS]
    for data in cases:
        info = image_info_from_bytes(data)
        assert list(info) == columns
        if info["error"] is None:
            assert info["width"] and info["height"]


# ----------------------------------------------------------------- demo set


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    dest = tmp_path_factory.mktemp("demo")
    return dest, build_demo_images(str(dest))


def _demo_info(demo: tuple[Path, list[str]]) -> dict[str, dict[str, object]]:
    dest, paths = demo
    return {str(Path(p).relative_to(dest)): read_image_info(p) for p in paths}


def test_demo_has_about_twenty_good_images_plus_the_bad_files(demo: tuple[Path, list[str]]) -> None:
    dest, paths = demo
    assert paths == sorted(paths)
    names = [str(Path(p).relative_to(dest)) for p in paths]
    assert sorted(n for n in names if n.startswith("bad/")) == sorted(f"bad/{b}" for b in BAD_FILES)
    good = [n for n in names if not n.startswith("bad/")]
    assert len(demo_sources()) >= 4
    assert {f"{s}_420.jpg" for s in demo_sources()} <= set(good)
    for suffix in ("_444", "_422", "_prog", "_cv2", "_grey", "_cmyk", "_exif6"):
        assert any(n.endswith(f"{suffix}.jpg") for n in good), suffix
    assert 15 <= len(good) <= 25


def test_demo_files_carry_their_intended_properties(demo: tuple[Path, list[str]]) -> None:
    expected: dict[str, dict[str, object]] = {
        "_420": {"subsampling": "4:2:0", "progressive": False, "color_mode": "RGB"},
        "_444": {"subsampling": "4:4:4", "progressive": False},
        "_422": {"subsampling": "4:2:2", "progressive": False},
        "_prog": {"progressive": True},
        "_cv2": {"subsampling": "4:2:0", "progressive": False, "icc": False},
        "_grey": {"subsampling": "grey", "color_mode": "L", "components": 1},
        "_cmyk": {"color_mode": "CMYK", "components": 4},
        "_exif6": {"exif_orientation": 6},
    }
    for name, info in _demo_info(demo).items():
        if name.startswith("bad/"):
            continue
        assert info["format"] == "JPEG" and info["error"] is None, name
        assert max(info["width"], info["height"]) <= MAX_SIDE, name
        suffix = name[name.rindex("_") : -len(".jpg")]
        for key, value in expected[suffix].items():
            assert info[key] == value, (name, key, info[key])
        if suffix != "_exif6":
            assert info["exif_orientation"] is None, name


def test_demo_bad_files_report_errors(demo: tuple[Path, list[str]]) -> None:
    infos = _demo_info(demo)
    assert infos["bad/empty.jpg"]["error"] == "empty file"
    assert infos["bad/not_an_image.jpg"]["error"] == "not an image"
    assert str(infos["bad/truncated.jpg"]["error"]).startswith("truncated")
    assert infos["bad/truncated.jpg"]["format"] == "JPEG"


def test_demo_exif6_file_is_upright_once_orientation_is_applied(demo: tuple[Path, list[str]]) -> None:
    dest, _ = demo
    for exif6 in sorted(dest.glob("*_exif6.jpg")):
        upright = np.asarray(Image.open(str(exif6).replace("_exif6", "_420")).convert("RGB"), float)
        stored = Image.open(exif6)
        assert stored.size == upright.shape[:2]  # stored with width/height swapped
        fixed = np.asarray(ImageOps.exif_transpose(stored).convert("RGB"), float)
        assert fixed.shape == upright.shape
        err = np.abs(fixed - upright).mean()
        assert err < 4.0, (exif6.name, err)
        wrong = np.asarray(stored.transpose(Image.Transpose.ROTATE_90).convert("RGB"), float)
        if wrong.shape == upright.shape:  # square photo: the other rotation must be far off
            assert np.abs(wrong - upright).mean() > 4 * err


def test_demo_build_is_idempotent(demo: tuple[Path, list[str]]) -> None:
    dest, paths = demo
    before = {p: Path(p).stat().st_mtime_ns for p in paths}
    assert build_demo_images(str(dest)) == paths
    assert {p: Path(p).stat().st_mtime_ns for p in paths} == before


def test_demo_rebuilds_a_damaged_file(demo: tuple[Path, list[str]], tmp_path: Path) -> None:
    dest = tmp_path / "copy"
    paths = build_demo_images(str(dest))
    victim = Path(next(p for p in paths if p.endswith("_444.jpg")))
    good = victim.read_bytes()
    victim.write_bytes(b"damaged")
    assert build_demo_images(str(dest)) == paths
    assert victim.read_bytes() == good


# ------------------------------------------------- Pillow's reading, not a second parser


def _png_with_exif_chunk_after_idat(orientation: int) -> bytes:
    """A PNG whose eXIf chunk follows the pixel data (allowed by the PNG spec)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    _photo().save(buf, format="PNG", exif=exif.tobytes())
    data = buf.getvalue()
    start = data.index(b"eXIf") - 4
    (length,) = struct.unpack(">I", data[start : start + 4])
    chunk = data[start : start + 12 + length]
    data = data[:start] + data[start + 12 + length :]
    iend = data.index(b"IEND") - 4
    return data[:iend] + chunk + data[iend:]


def test_a_jpeg_pillow_opens_as_mpo_is_described_as_a_jpeg(tmp_path: Path) -> None:
    buf = io.BytesIO()
    _photo().save(buf, format="MPO", save_all=True, append_images=[_photo("L").convert("RGB")])
    assert Image.open(io.BytesIO(buf.getvalue())).format == "MPO"
    info = read_image_info(_write(tmp_path, "a.jpg", buf.getvalue()))
    assert (info["format"], info["subsampling"], info["progressive"]) == ("JPEG", "4:2:0", False)
    assert (info["components"], info["color_mode"], info["error"]) == (3, "RGB", None)


def test_xmp_orientation_of_a_webp_is_the_one_the_decoders_apply() -> None:
    from dmx.runner.decoders.base import parse_source_header
    xmp = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/'
           b'02/22-rdf-syntax-ns#"><rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" '
           b'tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')
    buf = io.BytesIO()
    _photo().save(buf, format="WEBP", xmp=xmp)
    assert parse_source_header(buf.getvalue()) == ("RGB", 6)
    assert image_info_from_bytes(buf.getvalue())["exif_orientation"] == 6


def test_png_exif_after_the_pixels_is_not_looked_for_in_the_header() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    early = io.BytesIO()
    _photo().save(early, format="PNG", exif=exif.tobytes())
    assert image_info_from_bytes(early.getvalue())["exif_orientation"] == 6
    late = image_info_from_bytes(_png_with_exif_chunk_after_idat(6))
    assert (late["exif_orientation"], late["error"]) == (None, None)


def test_exif_orientation_is_the_one_the_decoders_read_for_every_format() -> None:
    """images.parquet's orientation and the decoders' (Pillow's getexif) agree, corrupt EXIF
    blocks included: one reading, not two."""
    from dmx.runner.decoders.base import DecodeError, parse_source_header
    exif = Image.Exif()
    exif[0x0112] = 6
    files = [_jpeg(exif=exif.tobytes())]
    for fmt in ("WEBP", "TIFF"):
        buf = io.BytesIO()
        _photo().save(buf, format=fmt, exif=exif.tobytes())
        files.append(buf.getvalue())
    rng = random.Random(5)
    cases = []
    for good in files:
        at = good.find(b"MM\x00*") if good.find(b"MM\x00*") > 0 else good.find(b"II*\x00")
        for _ in range(150):
            mutated = bytearray(good)
            for _ in range(rng.randint(1, 3)):  # inside the EXIF block
                mutated[rng.randrange(at, min(at + 40, len(good)))] = rng.randrange(256)
            cases.append(bytes(mutated))
    for data in files + cases:
        try:
            mode, orientation = parse_source_header(data)
        except DecodeError:  # a flipped TIFF size made a decompression bomb
            continue
        want = orientation if mode is not None and orientation in range(1, 9) else None
        assert image_info_from_bytes(data)["exif_orientation"] == want


def test_a_bomb_sized_jpeg_keeps_its_orientation_and_the_bomb_header() -> None:
    from dmx.runner.imageinfo import image_info_with_header
    exif = Image.Exif()
    exif[0x0112] = 6
    data = bytearray(_jpeg(exif=exif.tobytes()))
    sof = _segment(bytes(data), 0xC0)
    data[sof + 5 : sof + 9] = struct.pack(">HH", 10_000, 10_000)  # 1e8 px: Pillow warns
    info, header = image_info_with_header(bytes(data))
    assert header is not None and header[0] == "bomb"
    assert (info["width"], info["exif_orientation"]) == (10_000, 6)
