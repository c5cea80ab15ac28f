"""``dmx envs list|build|prune``: the environments of decoder package-version levels
(``pil[pillow==9.4.0]``), built once with uv and cached."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import CliError

NAME = "envs"


def add_parser(sub) -> None:
    p = sub.add_parser("envs", help="the environments of decoder package-version levels "
                                    "(pil[pillow==9.4.0]): list, build, prune")
    envs = p.add_subparsers(dest="envs_command", required=True)
    q = envs.add_parser("list", help="cached environments: path, requirements, exact versions, "
                                     "libjpeg, size (MB), last used")
    q.add_argument("--json", action="store_true", help="print JSON")
    q = envs.add_parser("build", help="build (or find) environments, once, with uv")
    q.add_argument("what", nargs="+", metavar="SPEC|REQ",
                   help="a spec file (builds its pil[...]/opencv[...] decoder levels), or "
                        "requirements for one environment, e.g. 'pillow==9.4.0' numpy")
    q = envs.add_parser("prune", help="remove cached environments (default: all)")
    q.add_argument("--unused-days", type=float, default=None, metavar="N",
                   help="remove only those not used for N days")


def run(a: argparse.Namespace) -> int:
    if a.envs_command == "list":
        return _list(a)
    if a.envs_command == "build":
        return _build(a)
    return _prune(a)


def _list(a: argparse.Namespace) -> int:
    from dmx.runner.envs import iter_env_rows
    rows = list(iter_env_rows())
    if a.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        print(f"{r['path']}\n  requirements {' '.join(r['requirements'])}\n"
              f"  installed    {' '.join(f'{k}=={v}' for k, v in r['versions'].items())}\n"
              f"  libjpeg      {r['libjpeg']}\n"
              f"  {r['size_mb']} MB, built {r['built_at']}, last used {r['last_used']}")
    if not rows:
        print("dmx: no environments (they are built by `dmx envs build` or by a run)",
              file=sys.stderr)
    return 0


def _build(a: argparse.Namespace) -> int:
    import time
    from dmx.runner.envs import ensure_env
    spec_file = Path(a.what[0])
    if len(a.what) == 1 and spec_file.suffix in (".yaml", ".yml"):
        from dmx.matrix import load_spec
        from dmx.runner.decoders import DecoderUnavailable
        from dmx.runner.decoders.isolated import is_isolated_label, requirements_for
        spec = load_spec(spec_file)
        labels = [lb for lb in (spec.levels("decoder") if "decoder" in spec.axis_names else ())
                  if is_isolated_label(lb)]
        if not labels:
            raise CliError(f"{spec_file} has no decoder package-version level "
                           "(e.g. {name: pil, package: \"pillow==9.4.0\"})")
        try:
            sets = [requirements_for(lb) for lb in labels]
        except DecoderUnavailable as e:
            raise CliError(str(e)) from None
    else:
        sets = [list(a.what)]
    for reqs in sets:
        t = time.perf_counter()
        e = ensure_env(reqs)
        print(f"{'built ' if e.built else 'cached'} {e.path} in "
              f"{time.perf_counter() - t:.2f} s: {' '.join(e.requirements)} -> "
              f"{' '.join(f'{k}=={v}' for k, v in e.versions.items())}; {e.libjpeg_summary()}")
    return 0


def _prune(a: argparse.Namespace) -> int:
    import time
    from dmx.runner.envs import list_envs, prune_envs
    keep = None
    if a.unused_days is not None:
        cutoff = time.time() - a.unused_days * 86400
        keep = {e.key for e in list_envs() if e.last_used >= cutoff}
    removed = prune_envs(keep)
    print(f"dmx: removed {len(removed)} environment folder(s)", file=sys.stderr)
    return 0
