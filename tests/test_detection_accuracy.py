"""A detector's accuracy against ground truth, end to end on real runs of ``ddddocr_det``.

Planted truth: the ground truth is the reference cell's own boxes, so the reference scores
mAP 100 exactly. k of the images are stored upside down with EXIF orientation 3: with
``exif=ignore`` the detector sees those k images upside down (its boxes move), and the other
images bit for bit as the reference does. So the change is negative, lives on exactly those k
images, and equals what pycocotools' COCOeval says when run directly on the rows and the JSON;
on a dataset without the rotated images the same factor changes nothing (needs ddddocr:
pip install 'dmx[detect]')."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest

from dmx.analysis.check import check_run
from dmx.analysis.db import open_run
from dmx.analysis.detection_accuracy import (BOX_IMAGES_FILE, BOXES_FILE,
                                             register_detection_accuracy)
from dmx.analysis.explain import explain_run
from dmx.analysis.render import render_text
from dmx.matrix import parse_spec
from dmx.runner import labels as runner_labels
from dmx.runner.sweep import RunOptions, run_spec

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ddddocr") is None,
                                reason="ddddocr not installed (pip install 'dmx[detect]')")

ROTATED = ("rot0.jpg", "rot1.jpg", "rot2.jpg")   # the k = 3 images stored upside down
AXES = {"exif": ["apply", "ignore"], "backend": ["onnxruntime"]}
REF = {"exif": "apply", "backend": "onnxruntime"}


def _images(folder: Path, rotated: bool) -> Path:
    """Crops of skimage's page and text images (printed text the detector finds); with
    ``rotated``, three more stored upside down and tagged EXIF orientation 3 (rotate 180)."""
    import skimage.data
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    page = Image.fromarray(skimage.data.page())          # 191 x 384
    text = Image.fromarray(skimage.data.text())          # 172 x 448
    crops = [page.crop((x, y, x + 260, y + 150)) for x, y in ((0, 0), (60, 20), (120, 40),
                                                              (100, 0), (20, 41))]
    crops += [text, text.crop((0, 0, 300, 172)), page]
    for i, im in enumerate(crops):
        im.save(folder / f"plain{i}.jpg", quality=92)
    if rotated:
        for name, im in zip(ROTATED, (page, page.crop((0, 0, 300, 191)), text)):
            exif = Image.Exif()
            exif[0x0112] = 3
            im.rotate(180).save(folder / name, quality=92, exif=exif)
    return folder


def _spec(folder: Path, labels: str | None = None):
    dataset: dict = {"path": str(folder)}
    if labels:
        dataset["labels"] = labels
    return parse_spec({"name": "det-truth", "dataset": dataset, "model": "ddddocr_det",
                       "axes": AXES, "reference": REF})


def _rows(run: Path) -> list[dict]:
    con = duckdb.connect()
    return con.sql(f"SELECT * FROM read_parquet('{run}/rows/**/*.parquet')").to_arrow_table().to_pylist()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """run0: no labels (the reference's boxes become gt.json); run: with gt.json over all images;
    plain: the same spec over the images without EXIF orientation."""
    base = tmp_path_factory.mktemp("det-truth")
    imgs = _images(base / "imgs", rotated=True)
    run0 = base / "run0"
    run_spec(_spec(imgs), RunOptions(out=str(run0), executor="local", progress=False))
    images, anns = [], []
    for r in sorted((r for r in _rows(run0) if r["is_reference"]), key=lambda r: r["image_id"]):
        images.append({"id": len(images) + 1, "file_name": r["image_id"],
                       "width": r["decoded_w"], "height": r["decoded_h"]})
        for b in r["det_boxes"]:
            anns.append({"id": len(anns) + 1, "image_id": len(images), "category_id": 7,
                         "bbox": [b["x1"], b["y1"], b["x2"] - b["x1"], b["y2"] - b["y1"]],
                         "iscrowd": 0, "area": (b["x2"] - b["x1"]) * (b["y2"] - b["y1"])})
    gt = base / "gt.json"
    gt.write_text(json.dumps({"images": images, "annotations": anns,
                              "categories": [{"id": 7, "name": "text"}]}))
    run = base / "run"
    run_spec(_spec(imgs, str(gt)), RunOptions(out=str(run), executor="local", progress=False))
    plain = base / "plain"
    run_spec(_spec(_images(base / "plain-imgs", rotated=False), str(gt)),
             RunOptions(out=str(plain), executor="local", progress=False))
    return {"run0": run0, "run": run, "plain": plain, "gt": gt, "base": base}


def _maps(run: Path):
    con = open_run(run)
    return con, register_detection_accuracy(con, run, resamples=200)


def _ignore(con) -> str:
    return con.execute("SELECT cell_id FROM cells WHERE exif = 'ignore'").fetchone()[0]


def _cocoeval_direct(gt_json: Path, rows: list[dict]):
    """pycocotools on the JSON file and the rows' own boxes, nothing of dmx in between."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(gt_json))
        id_of = {im["file_name"]: im["id"] for im in coco.dataset["images"]}
        res = [{"image_id": id_of[r["image_id"]], "category_id": 7, "score": b["score"],
                "bbox": [b["x1"], b["y1"], b["x2"] - b["x1"], b["y2"] - b["y1"]]}
               for r in rows for b in r["det_boxes"]]
        ev = COCOeval(coco, coco.loadRes(res), "bbox")
        ev.params.imgIds = sorted(id_of[r["image_id"]] for r in rows)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev, {v: k for k, v in id_of.items()}


def test_the_run_keeps_the_ground_truth_of_its_images_and_the_manifest_its_coverage(runs):
    boxes = pq.read_table(runs["run"] / BOXES_FILE)
    covered = pq.read_table(runs["run"] / BOX_IMAGES_FILE)
    assert covered.num_rows == 11 and boxes.num_rows == len(json.loads(runs["gt"].read_text())["annotations"])
    assert set(boxes["label_index"].to_pylist()) == {0}       # COCO's category 7 "text" -> class 0
    cov = json.loads((runs["run"] / "manifest.json").read_text())["dataset"]["labels"]
    assert (cov["format"], cov["match"], cov["labelled"], cov["images"]) == ("coco", "id", 11, 11)
    plain = json.loads((runs["plain"] / "manifest.json").read_text())["dataset"]["labels"]
    assert plain["labelled"] == 8 and plain["unused"] == 3     # the rotated images are not in it
    assert (BOXES_FILE, BOX_IMAGES_FILE) == (runner_labels.BOXES_FILE, runner_labels.BOX_IMAGES_FILE)


def test_the_reference_scores_its_planted_truth_perfectly(runs):
    con, maps = _maps(runs["run"])
    ref = next(m for m in maps.values() if m.is_reference)
    assert (ref.map, ref.map50, ref.fp, ref.fn) == (100.0, 100.0, 0, 0) and ref.tp > 20


def test_ignoring_exif_loses_map_on_exactly_the_rotated_images(runs):
    con, maps = _maps(runs["run"])
    m = maps[_ignore(con)]
    assert m.delta < 0 and m.ci_high < 0 and m.n_paired == 11
    bad = {r[0] for r in con.execute("SELECT image_id FROM detection_matches WHERE cell_id = ? "
                                     "AND fp + fn > 0", [m.cell_id]).fetchall()}
    assert bad and bad <= set(ROTATED)
    clean = con.execute("SELECT count(*) FROM detection_matches WHERE cell_id = ? AND fp + fn = 0 "
                        "AND image_id NOT IN (SELECT unnest(?))", [m.cell_id, list(ROTATED)]).fetchone()[0]
    assert clean == 8


def test_the_change_and_its_interval_hold_what_cocoeval_says_on_the_rows_directly(runs):
    con, maps = _maps(runs["run"])
    m = maps[_ignore(con)]
    cell_rows = [r for r in _rows(runs["run"]) if r["cell_id"] == m.cell_id]
    ev, _ = _cocoeval_direct(runs["gt"], cell_rows)
    planted = 100.0 * ev.stats[0] - 100.0
    assert m.delta == pytest.approx(planted, abs=1e-9)
    assert m.map == pytest.approx(100.0 * ev.stats[0], abs=1e-9)
    assert m.delta50 == pytest.approx(100.0 * ev.stats[1] - 100.0, abs=1e-9)
    assert m.ci_low <= planted <= m.ci_high


def test_per_image_matches_equal_cocoevals_own_at_iou_half(runs):
    con, maps = _maps(runs["run"])
    cid = _ignore(con)
    ev, file_of = _cocoeval_direct(runs["gt"], [r for r in _rows(runs["run"]) if r["cell_id"] == cid])
    p = ev._paramsEval
    n_area, n_img = len(p.areaRng), len(p.imgIds)
    want = {}
    for k in range(len(p.catIds)):
        for i in range(n_img):
            e = ev.evalImgs[k * n_area * n_img + i]
            if e is None:
                continue
            hit, ign = e["dtMatches"][0] > 0, e["dtIgnore"][0].astype(bool)
            gt_n = int((~np.asarray(e["gtIgnore"], bool)).sum())
            tp = int((hit & ~ign).sum())
            want[file_of[e["image_id"]]] = (tp, int((~hit & ~ign).sum()), gt_n - tp)
    got = {r[0]: (r[1], r[2], r[3]) for r in con.execute(
        "SELECT image_id, tp, fp, fn FROM detection_matches WHERE cell_id = ?", [cid]).fetchall()}
    for image in set(got) - set(want):        # no box and no detection: COCOeval keeps no entry
        want[image] = (0, 0, 0)
    assert got == want


def test_a_factor_that_changes_nothing_has_an_interval_at_zero_and_passes_the_gate(runs):
    con, maps = _maps(runs["plain"])
    m = maps[_ignore(con)]
    assert (m.delta, m.ci_low, m.ci_high, m.map) == (0.0, 0.0, 0.0, 100.0)
    assert check_run(runs["plain"], {"max_accuracy_drop": 0.5}).passed
    text = render_text(explain_run(runs["plain"]))
    assert "exif=ignore: mAP +0.0 pts [+0.0, +0.0] (n=8" in text
    assert "indistinguishable from zero at this n" in text


def test_the_gate_fails_the_drop_beyond_the_limit_and_states_the_bound(runs):
    result = check_run(runs["run"], {"max_accuracy_drop": 1.0})
    con, maps = _maps(runs["run"])
    m = maps[_ignore(con)]
    fail = next(f for f in result.failures if f.check == "max_accuracy_drop")
    assert not result.passed and fail.seen == pytest.approx(-m.ci_high)
    assert f"at least {-m.ci_high:.2f} pts, n = 11" in fail.note
    # a limit beyond the interval's bound passes, whatever the point estimate
    wide = check_run(runs["run"], {"max_accuracy_drop": -m.ci_low + 1})
    assert [a["status"] for a in wide.accuracy] == ["pass"]
    assert not [f for f in wide.failures if f.check == "max_accuracy_drop"]


def test_explain_ranks_the_map_change_beside_divergence(runs):
    text = render_text(explain_run(runs["run"]))
    assert "reference COCO mAP@[.5:.95] 100.00" in text
    line = next(ln for ln in text.splitlines() if "1. exif=ignore: mAP -" in ln)
    assert "(n=11;" in line and "indistinguishable" not in line


def test_yolo_labels_are_scaled_by_each_images_size(runs, tmp_path):
    """The reference's boxes as YOLO lines (normalised by the image's size): mAP 100 again,
    which holds only if analysis scales them back to pixels."""
    folder = tmp_path / "yolo"
    folder.mkdir()
    for r in _rows(runs["plain"]):
        if not r["is_reference"]:
            continue
        w, h = r["decoded_w"], r["decoded_h"]
        (folder / Path(r["image_id"]).with_suffix(".txt")).write_text("".join(
            f"0 {(b['x1'] + b['x2']) / 2 / w} {(b['y1'] + b['y2']) / 2 / h} "
            f"{(b['x2'] - b['x1']) / w} {(b['y2'] - b['y1']) / h}\n" for b in r["det_boxes"]))
    spec = _spec(runs["base"] / "plain-imgs", str(folder))   # a folder, as a spec names it
    assert spec.dataset.labels.path == str(folder)
    out = tmp_path / "run"
    run_spec(spec, RunOptions(out=str(out), executor="local", progress=False))
    cov = json.loads((out / "manifest.json").read_text())["dataset"]["labels"]
    assert cov["format"] == "yolo" and cov["normalised"] and cov["labelled"] == 8
    con, maps = _maps(out)
    ref = next(m for m in maps.values() if m.is_reference)
    assert ref.map == pytest.approx(100.0) and ref.fn == 0


@pytest.mark.parametrize("name, categories, content, says", [
    ("unmapped.json", [{"id": 7, "name": "txet"}], None, "label 'txet' in "),
    ("broken.json", None, '{"images": [', "is not COCO detection annotations"),
])
def test_bad_coco_ground_truth_is_one_line_and_a_nonzero_exit(runs, tmp_path, name, categories,
                                                              content, says):
    gt = tmp_path / name
    if content is None:
        data = json.loads(runs["gt"].read_text())
        data["categories"] = categories
        content = json.dumps(data)
    gt.write_text(content)
    spec = tmp_path / "spec.yaml"
    spec.write_text(json.dumps({"name": "bad", "model": "ddddocr_det", "axes": AXES, "reference": REF,
                                "dataset": {"path": str(runs["base"] / "plain-imgs"), "labels": str(gt)}}))
    p = subprocess.run([sys.executable, "-m", "dmx", "run", str(spec), "--out",
                        str(tmp_path / "out"), "--executor", "local"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and says in lines[0] and lines[0].startswith("dmx: error:")


def test_dmx_sql_answers_from_the_detection_views(runs):
    """``dmx sql`` defines the mAP views when a query names them (they cost COCOeval), with the
    same numbers explain and check use."""
    con, maps = _maps(runs["run"])
    p = subprocess.run([sys.executable, "-m", "dmx", "sql", str(runs["run"]),
                        "SELECT cell_id, map FROM detection_accuracy ORDER BY cell_id",
                        "--format", "csv", "--map-resamples", "50"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    got = {cid: float(v) for cid, v in (ln.split(",") for ln in p.stdout.splitlines()[1:])}
    assert got == pytest.approx({cid: m.map for cid, m in maps.items()})
    plain = subprocess.run([sys.executable, "-m", "dmx", "sql", str(runs["run"]),
                            "SELECT count(*) FROM rows"], capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0 and "detection" not in plain.stderr


def test_map_results_are_kept_beside_the_run_and_recomputed_when_what_they_describe_changes(
        runs, tmp_path, monkeypatch):
    """COCOeval and its bootstrap run once per run, not once per command: the next process
    reads them from the run directory - unless the resamples, the seed or the rows differ."""
    import dmx.analysis.detection_accuracy as da
    run = tmp_path / "run"
    shutil.copytree(runs["run"], run)
    for kept in (run / "summary").glob("detection_accuracy*"):   # what earlier tests stored
        kept.unlink()
    computed = []
    real = da.detection_accuracy
    monkeypatch.setattr(da, "detection_accuracy",
                        lambda con, **kw: computed.append(kw) or real(con, **kw))

    def maps(resamples: int = 50):
        da._memo.clear()                       # as a new process (another dmx command) starts
        return register_detection_accuracy(open_run(run), run, resamples=resamples)

    first = maps()
    assert len(computed) == 1 and (run / "summary" / "detection_accuracy.json").is_file()
    assert maps() == first and len(computed) == 1          # read back, the same numbers
    con = open_run(run)
    register_detection_accuracy(con, run, resamples=50)
    assert con.execute("SELECT count(*) FROM detection_matches").fetchone()[0] > 0
    assert len(computed) == 1
    maps(resamples=60)
    assert [c["resamples"] for c in computed] == [50, 60]    # other parameters: computed again
    maps(resamples=60)
    assert len(computed) == 2
    cells = pq.read_table(run / "cells.parquet")      # the run's files changed (say a resume)
    pq.write_table(cells, run / "cells.parquet", compression="none")
    maps(resamples=60)
    assert len(computed) == 3
