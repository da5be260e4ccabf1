#!/usr/bin/env bash
# Set up attention-map in ./.venv: the pinned PyTorch stack and this package with its test tools. The bundled demo
# (configs/demo.conf) runs on the toy model shipped in examples/models/demo-toy, so nothing is trained here.
# Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# Two packages have no Linux wheel on PyPI: the CRF extension (about a minute of compiling on one core) and
# pysaliency (about 20 s). Their wheels are built beside the install of the rest, which unpacks on one core too.
pysaliency=pysaliency==0.2.22
wheels=$(mktemp -d)
trap 'kill $(jobs -p) 2> /dev/null || true; rm -rf "$wheels"' EXIT     # a failed install stops the build beside it
.venv/bin/python -m pip wheel --quiet --no-deps --wheel-dir "$wheels" "$(grep '^pydensecrf2' requirements.txt)" \
    "$pysaliency" &
built=$!
.venv/bin/python -m pip install --quiet -r <(grep -v '^pydensecrf2' requirements.txt)
wait "$built"
.venv/bin/python -m pip install --quiet --find-links "$wheels" -r requirements.txt -e '.[test]'
# pysaliency: the published saliency metrics the tests check ours against (tests/test_saliency.py loads its metric
# modules alone; its package needs numba and more, which the tests do not)
.venv/bin/python -m pip install --quiet --no-deps --find-links "$wheels" "$pysaliency"
# ultralytics: the optional YOLO support (the `yolo` extra) that tests/test_detectors.py runs; without its own
# dependency on opencv-python, which would install a second OpenCV over the headless one the pipeline uses
.venv/bin/python -m pip install --quiet --no-deps ultralytics==8.4.190 ultralytics-thop==2.2.3 psutil
echo "attention-map is installed in .venv"
