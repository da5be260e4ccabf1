#!/usr/bin/env bash
# Set up attention-map in ./.venv: the pinned PyTorch stack, this package with its test tools, and the
# random-weight model that the bundled demo (configs/demo.conf) runs on. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r requirements.txt -e '.[test]'
if [ ! -f results/models/demo-tiny/open_clip_model.safetensors ]; then
    .venv/bin/attention-map make-test-model results/models/demo-tiny --arch tiny --seed 0
fi
echo "attention-map is installed in .venv"
