#!/usr/bin/env bash
# Create (once) the separate virtualenv that holds the `tritonserver` binary used by
# tests/triton and bench/features.py.
#
# Why a separate venv: the `nvidia-pytriton` wheel bundles tritonserver 2.51 with the
# Python backend, but pins numpy<2, while the project venv uses numpy 2. The Python
# backend stub runs deploy/triton/.../model.py with *this* venv's interpreter, so it
# also needs torch (CPU, pinned) and transformers (pinned to the project venv's version
# so features match the in-process extractor bit for bit).
#
# Idempotent: a stamp file records the requirement set; rerunning with the same set is a
# no-op (< 1 s). Prints the venv path on the last line of stdout.
#
# Usage: .ci/triton_venv.sh [VENV_DIR]   (default: <repo>/.cache/triton-venv)
# Env:   TRITON_VENV_PYTHON   interpreter used to create the venv (default: python3.11)
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv_dir="${1:-${repo_root}/.cache/triton-venv}"
python_bin="${TRITON_VENV_PYTHON:-python3.11}"

# Keep in step with the project venv (pyproject / CPU install notes). torch is ALWAYS pinned:
# an unpinned torch pulls gigabytes of CUDA wheels.
requirements=(
  "nvidia-pytriton==0.7.0"
  "numpy<2"
  "torch==2.13.0"
  "transformers==5.23.0"
  "tokenizers==0.23.3"
  "safetensors==0.8.0"
)
stamp_want="$(printf '%s\n' "${requirements[@]}" "python=$(${python_bin} -c 'import sys;print(sys.version.split()[0])')")"
stamp_file="${venv_dir}/.balpm-triton-venv.stamp"

if [[ -f "${stamp_file}" ]] && [[ "$(cat "${stamp_file}")" == "${stamp_want}" ]] \
  && [[ -x "${venv_dir}/bin/python" ]]; then
  echo "${venv_dir}"
  exit 0
fi

mkdir -p "$(dirname "${venv_dir}")"
lock_dir="${venv_dir}.lock"
# Crude cross-process lock (pytest-xdist workers, parallel CI jobs): mkdir is atomic.
for _ in $(seq 1 900); do
  if mkdir "${lock_dir}" 2>/dev/null; then break; fi
  sleep 1
done
trap 'rmdir "${lock_dir}" 2>/dev/null || true' EXIT

# Another process may have finished while we waited.
if [[ -f "${stamp_file}" ]] && [[ "$(cat "${stamp_file}")" == "${stamp_want}" ]]; then
  echo "${venv_dir}"
  exit 0
fi

if [[ ! -x "${venv_dir}/bin/python" ]]; then
  "${python_bin}" -m venv "${venv_dir}" >&2
fi
"${venv_dir}/bin/python" -m pip install --quiet --upgrade pip >&2 || true
"${venv_dir}/bin/python" -m pip install --quiet "${requirements[@]}" >&2
# Smoke check: the bundled server and Python backend are where the tests look for them.
"${venv_dir}/bin/python" - >&2 <<'PY'
import pathlib, pytriton
root = pathlib.Path(pytriton.__file__).parent / "tritonserver"
assert (root / "bin" / "tritonserver").exists(), root
assert (root / "backends" / "python").exists(), root
import numpy, torch, transformers
print("triton venv ok:", numpy.__version__, torch.__version__, transformers.__version__)
PY
printf '%s' "${stamp_want}" > "${stamp_file}"
echo "${venv_dir}"
