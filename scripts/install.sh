#!/usr/bin/env bash
# Set up attention-map in ./.venv: the pinned PyTorch stack, this package with its test tools, and the toy model
# that the bundled demo (configs/demo.conf) runs on, trained here on synthetic films (minutes on a CPU; the tests
# reuse it). Safe to run again: a model made by the current recipe is kept.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r requirements.txt -e '.[test]'
.venv/bin/attention-map train-toy-model results/models/demo-toy
echo "attention-map is installed in .venv"
