"""``dmx demo [--out DIR]``: build the demo photos, sweep the built-in demo spec, explain it."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import CliError, add_run_options, bounded_int, check_out
from .run import run_and_report

NAME = "demo"


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run the built-in demo on real photos and explain it")
    p.add_argument("--out", default="dmx-demo", help="folder for the demo images and run (default ./dmx-demo)")
    p.add_argument("--limit", type=bounded_int(1, 10**9), default=None,
                   help="use only the first N images")
    add_run_options(p)


def run(a: argparse.Namespace) -> int:
    from importlib.resources import files

    from dmx.demo_data import DemoDirError, build_demo_images
    from dmx.matrix import parse_spec
    from dmx.matrix.yamlsafe import load_yaml_bounded
    check_out(a.out)
    root = Path(a.out)
    images = root / "images"
    raw = load_yaml_bounded(files("dmx").joinpath("demo.yaml").read_bytes(), "demo.yaml")
    _write_demo_labels(root, files("dmx").joinpath("demo_labels.txt").read_bytes())
    overrides = [f"dataset.limit={a.limit}"] if a.limit else []
    spec = parse_spec(raw, base_dir=str(root.resolve()), overrides=overrides,
                      max_cells=a.max_cells)
    run_dir = _demo_run_dir(root, spec.digest)
    print(f"dmx demo: building the demo images in {images} (real photos from matplotlib, "
          "scikit-image and scikit-learn, re-encoded by Pillow and OpenCV)", file=sys.stderr)
    try:
        build_demo_images(str(images))
    except DemoDirError as e:
        raise CliError(str(e)) from None
    resume = (run_dir / "manifest.json").is_file()
    if resume:
        print(f"dmx demo: {run_dir} holds this demo's run; finishing it (nothing is deleted)",
              file=sys.stderr)
    return run_and_report(spec, a, str(run_dir), resume=resume, explain=True, spec_path="(demo)")


def _write_demo_labels(root: Path, text: bytes) -> None:
    """The demo's ground truth beside its images (the spec reads it from there); a different
    file of that name is the user's and is never replaced."""
    target = root / "demo_labels.txt"
    if target.exists():
        if target.is_file() and target.read_bytes() == text:
            return
        raise CliError(f"{target} exists and is not the demo's labels file; dmx never replaces "
                       "it: choose another --out")
    root.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_bytes(text)
    tmp.replace(target)


def _demo_run_dir(root: Path, digest: str) -> Path:
    """Where the demo's run goes: ``run`` when free or holding this very demo's run; else a
    folder named by the spec digest. Never a folder holding anything else: dmx deletes nothing."""
    from dmx.results import RunDir, RunDirError
    for cand in (root / "run", root / f"run-{digest[:8]}"):
        if not cand.exists() or (cand.is_dir() and not any(cand.iterdir())):
            return cand
        try:
            if RunDir(str(cand)).read_manifest().get("spec_digest") == digest:
                return cand
        except (RunDirError, OSError, ValueError):
            pass
    raise CliError(f"{root / 'run'} and {root / f'run-{digest[:8]}'} hold files that are not "
                   "this demo's run; dmx never deletes them: choose another --out")
