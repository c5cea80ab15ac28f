"""dataset.labels in the spec, and the run's ground truth built from it (labels_for_run)."""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import dmx.runner.backends  # noqa: F401  (backends register their axes before a spec is read)
from dmx.matrix.errors import SpecError
from dmx.matrix.schema import LABEL_BY, LABEL_FORMATS, LABEL_MATCHES
from dmx.matrix.spec import parse_spec
from dmx.runner.label_classes import BY, LabelError, UnmappedLabel
from dmx.runner.labels import (BOX_FORMATS, FORMATS, MATCHES, check_spec_labels, labels_for_run,
                               model_classes)

BASE = {"name": "t", "dataset": {"path": "imgs"}, "model": "tiny", "axes": {"decoder": ["pil"]}}


def spec_with(tmp_path: Path, labels, model="tiny", **check):
    raw = copy.deepcopy(BASE)
    raw["dataset"]["labels"] = labels
    raw["model"] = model
    if check:
        raw["check"] = check
    return parse_spec(raw, base_dir=str(tmp_path))


def image_list(tmp_path: Path, ids: list[str]) -> Path:
    p = tmp_path / "images.parquet"
    pq.write_table(pa.table({"image_id": pa.array(ids, pa.string())}), p)
    return p


def test_the_schema_and_the_readers_allow_the_same_formats_and_matches():
    assert LABEL_FORMATS == ("auto", *FORMATS, *BOX_FORMATS)
    assert LABEL_MATCHES == MATCHES and LABEL_BY == BY


def test_a_labels_path_is_read_relative_to_the_spec(tmp_path: Path):
    (tmp_path / "val.txt").write_text("a.jpg class1\n")
    s = spec_with(tmp_path, "val.txt")
    assert s.dataset.labels.path == str((tmp_path / "val.txt").resolve())
    assert (s.dataset.labels.format, s.dataset.labels.by, s.dataset.labels.match) == ("auto",) * 3


def test_a_spec_without_labels_keeps_its_digest():
    """Adding the key must not change the digest of every existing spec (resume compares it)."""
    s = parse_spec(copy.deepcopy(BASE))
    assert s.raw["dataset"] == {"path": "imgs", "limit": None}


def test_labels_change_the_spec_digest(tmp_path: Path):
    (tmp_path / "a.txt").write_text("a.jpg 1\n")
    (tmp_path / "b.txt").write_text("a.jpg 2\n")
    assert spec_with(tmp_path, "a.txt").digest != spec_with(tmp_path, "b.txt").digest


@pytest.mark.parametrize("labels, key, words", [
    ({"path": "val.txt", "format": "csvv"}, "dataset.labels.format",
     "allowed: auto, csv, pairs, imagenet-solution, imagenet-index, imagefolder"),
    ({"path": "val.txt", "by": "label"}, "dataset.labels.by", "allowed: auto, index, name, synset"),
    ({"path": "val.txt", "match": "path"}, "dataset.labels.match", "allowed: auto, id, name, stem"),
    ({"path": "val.txt", "index_base": 2}, "dataset.labels.index_base", "allowed: 0"),
    ({"path": "val.txt", "colour": 1}, "dataset.labels.colour", "allowed: path, format, by"),
    ({"format": "csv"}, "dataset.labels.path", "missing"),
    ({"format": "imagefolder", "path": "val.txt"}, "dataset.labels.path", "give no path"),
    ({"path": "val.txt", "format": "csv", "meta_mat": "m.mat"}, "dataset.labels.meta_mat",
     "imagenet-index"),
    (3, "dataset.labels", "a labels file path or a mapping"),
    ("nowhere.txt", "dataset.labels.path", "file or folder not found: nowhere.txt"),
    ({"path": "nowhere", "format": "csv"}, "dataset.labels.path", "file not found: nowhere"),
    ({"path": "val.txt", "format": "imagenet-index", "meta_mat": "nometa.mat"},
     "dataset.labels.meta_mat", "file not found"),
])
def test_a_bad_labels_entry_names_the_key_and_what_is_allowed(tmp_path: Path, labels, key, words):
    (tmp_path / "val.txt").write_text("a.jpg 1\n")
    with pytest.raises(SpecError) as e:
        spec_with(tmp_path, labels)
    assert e.value.key == key and words in str(e.value), str(e.value)


@pytest.mark.parametrize("value, words", [
    (-1, "from 0 to 100, got -1"), ("a", "got 'a'"), ({}, "at least one selector"),
    ({"*": 1, "backend=openvino": "x"}, "'backend=openvino': must be a drop"),
])
def test_a_bad_max_accuracy_drop_is_refused_with_its_unit(tmp_path: Path, value, words):
    with pytest.raises(SpecError) as e:
        parse_spec({**BASE, "check": {"max_accuracy_drop": value}})
    assert e.value.key == "check.max_accuracy_drop" and words in str(e.value), str(e.value)


def test_max_accuracy_drop_takes_points_or_selectors():
    for v in (0.5, 0, {"*": 0.5, "decoder=pil": 1}):
        assert parse_spec({**BASE, "check": {"max_accuracy_drop": v}}).check["max_accuracy_drop"] == v


def test_labels_for_run_writes_one_row_per_labelled_image_and_the_coverage(tmp_path: Path):
    (tmp_path / "val.csv").write_text("path,label\nb.jpg,class3\na.jpg,class7\nc/d.jpg,class0\nzz.jpg,class1\n")
    s = spec_with(tmp_path, "val.csv")
    path, cov = labels_for_run(s, image_list(tmp_path, ["a.jpg", "b.jpg", "c/d.jpg", "e.jpg"]),
                               tmp_path)
    got = pq.read_table(path).to_pylist()
    assert got == [{"image_id": "a.jpg", "label_index": 7}, {"image_id": "b.jpg", "label_index": 3},
                   {"image_id": "c/d.jpg", "label_index": 0}]
    assert path == tmp_path / "labels.parquet"
    assert (cov["images"], cov["labelled"], cov["unlabelled"], cov["unused"]) == (4, 3, 1, 1)
    assert cov["format"] == "csv" and cov["classes"] == 10 and cov["unused_example"] == "zz.jpg"


def test_no_labels_in_the_spec_means_no_ground_truth(tmp_path: Path):
    s = parse_spec(copy.deepcopy(BASE))
    assert labels_for_run(s, image_list(tmp_path, ["a.jpg"]), tmp_path) == (None, None)
    check_spec_labels(s)   # nothing to check


def test_an_unmapped_label_is_refused_before_the_run_with_the_label_and_its_neighbours(tmp_path):
    (tmp_path / "val.txt").write_text("a.jpg class1\nb.jpg clas7\n")
    s = spec_with(tmp_path, "val.txt")
    with pytest.raises(UnmappedLabel) as e:
        check_spec_labels(s)
    text = str(e.value)
    assert "'clas7'" in text and "val.txt" in text and "'class7'" in text and "\n" not in text


def test_labels_that_name_no_image_of_the_dataset_are_refused(tmp_path: Path):
    (tmp_path / "val.txt").write_text("x1.jpg 1\nx2.jpg 2\n")
    s = spec_with(tmp_path, "val.txt")
    with pytest.raises(LabelError, match=r"no image of the dataset is named in .*val.txt"):
        labels_for_run(s, image_list(tmp_path, ["a.jpg", "b.jpg"]), tmp_path)


def test_imagefolder_labels_come_from_the_image_ids(tmp_path: Path):
    s = spec_with(tmp_path, {"format": "imagefolder"})
    path, cov = labels_for_run(s, image_list(tmp_path, ["class2/x.jpg", "class9/y.jpg"]), tmp_path)
    assert pq.read_table(path)["label_index"].to_pylist() == [2, 9]
    assert cov["format"] == "imagefolder" and cov["labelled"] == 2


def test_an_imagenet_model_maps_synsets_and_names(tmp_path: Path):
    (tmp_path / "val.txt").write_text("a.jpg n01440764\nb.jpg tabby\n")
    s = spec_with(tmp_path, "val.txt", model="mobilenet_v2")
    space = model_classes(s.model)
    assert len(space) == 1000 and space.synsets[281] == "n02123045"
    path, _ = labels_for_run(s, image_list(tmp_path, ["a.jpg", "b.jpg"]), tmp_path)
    assert pq.read_table(path)["label_index"].to_pylist() == [0, 281]


def test_a_user_model_without_class_names_is_asked_for_model_labels(tmp_path: Path):
    (tmp_path / "val.txt").write_text("a.jpg 1\n")
    raw = {**copy.deepcopy(BASE), "model": {"torch": "pkg.mod:make", "input": {"size": 32}}}
    raw["dataset"]["labels"] = "val.txt"
    s = parse_spec(raw, base_dir=str(tmp_path))
    with pytest.raises(LabelError, match="give model.labels"):
        check_spec_labels(s)


def test_a_detector_given_class_labels_is_asked_for_coco_or_yolo(tmp_path: Path):
    pytest.importorskip("ddddocr")
    (tmp_path / "val.txt").write_text("a.jpg 1\n")
    s = spec_with(tmp_path, "val.txt", model="ddddocr_det")
    with pytest.raises(LabelError, match="the model is a detector: give COCO JSON"):
        check_spec_labels(s)


def test_a_classifier_given_coco_boxes_is_told_they_are_detection_ground_truth(tmp_path: Path):
    (tmp_path / "gt.json").write_text('{"images": [], "annotations": [], "categories": []}')
    s = spec_with(tmp_path, "gt.json")
    with pytest.raises(LabelError, match="is coco detection ground truth, but the model's task"):
        check_spec_labels(s)


def test_dmx_run_with_an_unmapped_label_is_one_error_line_and_exit_2(tmp_path: Path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    from PIL import Image
    Image.new("RGB", (8, 8)).save(imgs / "a.jpg")
    (tmp_path / "val.txt").write_text("a.jpg kitten\n")
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: t\ndataset: {path: imgs, labels: val.txt}\nmodel: tiny\n"
                    "axes: {decoder: [pil]}\n")
    r = subprocess.run([sys.executable, "-m", "dmx", "run", str(spec), "--out", str(tmp_path / "run"),
                        "--executor", "local", "--quiet"], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1], timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("dmx: error: label 'kitten'"), r.stderr
    assert not (tmp_path / "run" / "manifest.json").exists()
