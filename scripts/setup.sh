#!/usr/bin/env bash
# Sets up a fresh machine: from Debian the Fashion-MNIST data and Chromium with its WebDriver (the demo's
# browser test, tests/test_demo.py), a venv in .venv with torch 2.13.0 (CPU wheel, installed first: any other
# spec pulls a multi-GB CUDA build) and postdiff with its test, demo and quantization extras.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || missing+=(dataset-fashion-mnist)
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -c constraints.txt -e ".[test,demo,quantization]"
