#!/usr/bin/env bash
# Cloud TPU VM / pod launcher: create | setup | train | eval | ssh | delete.
# Thin wrapper over `python -m launch.tpu` (standard library only, so it needs no virtualenv
# on your workstation). Run `launch/tpu_pod.sh SUBCOMMAND --help`; see launch/README.md.
set -euo pipefail
script_dir="${BASH_SOURCE[0]%/*}"
[[ "${script_dir}" == "${BASH_SOURCE[0]}" ]] && script_dir=.
repo="$(cd "${script_dir}/.." && pwd)"
export PYTHONPATH="${repo}${PYTHONPATH:+:${PYTHONPATH}}"
exec "${PYTHON:-python3}" -m launch.tpu "$@"
