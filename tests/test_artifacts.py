"""Model artifacts travel through the run directory (a real S3 endpoint: moto on localhost),
never as paths on the driver's disk: published once, fetched into each node's own cache,
verified by digest."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from cluster_nodes import BUCKET, moto_s3
from dmx.runner.artifacts import (WEIGHTS_KEY, ArtifactError, materialise, product_files, publish)
from dmx.runner.backends.base import ModelArtifacts


@pytest.fixture(scope="module")
def s3():
    try:
        with moto_s3() as (fs, env):
            saved = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            try:
                yield fs
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture
def products(tmp_path: Path) -> ModelArtifacts:
    """What the driver's cache holds after conversion: an OpenVINO IR (xml + bin sidecar and
    dmx's metadata beside it), an ONNX file, and a user's weights file."""
    ov = tmp_path / "driver-cache" / "models" / "ov-key"
    ov.mkdir(parents=True)
    (ov / "model.xml").write_text("<net/>")
    (ov / "model.bin").write_bytes(bytes(range(256)) * 100)
    (ov / "model.xml.json").write_text("{}")
    ort = tmp_path / "driver-cache" / "models" / "ort-key"
    ort.mkdir(parents=True)
    (ort / "model.onnx").write_bytes(b"onnx" * 1000)
    weights = tmp_path / "user" / "net.pt"
    weights.parent.mkdir()
    weights.write_bytes(b"weights" * 10)
    return ModelArtifacts(name="m", task="classification", torch_factory="pkg.mod:make",
                          weights=str(weights),
                          files={"ov:torch": str(ov / "model.xml"),
                                 "ort:onnx-dynamo:fp32": str(ort / "model.onnx")})


def test_a_product_is_its_file_and_its_sidecars_not_dmx_metadata(products: ModelArtifacts):
    names = [p.name for p in product_files(products.files["ov:torch"])]
    assert names == ["model.xml", "model.bin"]


def test_published_products_are_fetched_into_a_node_cache_and_match_the_driver_bytes(
        s3, products: ModelArtifacts, tmp_path: Path):
    run = f"s3://{BUCKET}/runs/artifacts-a"
    pub = publish(products, run)
    assert set(pub) == {"ov:torch", "ort:onnx-dynamo:fp32", WEIGHTS_KEY}
    assert all(p.location.startswith(f"{run}/artifacts/") for p in pub.values())
    node = tmp_path / "node-cache"
    local = materialise(products, pub, cache=node)
    for key, driver_path in products.files.items():
        assert Path(local.files[key]).read_bytes() == Path(driver_path).read_bytes()
        assert str(node) in local.files[key]
    xml = Path(local.files["ov:torch"])
    assert (xml.parent / "model.bin").read_bytes() == bytes(range(256)) * 100   # the sidecar too
    assert Path(local.weights).read_bytes() == b"weights" * 10


def test_a_node_that_holds_a_verified_copy_fetches_nothing(s3, products: ModelArtifacts,
                                                           tmp_path: Path):
    run = f"s3://{BUCKET}/runs/artifacts-b"
    pub = publish(products, run)
    node = tmp_path / "node-cache"
    materialise(products, pub, cache=node)
    s3.delete_dir_contents(f"{BUCKET}/runs/artifacts-b")      # the store is gone meanwhile
    again = materialise(products, pub, cache=node)
    assert Path(again.files["ort:onnx-dynamo:fp32"]).read_bytes() == b"onnx" * 1000


def test_bytes_changed_in_the_run_directory_are_refused_by_digest(s3, products: ModelArtifacts,
                                                                  tmp_path: Path):
    run = f"s3://{BUCKET}/runs/artifacts-c"
    pub = publish(products, run)
    onnx = pub["ort:onnx-dynamo:fp32"]
    with s3.open_output_stream(onnx.location.split("://", 1)[1] + "/model.onnx") as f:
        f.write(b"tampered" * 500)
    with pytest.raises(ArtifactError, match="do not match the digest"):
        materialise(products, pub, keys=["ort:onnx-dynamo:fp32"], cache=tmp_path / "node")
    assert not list((tmp_path / "node").rglob("model.onnx"))  # nothing half-trusted left


def test_a_local_run_directory_works_the_same(products: ModelArtifacts, tmp_path: Path):
    pub = publish(products, str(tmp_path / "run"))
    digest = hashlib.sha256(Path(products.files["ort:onnx-dynamo:fp32"]).read_bytes()).hexdigest()
    assert (tmp_path / "run" / "artifacts" / digest / "model.onnx").is_file()
    local = materialise(products, pub, cache=tmp_path / "node")
    assert Path(local.files["ov:torch"]).read_text() == "<net/>"


def test_a_builtin_models_weights_stay_with_its_package(products: ModelArtifacts, tmp_path: Path):
    import dataclasses
    builtin = dataclasses.replace(products, torch_factory="builtin:mobilenet_v2")
    assert WEIGHTS_KEY not in publish(builtin, str(tmp_path / "run"))


def test_an_unreachable_run_directory_is_one_line_naming_it(products: ModelArtifacts,
                                                            tmp_path: Path):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the run directory should be")
    with pytest.raises(ArtifactError, match="cannot publish") as e:
        publish(products, str(blocked))
    assert "\n" not in str(e.value)
