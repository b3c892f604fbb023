#!/usr/bin/env bash
# Create (once) the separate virtualenv that holds Label Studio for tests/labelstudio.
#
# Why a separate venv: `label-studio` pins its own Django/numpy (numpy 2.2) stack and many
# web dependencies the project does not need. The bridge (balpm.integrations.label_studio)
# talks to it over HTTP only, so the project venv never imports Label Studio.
#
# Idempotent: a stamp file records the requirement set; rerunning with the same set is a
# no-op (< 1 s). Prints the venv path on the last line of stdout.
#
# Usage: .ci/labelstudio_venv.sh [VENV_DIR]   (default: <repo>/.cache/labelstudio-venv)
# Env:   LABELSTUDIO_VENV_PYTHON   interpreter used to create the venv (default: python3.11)
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv_dir="${1:-${repo_root}/.cache/labelstudio-venv}"
python_bin="${LABELSTUDIO_VENV_PYTHON:-python3.11}"

# Pinned: the e2e test relies on the HTTP API and the env-var bootstrap of this version.
requirements=(
  "label-studio==1.23.2"
)
stamp_want="$(printf '%s\n' "${requirements[@]}" "python=$(${python_bin} -c 'import sys;print(sys.version.split()[0])')")"
stamp_file="${venv_dir}/.balpm-labelstudio-venv.stamp"

if [[ -f "${stamp_file}" ]] && [[ "$(cat "${stamp_file}")" == "${stamp_want}" ]] \
  && [[ -x "${venv_dir}/bin/label-studio" ]]; then
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
# Smoke check: the CLI entry point exists and the package imports.
"${venv_dir}/bin/python" - >&2 <<'PY'
import importlib.metadata as md
print("label studio venv ok:", md.version("label-studio"), "numpy", md.version("numpy"))
PY
test -x "${venv_dir}/bin/label-studio"
printf '%s' "${stamp_want}" > "${stamp_file}"
echo "${venv_dir}"
