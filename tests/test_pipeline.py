"""Decoders, resizers and backends on real JPEGs, each checked against what it must do."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dmx.runner.backends import BACKENDS, InferSetting
from dmx.runner.convert import prepare_artifacts, resolve_model
from dmx.runner.decoders import DecodeError, DecodeOptions, get_decoder
from dmx.runner.models.base import Preprocess
from dmx.runner.preprocess import RESIZERS, model_input_pixels, normalise
from dmx.matrix import ModelSpec

P224 = Preprocess(mode="resize-crop", resize=256, crop=224, mean=(0.485, 0.456, 0.406),
                  std=(0.229, 0.224, 0.225))


def decode(name: str, path: Path, exif: str = "apply") -> np.ndarray:
    return get_decoder(name).decode(path.read_bytes(), DecodeOptions(exif=exif))


def test_pil_and_opencv_decode_an_ordinary_jpeg_bit_identically(photo_dir: Path):
    a = decode("pil", photo_dir / "chelsea_420.jpg")
    b = decode("opencv", photo_dir / "chelsea_420.jpg")
    assert a.shape == (100, 150, 3) and np.array_equal(a, b)


@pytest.mark.parametrize("name", ["pil", "opencv"])
def test_exif_orientation_6_is_applied_or_ignored_as_asked(photo_dir: Path, name: str):
    applied = decode(name, photo_dir / "coffee_exif6.jpg", "apply")
    ignored = decode(name, photo_dir / "coffee_exif6.jpg", "ignore")
    assert applied.shape[:2] == (80, 120)      # upright, as the photo was taken
    assert ignored.shape[:2] == (120, 80)      # as stored


@pytest.mark.parametrize("name", ["pil", "opencv"])
@pytest.mark.parametrize("bad", ["truncated.jpg", "empty.jpg", "not_an_image.jpg"])
def test_bad_files_raise_decode_error_or_decode_partially(photo_dir: Path, name: str, bad: str):
    data = (photo_dir / "bad" / bad).read_bytes()
    try:
        img = get_decoder(name).decode(data, DecodeOptions())
    except DecodeError as e:
        assert str(e)
    else:  # OpenCV returns what it could read of a truncated file
        assert name == "opencv" and bad == "truncated.jpg" and img.ndim == 3


@pytest.mark.parametrize("resize", sorted(RESIZERS))
def test_every_resizer_gives_the_model_input_size(photo_dir: Path, resize: str):
    img = decode("pil", photo_dir / "chelsea_420.jpg")
    x = model_input_pixels(img, resize, P224)
    assert x.shape == (224, 224, 3) and x.dtype == np.float32
    assert 0 <= x.min() and x.max() <= 255.5


def test_pil_bilinear_and_cv2_linear_differ_on_a_downscaled_photo(photo_dir: Path):
    img = decode("pil", photo_dir / "chelsea_420.jpg")
    p = Preprocess(mode="stretch", resize=64, crop=64, mean=(0.5,) * 3, std=(0.5,) * 3)
    a = model_input_pixels(img, "pil-bilinear", p)
    b = model_input_pixels(img, "cv2-linear", p)
    assert np.mean(a != b) > 0.3     # Pillow antialiases when downscaling, cv2 does not


def test_normalise_gives_chw_with_mean_and_std_applied():
    px = np.full((2, 2, 3), 255.0, np.float32)
    x = normalise(px, P224)
    assert x.shape == (3, 2, 2)
    assert x[0, 0, 0] == pytest.approx((1 - 0.485) / 0.229)


@pytest.fixture(scope="module")
def tiny_artifacts():
    model = resolve_model(ModelSpec(name="tiny"))
    settings = {("torch", "fp32", None), ("onnxruntime", "fp32", None), ("openvino", "fp32", None)}
    return model, prepare_artifacts(model, settings, calibration=lambda: None)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_converted_backends_match_torch_at_fp32(tiny_artifacts, backend: str):
    model, art = tiny_artifacts
    x = np.random.default_rng(1).standard_normal((3, 3, 32, 32)).astype(np.float32)
    ref = BACKENDS["torch"](art, InferSetting(), threads=1).infer(x)
    y = BACKENDS[backend](art, InferSetting(backend=backend), threads=1).infer(x)
    assert y.shape == ref.shape == (3, 10)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


def test_openvino_fp32_sets_the_f32_hint_and_reads_it_back(tiny_artifacts):
    _, art = tiny_artifacts
    r = BACKENDS["openvino"](art, InferSetting(backend="openvino"), threads=1)
    r.activate()
    info = r.info()
    assert info["config_asked"]["INFERENCE_PRECISION_HINT"] == "f32"
    assert info["precision_effective"] == "fp32"


def test_openvino_default_hint_reports_what_the_plugin_chose(tiny_artifacts):
    _, art = tiny_artifacts
    r = BACKENDS["openvino"](art, InferSetting(backend="openvino", openvino_hint="default"), threads=1)
    r.activate()
    import openvino as ov
    plugin_default = str(ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT"))
    expected = "bf16" if "bfloat16" in plugin_default else "fp32"
    assert "INFERENCE_PRECISION_HINT" not in r.info()["config_asked"]
    assert r.info()["precision_effective"] == expected


def test_conversion_is_cached_by_weights_hash(tiny_artifacts):
    model, art = tiny_artifacts
    again = prepare_artifacts(model, {("onnxruntime", "fp32", None)}, calibration=lambda: None)
    assert again.files["ort:onnx-dynamo:fp32"] == art.files["ort:onnx-dynamo:fp32"]
    assert again.conversion_notes["onnx:onnx-dynamo"]["cached"] is True
