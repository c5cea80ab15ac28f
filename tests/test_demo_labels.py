"""The demo's human-assigned labels: they name real demo files and real ImageNet-1k classes, and
every demo photo is either labelled or listed as unlabelled with its reason."""
from __future__ import annotations

import importlib.resources
import re

import pytest

from dmx.demo_data import build_demo_images, demo_sources
from dmx.runner.label_classes import imagenet1k_space
from dmx.runner.labels import attach, read_labels
from dmx.runner.models import imagenet_labels

TEXT = importlib.resources.files("dmx").joinpath("demo_labels.txt").read_text(encoding="utf-8")
PATH = str(importlib.resources.files("dmx").joinpath("demo_labels.txt"))
IMAGENET = imagenet1k_space(imagenet_labels())


def _photo(image_id: str) -> str:
    return image_id.rsplit("_", 1)[0]


def test_each_label_comment_states_the_index_its_synset_maps_to():
    labels = read_labels(PATH, IMAGENET)
    comments = dict(re.findall(r"^(\S+)\s+n\d{8}\s+#\s+(\d+) ", TEXT, re.M))
    assert labels.num_rows == len(comments) == 8
    for key, index in zip(labels["key"].to_pylist(), labels["label_index"].to_pylist()):
        assert int(comments[key]) == index


@pytest.fixture(scope="module")
def demo_ids(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "images"
    files = build_demo_images(str(root))
    return [f[len(str(root)) + 1:] for f in files if "/bad/" not in f]


def test_every_label_names_a_demo_image(demo_ids):
    _, cov = attach(read_labels(PATH, IMAGENET), demo_ids)
    assert cov["match"] == "id" and cov["unused"] == 0


def test_every_demo_photo_is_labelled_or_listed_as_unlabelled(demo_ids):
    labelled = {_photo(k) for k in read_labels(PATH, IMAGENET)["key"].to_pylist()}
    unlabelled = set(re.findall(r"^# unlabelled: (\w+)", TEXT, re.M))
    assert not labelled & unlabelled
    assert {_photo(i) for i in demo_ids} <= labelled | unlabelled
    assert set(demo_sources()) <= labelled | unlabelled
