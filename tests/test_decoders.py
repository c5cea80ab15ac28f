"""Decoders in depth: libjpeg builds, simplejpeg/PyTurboJPEG, decode options, notes, bad files.

Every JPEG here is a real photo (scikit-image's) encoded by Pillow into a temp dir, at odd sizes
so that reduced decodes must round.
"""
from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from dmx.matrix.axes import AXES
from dmx.matrix.cells import make_cell
from dmx.runner.decoders import (DecodeError, DecodeOptions, DecoderUnavailable, decode_options,
                             get_decoder, unavailable_reason)
from dmx.runner.decoders.base import inverted_cmyk_to_rgb
from dmx.runner.plan import Plan
from dmx.runner.worker import Worker

W, H = 241, 161      # px, odd on purpose
ORIENTATION = 0x0112
BAD_FILES = ("truncated.jpg", "empty.jpg", "text.jpg", "bad_scan.jpg")
ALL_DECODERS = ("pil", "opencv", "simplejpeg", "turbojpeg", "libjpeg:9e", "libjpeg:turbo210")
TURBO_BASED = ("pil", "opencv", "simplejpeg", "turbojpeg", "libjpeg:turbo210", "libjpeg:6b")


def _photo(name: str, size: tuple[int, int] = (W, H)) -> Image.Image:
    import skimage.data
    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize(size)


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4:2:0, 4:2:2, 4:4:4, grey, CMYK, EXIF-rotated and broken JPEGs, made by Pillow."""
    d = tmp_path_factory.mktemp("jpegs")
    chelsea = _photo("chelsea")
    chelsea.save(d / "420.jpg", quality=90, subsampling=2)
    chelsea.save(d / "422.jpg", quality=90, subsampling=1)
    chelsea.save(d / "444.jpg", quality=90, subsampling=0)
    chelsea.convert("L").save(d / "grey.jpg", quality=90)
    chelsea.convert("CMYK").save(d / "cmyk.jpg", quality=90)
    for k in range(1, 9):
        exif = Image.Exif()
        exif[ORIENTATION] = k
        chelsea.save(d / f"exif{k}.jpg", quality=90, exif=exif)
    data = (d / "420.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (d / "bad_scan.jpg").write_bytes(_bad_progressive_scan(chelsea))
    (d / "empty.jpg").write_bytes(b"")
    (d / "text.jpg").write_text("this is text, not a JPEG")
    return d


def _bad_progressive_scan(img: Image.Image) -> bytes:
    """A progressive JPEG whose third scan header asks for impossible coefficients (Ss=70):
    every marker is in place, so only the decoder itself can find the damage."""
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, progressive=True)
    data = bytearray(buf.getvalue())
    sos = [i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] == 0xDA]
    spectral = sos[2] + 5 + 2 * data[sos[2] + 4]     # after the component selectors
    data[spectral: spectral + 2] = bytes([70, 80])
    return bytes(data)


def decoder_or_skip(label: str):
    """The decoder, or a skipped test naming why it cannot run here (e.g. no libturbojpeg 3)."""
    try:
        return get_decoder(label)
    except DecoderUnavailable as e:
        pytest.skip(str(e))


def decode(label: str, path: Path, **options) -> np.ndarray:
    return decoder_or_skip(label).decode(path.read_bytes(), DecodeOptions(**options))


def frac_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of pixels (any channel) that differ, 0-1."""
    return float(np.mean(np.any(a != b, axis=-1)))


def max_abs(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


# --- libjpeg builds ------------------------------------------------------------------------

def test_pil_and_opencv_decode_an_ordinary_420_jpeg_bit_identically(jpegs: Path):
    assert np.array_equal(decode("pil", jpegs / "420.jpg"), decode("opencv", jpegs / "420.jpg"))


@pytest.mark.parametrize("label", TURBO_BASED[1:])
def test_every_libjpeg_turbo_decoder_agrees_with_pillow_on_a_420_jpeg(jpegs: Path, label: str):
    # libjpeg 6b is where libjpeg-turbo forked from: same IDCT and upsampling
    assert np.array_equal(decode(label, jpegs / "420.jpg"), decode("pil", jpegs / "420.jpg"))


@pytest.mark.parametrize("name,subsampled", [("420.jpg", True), ("422.jpg", True),
                                             ("444.jpg", False), ("grey.jpg", False)])
def test_ijg_9e_differs_from_turbo_only_on_subsampled_jpegs(jpegs: Path, name: str,
                                                            subsampled: bool):
    ijg, turbo = decode("libjpeg:9e", jpegs / name), decode("libjpeg:turbo210", jpegs / name)
    if subsampled:       # IJG 7+ upsamples chroma in its scaled IDCT, turbo with a triangle filter
        assert frac_diff(ijg, turbo) > 0.2
    else:                # 9a+ can still differ by 1 on a few saturated pixels of 4:4:4 files
        assert frac_diff(ijg, turbo) < 1e-3 and max_abs(ijg, turbo) <= 1


def test_unknown_libjpeg_build_is_unavailable_and_lists_the_bundled_builds():
    with pytest.raises(DecoderUnavailable, match=r"'10z'.*available: .*9e.*turbo210"):
        get_decoder("libjpeg:10z")


def test_libjpeg_cmyk_is_converted_with_pillows_formula(jpegs: Path):
    dec = get_decoder("libjpeg:9e")
    img = dec.decode((jpegs / "cmyk.jpg").read_bytes(), DecodeOptions())
    assert np.array_equal(img, decode("pil", jpegs / "cmyk.jpg"))
    assert dec.last_note == "CMYK->RGB (libjpeg to CMYK, then dmx with Pillow's formula)"


def test_inverted_cmyk_formula_matches_pillow_on_every_ink_level():
    c, k = np.meshgrid(np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.uint8))
    cmyk = np.stack([c, c[::-1], k[::-1], k], axis=-1)            # real CMYK, 0 = no ink
    pillow = np.asarray(Image.fromarray(cmyk, "CMYK").convert("RGB"))
    assert np.array_equal(inverted_cmyk_to_rgb(255 - cmyk), pillow)


# --- EXIF orientation ----------------------------------------------------------------------

@pytest.mark.parametrize("label", ALL_DECODERS)
def test_exif_orientation_6_applied_gives_the_transposed_shape(jpegs: Path, label: str):
    assert decode(label, jpegs / "exif6.jpg", exif="apply").shape == (W, H, 3)


@pytest.mark.parametrize("label", ALL_DECODERS)
def test_exif_orientation_6_ignored_gives_the_stored_shape(jpegs: Path, label: str):
    assert decode(label, jpegs / "exif6.jpg", exif="ignore").shape == (H, W, 3)


@pytest.mark.parametrize("label", ["simplejpeg", "turbojpeg", "libjpeg:turbo210"])
@pytest.mark.parametrize("k", range(1, 9))
def test_numpy_orientation_matches_pillow_exif_transpose(jpegs: Path, label: str, k: int):
    ours = decode(label, jpegs / f"exif{k}.jpg", exif="apply")
    pillow = np.asarray(ImageOps.exif_transpose(Image.open(jpegs / f"exif{k}.jpg")))
    assert np.array_equal(ours, pillow)


@pytest.mark.parametrize("label", ALL_DECODERS)
def test_decode_note_says_whether_exif_orientation_was_applied(jpegs: Path, label: str):
    dec = decoder_or_skip(label)
    dec.decode((jpegs / "exif6.jpg").read_bytes(), DecodeOptions(exif="apply"))
    assert dec.last_note is not None and dec.last_note.startswith("EXIF orientation 6 applied")
    dec.decode((jpegs / "exif6.jpg").read_bytes(), DecodeOptions(exif="ignore"))
    assert dec.last_note == "EXIF orientation 6 ignored"


# --- decode options ------------------------------------------------------------------------

@pytest.mark.parametrize("label", ["pil", "opencv", "simplejpeg", "turbojpeg"])
@pytest.mark.parametrize("n", [2, 4, 8])
def test_reduce_divides_the_size_rounding_up(jpegs: Path, label: str, n: int):
    assert decode(label, jpegs / "420.jpg", reduce=n).shape == (-(-H // n), -(-W // n), 3)


@pytest.mark.parametrize("label", ["opencv", "simplejpeg", "turbojpeg"])
def test_reduced_decodes_agree_with_pillow_draft_bit_for_bit(jpegs: Path, label: str):
    assert np.array_equal(decode(label, jpegs / "420.jpg", reduce=2),
                          decode("pil", jpegs / "420.jpg", reduce=2))


@pytest.mark.parametrize("label", ["libjpeg:9e", "libjpeg:turbo210", "simplejpeg", "turbojpeg"])
def test_fast_dct_differs_from_islow(jpegs: Path, label: str):
    islow = decode(label, jpegs / "420.jpg", dct="islow")
    assert frac_diff(decode(label, jpegs / "420.jpg", dct="ifast"), islow) > 0.05


@pytest.mark.parametrize("label", ["libjpeg:9e", "libjpeg:turbo210"])
def test_float_dct_differs_from_islow_in_a_few_pixels(jpegs: Path, label: str):
    islow = decode(label, jpegs / "444.jpg", dct="islow")
    assert 0 < frac_diff(decode(label, jpegs / "444.jpg", dct="float"), islow) < 0.5


@pytest.mark.parametrize("label", ["libjpeg:9e", "libjpeg:turbo210", "simplejpeg", "turbojpeg"])
def test_fast_upsampling_differs_from_fancy_on_a_420_jpeg(jpegs: Path, label: str):
    fancy = decode(label, jpegs / "420.jpg", upsample="fancy")
    assert frac_diff(decode(label, jpegs / "420.jpg", upsample="fast"), fancy) > 0.1


@pytest.mark.parametrize("label", ["libjpeg:9e", "simplejpeg"])
def test_fast_upsampling_changes_nothing_on_a_444_jpeg(jpegs: Path, label: str):
    assert np.array_equal(decode(label, jpegs / "444.jpg", upsample="fast"),
                          decode(label, jpegs / "444.jpg", upsample="fancy"))


@pytest.mark.parametrize("label,options", [("pil", {"dct": "ifast"}),
                                           ("opencv", {"upsample": "fast"}),
                                           ("simplejpeg", {"dct": "float"}),
                                           ("libjpeg:9e", {"reduce": 2})])
def test_an_option_the_library_lacks_is_refused_not_ignored(jpegs: Path, label: str,
                                                            options: dict):
    with pytest.raises(DecoderUnavailable, match="cannot decode with"):
        decode(label, jpegs / "420.jpg", **options)


def test_decode_option_axes_are_null_for_decoders_without_them():
    order = ("decoder", "reduce", "dct", "upsample")
    pil = make_cell({"decoder": "pil", "reduce": "2", "dct": "ifast", "upsample": "fast"}, order)
    ijg = make_cell({"decoder": "libjpeg:9e", "reduce": "2", "dct": "ifast", "upsample": "fast"},
                    order)
    assert dict(pil.factors) == {"decoder": "pil", "reduce": "2", "dct": None, "upsample": None}
    assert dict(ijg.factors) == {"decoder": "libjpeg:9e", "reduce": None, "dct": "ifast",
                                 "upsample": "fast"}
    assert all(AXES[a].stage == "decode" for a in order)


def test_a_float_dct_cell_on_simplejpeg_has_a_reason_to_be_skipped():
    assert "offers islow, ifast" in unavailable_reason({"decoder": "simplejpeg", "dct": "float"})
    assert unavailable_reason({"decoder": "libjpeg:9e", "dct": "float"}) is None


def test_decode_options_default_to_the_libraries_defaults():
    assert decode_options({"decoder": "pil", "dct": None}) == DecodeOptions(
        exif="apply", reduce=1, dct="islow", upsample="fancy")


def test_color_bgr_is_the_channel_swap_of_rgb(jpegs: Path):
    plan = Plan(run_id="t", axes=("decoder", "color"), cells=(), reference_id="", skipped={},
                model=None, artifacts=None)  # type: ignore[arg-type]  # decoding needs no model
    worker, data = Worker(plan), (jpegs / "420.jpg").read_bytes()
    rgb = worker._decode(data, {"decoder": "simplejpeg", "color": "rgb"})
    bgr = worker._decode(data, {"decoder": "simplejpeg", "color": "bgr"})
    assert np.array_equal(bgr.pixels, rgb.pixels[..., ::-1])


# --- colour conversions and notes ----------------------------------------------------------

@pytest.mark.parametrize("label,note", [("pil", "CMYK->RGB (Pillow convert)"),
                                        ("opencv", "CMYK->RGB (OpenCV imdecode)"),
                                        ("simplejpeg", "CMYK->RGB (libjpeg-turbo via simplejpeg)")])
def test_decode_note_names_the_cmyk_conversion(jpegs: Path, label: str, note: str):
    dec = get_decoder(label)
    dec.decode((jpegs / "cmyk.jpg").read_bytes(), DecodeOptions())
    assert dec.last_note == note


@pytest.mark.parametrize("label", ALL_DECODERS)
def test_an_ordinary_jpeg_has_no_decode_note(jpegs: Path, label: str):
    dec = decoder_or_skip(label)
    dec.decode((jpegs / "420.jpg").read_bytes(), DecodeOptions())
    assert dec.last_note is None


@pytest.mark.parametrize("label", ALL_DECODERS)
def test_a_grey_jpeg_decodes_to_three_equal_channels(jpegs: Path, label: str):
    img = decode(label, jpegs / "grey.jpg")
    assert np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 0], img[..., 2])


def test_cmyk_conversions_of_pillow_and_opencv_differ_by_one(jpegs: Path):
    pil, cv = decode("pil", jpegs / "cmyk.jpg"), decode("opencv", jpegs / "cmyk.jpg")
    assert frac_diff(pil, cv) > 0.5 and max_abs(pil, cv) == 1


# --- bad files and missing libraries -------------------------------------------------------

@pytest.mark.parametrize("label", ALL_DECODERS)
@pytest.mark.parametrize("bad", BAD_FILES)
def test_bad_files_raise_decode_error_for_every_decoder(jpegs: Path, label: str, bad: str):
    with pytest.raises(DecodeError) as e:
        decode(label, jpegs / bad)
    assert str(e.value)


def test_a_missing_package_makes_the_decoder_unavailable(monkeypatch: pytest.MonkeyPatch):
    from dmx.runner.decoders.simplejpeg import SimplejpegDecoder
    monkeypatch.setitem(sys.modules, "simplejpeg", None)     # import simplejpeg -> ImportError
    with pytest.raises(DecoderUnavailable, match="pip install simplejpeg"):
        SimplejpegDecoder()


def test_a_missing_libturbojpeg_makes_turbojpeg_unavailable(tmp_path: Path):
    pytest.importorskip("turbojpeg")
    from dmx.runner.decoders.turbojpeg import TurboJpegDecoder
    with pytest.raises(DecoderUnavailable, match="cannot load libturbojpeg"):
        TurboJpegDecoder(lib_path=str(tmp_path / "libturbojpeg.so.0"))


def test_a_package_version_of_a_library_without_an_isolated_decoder_is_unavailable():
    with pytest.raises(DecoderUnavailable, match="pil and opencv only"):
        get_decoder("simplejpeg[simplejpeg==1.7]")


def test_nvjpeg_without_torchvision_or_a_gpu_is_unavailable_with_the_reason():
    import torch
    try:
        import torchvision  # noqa: F401
        has_tv = True
    except (ImportError, RuntimeError):
        has_tv = False
    if has_tv and torch.cuda.is_available():
        pytest.skip("this machine can decode on the GPU")
    with pytest.raises(DecoderUnavailable, match="nvjpeg"):
        get_decoder("nvjpeg")


def test_decode_options_reject_unknown_values():
    with pytest.raises(ValueError, match="allowed: 1, 2, 4, 8"):
        DecodeOptions(reduce=3)


def test_decoding_from_bytes_leaves_no_temp_file_behind(jpegs: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch):
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    decode("libjpeg:9e", jpegs / "420.jpg")
    with pytest.raises(DecodeError):
        decode("libjpeg:9e", jpegs / "bad_scan.jpg")
    assert list(tmp_path.iterdir()) == []


def test_a_libjpeg_error_is_reported_in_libjpegs_own_words(jpegs: Path):
    with pytest.raises(DecodeError, match=r"^libjpeg:9e: Invalid progressive parameters Ss=70"):
        decode("libjpeg:9e", jpegs / "bad_scan.jpg")


def test_pil_reduces_a_png_with_image_reduce_and_says_so():
    buf = io.BytesIO()
    _photo("chelsea").save(buf, "PNG")
    dec = get_decoder("pil")
    assert dec.decode(buf.getvalue(), DecodeOptions(reduce=2)).shape == (-(-H // 2), -(-W // 2), 3)
    assert dec.last_note == "reduce 2 by Image.reduce (draft is JPEG-only)"


# --- the decode's own overhead ------------------------------------------------------------

@pytest.mark.parametrize("exif", ["apply", "ignore"])
def test_pil_decodes_every_kind_of_file_as_plain_pillow_does(jpegs: Path, tmp_path: Path, exif: str):
    """The copies Pillow makes for an orientation of 1 (``exif_transpose``) and a conversion to
    the mode an image already has are skipped: the pixels stay those of the plain calls."""
    Image.open(jpegs / "420.jpg").convert("P").save(tmp_path / "palette.png")
    Image.open(jpegs / "420.jpg").convert("RGBA").save(tmp_path / "rgba.png")
    files = [jpegs / n for n in ("420.jpg", "444.jpg", "grey.jpg", "cmyk.jpg")]
    files += [jpegs / f"exif{k}.jpg" for k in range(1, 9)] + [tmp_path / "palette.png",
                                                              tmp_path / "rgba.png"]
    for path in files:
        im = Image.open(path)
        plain = np.asarray((ImageOps.exif_transpose(im) if exif == "apply" else im).convert("RGB"))
        mine = decode("pil", path, exif=exif)
        assert mine.shape == plain.shape and np.array_equal(mine, plain), path.name


def test_each_capture_of_c_stderr_holds_only_what_was_written_during_it(monkeypatch):
    """The sink is appended to and read from where the last capture ended, and emptied when it
    grows past ``_SINK_REWIND``: each capture still gets exactly its own lines."""
    import os

    from dmx.runner.decoders import portable
    monkeypatch.setattr(portable, "_SINK_REWIND", 40)
    got = []
    for i in range(30):
        lines: list[str] = []
        with portable.captured_fd2(lines):
            if i % 3 == 0:
                os.write(2, f"message {i}\nsecond line {i}\n".encode())
        got.append(lines)
    assert got == [[f"message {i}", f"second line {i}"] if i % 3 == 0 else [] for i in range(30)]
    assert portable._SINK[2] < 40 + 30 and os.fstat(2).st_ino != os.fstat(portable._SINK[1].fileno()).st_ino


@pytest.mark.parametrize("options", [{}, {"exif": "ignore"}, {"reduce": 2}])
def test_the_pillow_image_the_header_parse_opened_decodes_as_a_fresh_open(jpegs: Path, options):
    """The worker hands the header parse's ``Image.open`` to the Pillow decoder (once) instead
    of opening the file again: the pixels and notes are those of a fresh open."""
    from dmx.runner.decoders import base
    from dmx.runner.imageinfo import image_info_for_decoders
    pil = get_decoder("pil")
    names = ["420.jpg", "444.jpg", "grey.jpg", "cmyk.jpg"] + [f"exif{k}.jpg" for k in range(1, 9)]
    for name in names:
        data = (jpegs / name).read_bytes()
        _, header, opened = image_info_for_decoders(data)
        assert opened is not None
        base.remember_header(data, header, opened)
        handed = pil.decode(data, DecodeOptions(**options)), pil.last_note
        assert base.take_opened(data) is None      # taken once
        base.forget_headers()
        fresh = pil.decode(data, DecodeOptions(**options)), pil.last_note
        assert np.array_equal(handed[0], fresh[0]) and handed[1] == fresh[1], name
    assert image_info_for_decoders((jpegs / "truncated.jpg").read_bytes())[0]["error"]
