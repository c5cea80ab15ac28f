"""``dmx demo`` and ``dmx run`` never delete or overwrite a file they did not write."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path


from dmx.cli import main
from dmx.demo_data import build_demo_images


def run_cli(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 2
    return code, err.getvalue()


def test_demo_images_never_overwrite_a_file_of_the_users(tmp_path: Path):
    names = [Path(p).name for p in build_demo_images(str(tmp_path / "elsewhere"))]
    images = tmp_path / "out" / "images"
    images.mkdir(parents=True)
    victim = images / names[0]  # the user's own file, under a name the demo also uses
    victim.write_bytes(b"my own photo, not the demo's")
    tmp_path = tmp_path / "out"
    code, err = run_cli(["demo", "--out", str(tmp_path), "--executor", "local"])
    assert code == 2 and len(err.strip().splitlines()) == 2, err  # the "building" note + error
    assert "was not written by dmx" in err and victim.name in err
    assert victim.read_bytes() == b"my own photo, not the demo's"


def test_demo_images_rebuild_over_their_own_files_only(tmp_path: Path):
    paths = build_demo_images(str(tmp_path))
    assert build_demo_images(str(tmp_path)) == paths  # intact: nothing rewritten
    Path(paths[0]).unlink()                           # ours, missing: rebuilt
    assert build_demo_images(str(tmp_path)) == paths and Path(paths[0]).is_file()
    (tmp_path / "holiday.jpg").write_bytes(b"mine")   # a file of the user's beside them: kept
    Path(paths[1]).write_bytes(b"damaged")            # ours, damaged: repaired
    assert build_demo_images(str(tmp_path)) == paths
    assert (tmp_path / "holiday.jpg").read_bytes() == b"mine"


def test_demo_out_at_a_file_is_one_line(tmp_path: Path):
    f = tmp_path / "out.txt"
    f.write_text("mine")
    code, err = run_cli(["demo", "--out", str(f)])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "is a file" in err
    assert f.read_text() == "mine"


def test_demo_keeps_a_users_files_in_out_run_and_runs_beside_them(tmp_path: Path):
    """The issue's data loss: ``dmx demo --out DIR`` removed DIR/run with the user's files."""
    mine = tmp_path / "run" / "notes.txt"
    mine.parent.mkdir()
    mine.write_text("results I need")
    code, err = run_cli(["demo", "--out", str(tmp_path), "--limit", "1", "--executor", "local",
                         "--workers", "1", "--quiet"])
    assert code == 0, err
    assert mine.read_text() == "results I need"
    runs = [p for p in tmp_path.glob("run-*") if (p / "manifest.json").is_file()]
    assert len(runs) == 1
    # again: the demo's own run is found and finished, not deleted or duplicated
    code, err = run_cli(["demo", "--out", str(tmp_path), "--limit", "1", "--executor", "local",
                         "--workers", "1", "--quiet"])
    assert code == 0 and "finishing it" in err, err
    assert sorted(tmp_path.glob("run*")) == sorted([mine.parent, runs[0]])


def test_run_refuses_a_folder_of_someone_elses_files(tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    spec = tmp_path / "s.yaml"
    spec.write_text(f"name: x\ndataset: {{path: '{tmp_path}'}}\nmodel: tiny\naxes: {{decoder: [pil]}}\n")
    (tmp_path / "a.png").write_bytes(b"")  # an (empty) image so the dataset is not empty
    code, err = run_cli(["run", str(spec), "--out", str(out), "--executor", "local"])
    assert code == 2 and "not empty" in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
