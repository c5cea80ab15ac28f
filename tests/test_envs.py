"""Decoder package versions as levels: one uv environment per requirement set, built once and
reused, and a long-lived decoder process in it that fails one image, never the run.

Real uv, real PyPI installs, kept to one small pin built once per session (a few seconds)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from dmx.runner.decoders import DecodeError, DecoderUnavailable, DecodeOptions, get_decoder
from dmx.runner.decoders.isolated import IsolatedDecoder, requirements_for
from dmx.runner.decoders.pil import PilDecoder
from dmx.runner.envs import (EnvBuildError, EnvInfo, ensure_env, env_key, list_envs,
                         normalise_requirements, prune_envs)

pytest.importorskip("uv", reason="uv builds the environments (pip install uv)")

PIN = "pillow==9.4.0"          # manylinux wheel for CPython 3.11; builds in about a second here
LABEL = f"pil[{PIN}]"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private DMX_CACHE for this module, set before anything computes cache_dir()."""
    path = tmp_path_factory.mktemp("dmx-envs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DMX_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def pinned_env(env_cache: Path) -> EnvInfo:
    """The one real environment of this module, built here (the first ensure_env call)."""
    return ensure_env(requirements_for(LABEL))


@pytest.fixture(scope="module")
def isolated(pinned_env: EnvInfo) -> Iterator[IsolatedDecoder]:
    """The registry's decoder for the pinned level: one server process, reused by the tests."""
    decoder = get_decoder(LABEL)
    assert isinstance(decoder, IsolatedDecoder)
    yield decoder
    decoder.close()


def _jpegs(photo_dir: Path) -> list[Path]:
    return sorted(photo_dir.glob("*.jpg"))


# -- environments -------------------------------------------------------------------------------

def test_first_ensure_env_builds_and_records_exact_versions_and_libjpeg(pinned_env: EnvInfo,
                                                                       env_cache: Path):
    assert pinned_env.built
    assert pinned_env.path.parent == env_cache / "envs"
    assert pinned_env.requirements == ("numpy", PIN)
    assert pinned_env.versions["pillow"] == "9.4.0"
    assert pinned_env.libraries["pillow"]["version"] == "9.4.0"
    assert str(pinned_env.libraries["pillow"]["libjpeg"]).startswith("libjpeg-turbo ")
    on_disk = json.loads((pinned_env.path / "env.json").read_text())
    assert on_disk["versions"]["pillow"] == "9.4.0" and on_disk["python"].startswith("cpython-")


def test_second_ensure_env_is_a_fast_cache_hit(pinned_env: EnvInfo):
    t = time.perf_counter()
    again = ensure_env([PIN, "numpy"])
    assert time.perf_counter() - t < 0.5
    assert not again.built and again.path == pinned_env.path
    assert [e.key for e in list_envs()] == [pinned_env.key]


def test_requirement_order_case_and_spacing_share_one_environment():
    assert env_key(["numpy<2", "Pillow==9.4.0"]) == env_key(["pillow == 9.4.0 numpy<2"])
    assert normalise_requirements("opencv_python_headless==4.8.1.78, numpy>=1.20,<2") == \
        ["numpy<2,>=1.20", "opencv-python-headless==4.8.1.78"]


@pytest.mark.parametrize("text", ["pillow @ https://example.org/p.whl", "./local/pillow",
                                  "--index-url=http://evil pillow", "pillow; os_name=='nt'"])
def test_requirements_other_than_index_names_and_versions_are_rejected(text: str):
    with pytest.raises(ValueError, match="not a requirement"):
        normalise_requirements(text)


def test_a_failing_requirement_raises_env_build_error_with_uvs_last_lines(env_cache: Path):
    with pytest.raises(EnvBuildError) as e:
        ensure_env(["pillow==0.0.1"])
    assert e.value.requirement == "pillow==0.0.1"
    assert "pillow==0.0.1" in str(e.value) and "no version of pillow" in str(e.value)
    assert not [p for p in (env_cache / "envs").iterdir() if p.name not in (".locks", ".trash")
                and env_key(["pillow==0.0.1"]) in p.name]   # no half environment left behind


def test_a_concurrent_second_builder_waits_and_reuses_the_same_environment(tmp_path: Path):
    code = ("import json; from dmx.runner.envs import ensure_env; e = ensure_env([%r, 'numpy']); "
            "print(json.dumps({'built': e.built, 'path': str(e.path)}))" % PIN)
    env = {**os.environ, "DMX_CACHE": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    results = [json.loads(p.communicate(timeout=300)[0]) for p in procs]
    assert sorted(r["built"] for r in results) == [False, True]
    assert results[0]["path"] == results[1]["path"]
    record = json.loads((Path(results[0]["path"]) / "env.json").read_text())
    assert record["versions"]["pillow"] == "9.4.0"


def test_without_uv_a_new_environment_fails_with_how_to_install_it(
        env_cache: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "uv", None)           # import uv -> ImportError
    monkeypatch.setenv("PATH", "")
    with pytest.raises(EnvBuildError, match="pip install uv"):
        ensure_env(["pillow==10.4.0"])


def test_prune_keeps_what_is_asked_and_removes_the_rest(pinned_env: EnvInfo, env_cache: Path):
    stale = env_cache / "envs" / "0123456789abcdef0123"
    (stale / "bin").mkdir(parents=True)
    (stale / "bin" / "python").touch()
    (stale / "env.json").write_text(json.dumps({
        "key": stale.name, "requirements": ["pillow==10.4.0"], "versions": {}, "python": "x",
        "built_at": "2020-01-01T00:00:00+00:00", "build_s": 1.0, "libraries": {}}))
    assert {e.key for e in list_envs()} == {pinned_env.key, stale.name}
    assert prune_envs(keep={pinned_env.key}) == [stale]
    assert [e.key for e in list_envs()] == [pinned_env.key]


# -- the decoder process -------------------------------------------------------------------------

def test_a_level_may_pin_only_its_library_and_numpy():
    assert requirements_for(LABEL) == ["numpy", PIN]
    with pytest.raises(DecoderUnavailable, match="may pin only"):
        requirements_for("pil[pillow==9.4.0 requests]")
    with pytest.raises(DecoderUnavailable, match="name the pil package"):
        requirements_for("pil[numpy<2]")


@pytest.mark.parametrize("exif", ["apply", "ignore"])
def test_isolated_pillow_decodes_the_same_pixels_as_in_process_pillow(
        isolated: IsolatedDecoder, photo_dir: Path, exif: str):
    here, opts = PilDecoder(), DecodeOptions(exif=exif)
    for path in _jpegs(photo_dir):
        data = path.read_bytes()
        np.testing.assert_array_equal(isolated.decode(data, opts), here.decode(data, opts))
        assert isolated.last_note == here.last_note


def test_the_environments_decoder_process_runs_the_in_process_decoders_own_source(
        isolated: IsolatedDecoder, photo_dir: Path):
    from dmx.runner.decoders import portable
    isolated.decode(_jpegs(photo_dir)[0].read_bytes(), DecodeOptions())
    assert Path(isolated.server.hello["source"]).resolve() == Path(portable.__file__).resolve()


@pytest.fixture(scope="module")
def demo_images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from dmx.demo_data import build_demo_images
    try:
        paths = build_demo_images(str(tmp_path_factory.mktemp("demo")))
    except RuntimeError as e:
        pytest.skip(str(e))
    return [Path(p) for p in paths]


@pytest.mark.parametrize("exif,reduce", [("apply", 1), ("ignore", 2)])
def test_isolated_and_in_process_pillow_agree_on_every_demo_image(
        isolated: IsolatedDecoder, demo_images: list[Path], exif: str, reduce: int):
    """Same source, same pixels, same notes and same errors - CMYK, grey, EXIF and broken files."""
    here, opts = PilDecoder(), DecodeOptions(exif=exif, reduce=reduce)
    for path in demo_images:
        data = path.read_bytes()
        try:
            expected = here.decode(data, opts)
        except DecodeError as e:
            with pytest.raises(DecodeError) as got:
                isolated.decode(data, opts)
            assert str(got.value) == str(e), path.name
            continue
        np.testing.assert_array_equal(isolated.decode(data, opts), expected, err_msg=path.name)
        assert isolated.last_note == here.last_note, path.name


def test_version_names_the_environments_library_and_libjpeg(isolated: IsolatedDecoder):
    v = isolated.version()
    assert (v["library"], v["version"]) == ("pillow", "9.4.0")
    assert str(v["libjpeg"]).startswith("libjpeg-turbo")


@pytest.mark.parametrize("name", ["not_an_image.jpg", "truncated.jpg"])
def test_a_bad_file_is_a_decode_error_with_pillows_own_message(
        isolated: IsolatedDecoder, photo_dir: Path, name: str):
    data = (photo_dir / "bad" / name).read_bytes()
    with pytest.raises(DecodeError) as here:
        PilDecoder().decode(data, DecodeOptions())
    pid = isolated.server.pid
    with pytest.raises(DecodeError) as there:
        isolated.decode(data, DecodeOptions())
    assert str(there.value) == str(here.value)
    assert isolated.server.pid == pid                     # a bad file does not cost a restart


def test_pillows_decompression_bomb_guard_stays_on_in_the_environment(
        isolated: IsolatedDecoder, photo_dir: Path):
    data = bytearray((photo_dir / "chelsea_420.jpg").read_bytes())
    sof = data.index(b"\xff\xc0")                          # baseline frame header
    data[sof + 5:sof + 9] = (20000).to_bytes(2, "big") * 2   # claims 20000 x 20000 px
    with pytest.raises(DecodeError, match="decompression bomb") as there:
        isolated.decode(bytes(data), DecodeOptions())
    with pytest.raises(DecodeError) as here:
        PilDecoder().decode(bytes(data), DecodeOptions())
    assert str(there.value) == str(here.value)


def test_a_crashed_decoder_process_fails_only_that_image(
        isolated: IsolatedDecoder, photo_dir: Path):
    isolated.decode((photo_dir / "chelsea_420.jpg").read_bytes(), DecodeOptions())
    pid = isolated.server.pid
    with pytest.raises(DecodeError, match=r"decoder process died: killed by SIGSEGV"):
        isolated.server.call({"op": "segfault"})
    img = isolated.decode((photo_dir / "coffee_420.jpg").read_bytes(), DecodeOptions())
    assert img.shape == (80, 120, 3) and isolated.server.pid not in (None, pid)


def test_a_decoder_process_killed_mid_request_fails_only_that_image(
        isolated: IsolatedDecoder, photo_dir: Path):
    isolated.decode((photo_dir / "chelsea_420.jpg").read_bytes(), DecodeOptions())
    pid = isolated.server.pid
    killer = threading.Timer(0.3, os.kill, (pid, 9))
    killer.start()
    t = time.perf_counter()
    with pytest.raises(DecodeError, match=r"decoder process died: killed by SIGKILL"):
        isolated.server.call({"op": "sleep", "seconds": 20})
    assert time.perf_counter() - t < 5
    killer.join()
    coffee = isolated.decode((photo_dir / "coffee_420.jpg").read_bytes(), DecodeOptions())
    assert coffee.shape == (80, 120, 3)


def test_a_hung_decoder_process_is_killed_at_the_timeout_and_replaced(
        isolated: IsolatedDecoder, photo_dir: Path):
    t = time.perf_counter()
    with pytest.raises(DecodeError, match=r"decoder process died: no reply within 0.5 s"):
        isolated.server.call({"op": "sleep", "seconds": 60}, timeout_s=0.5)
    assert time.perf_counter() - t < 5
    coffee = isolated.decode((photo_dir / "coffee_420.jpg").read_bytes(), DecodeOptions())
    assert coffee.shape == (80, 120, 3)


@pytest.mark.parametrize("exit_call", ["sys.exit(0)", "os._exit(0)"])
def test_the_decoder_process_ends_with_the_python_process_that_started_it(
        pinned_env: EnvInfo, env_cache: Path, photo_dir: Path, exit_call: str):
    code = ("import os, sys; from dmx.runner.decoders import get_decoder, DecodeOptions; "
            f"d = get_decoder({LABEL!r}); "
            f"d.decode(open({str(photo_dir / 'chelsea_420.jpg')!r}, 'rb').read(), "
            "DecodeOptions()); "
            f"print(d.server.pid, flush=True); {exit_call}")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "DMX_CACHE": str(env_cache)}, timeout=120, check=True)
    pid = int(out.stdout.split()[-1])
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)       # an orphan is reparented to init, which reaps it
    stat = Path(f"/proc/{pid}/stat")
    assert not stat.exists() or stat.read_text().split()[2] == "Z"   # gone, or a zombie


def test_a_decoder_process_that_cannot_start_makes_the_decoder_unavailable(tmp_path: Path):
    from dmx.runner.decoders.isolated import DecoderServer
    server = DecoderServer(tmp_path / "no-such-env" / "bin" / "python", "pil")
    for _ in range(2):                                     # remembered, not retried per image
        with pytest.raises(DecoderUnavailable, match="cannot start the decoder process"):
            server.call({"op": "decode", "exif": "apply", "reduce": 1}, b"\xff\xd8")
    assert server.starts == 0


def test_get_decoder_reports_a_failed_build_as_unavailable(env_cache: Path):
    with pytest.raises(DecoderUnavailable, match=r"pillow==0\.0\.1"):
        get_decoder("pil[pillow==0.0.1]")


# -- end to end ---------------------------------------------------------------------------------

def test_a_sweep_over_two_pillow_versions_records_both_and_agrees_on_ordinary_jpegs(
        pinned_env: EnvInfo, photo_dir: Path, tmp_path: Path):
    import duckdb

    from dmx.matrix import parse_spec
    from dmx.runner.sweep import RunOptions, run_spec
    spec = parse_spec({"name": "two-pillows", "dataset": {"path": str(photo_dir)},
                       "model": "tiny",
                       "axes": {"decoder": ["pil", {"name": "pil", "package": PIN}]}})
    run_spec(spec, RunOptions(out=str(tmp_path / "run"), executor="local", progress=False))
    rows = duckdb.connect().execute(
        "SELECT decoder, decoder_version, status, px_equal, image_id FROM "
        f"read_parquet('{tmp_path}/run/rows/*/*.parquet', hive_partitioning=true)").fetchall()
    versions = {d: v for d, v, s, _, _ in rows if s == "ok"}
    assert versions[LABEL] == "pillow 9.4.0"
    assert versions["pil"] == f"pillow {PilDecoder().version()['version']}"
    ordinary = [(d, eq) for d, _, s, eq, i in rows if d == LABEL and not i.startswith("bad/")]
    assert len(ordinary) == len(_jpegs(photo_dir)) and all(eq for _, eq in ordinary)
    bad = {i: s for d, _, s, _, i in rows if d == LABEL and i.startswith("bad/")}
    assert set(bad.values()) == {"error"}


def test_native_exif_means_what_the_pinned_library_does_by_itself(isolated: IsolatedDecoder,
                                                                   photo_dir: Path):
    data = (photo_dir / "coffee_exif6.jpg").read_bytes()
    native = isolated.decode(data, DecodeOptions(exif="native"))
    assert native.shape[:2] == (120, 80)          # Pillow never applies EXIF orientation
    opencv = IsolatedDecoder.__new__(IsolatedDecoder)  # no environment needed for the mapping
    opencv.library = "opencv"
    assert opencv.native_exif == "apply"          # OpenCV applies it by default
