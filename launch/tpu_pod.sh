#!/usr/bin/env bash
# Cloud TPU VM / pod launcher: create | setup | train | eval | ssh | delete.
# Thin wrapper over `python -m gseps_jax.launch` (standard library only, so it needs no virtualenv
# on your workstation). Run `launch/tpu_pod.sh SUBCOMMAND --help`; see launch/README.md.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${repo}${PYTHONPATH:+:${PYTHONPATH}}"
exec "${PYTHON:-python3}" -m gseps_jax.launch "$@"
