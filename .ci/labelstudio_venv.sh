#!/usr/bin/env bash
# Create (once) the separate virtualenv that holds Label Studio for tests/labelstudio.
#
# Why a separate venv: `label-studio` pins its own Django/numpy (numpy 2.2) stack and many
# web dependencies the project does not need. The bridge (balpm.integrations.label_studio)
# talks to it over HTTP only, so the project venv never imports Label Studio.
#
# Also builds a migrated template data dir (<venv>/balpm-template-data): the first start of Label
# Studio migrates its SQLite database, which takes minutes on a small runner; the e2e test copies
# the template instead (user, password and legacy token in balpm-template-data/balpm-credentials.json;
# throwaway values for a loopback-only test instance).
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
  && [[ -x "${venv_dir}/bin/label-studio" ]] \
  && [[ -f "${venv_dir}/balpm-template-data/balpm-credentials.json" ]]; then
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
if [[ -f "${stamp_file}" ]] && [[ "$(cat "${stamp_file}")" == "${stamp_want}" ]] \
  && [[ -f "${venv_dir}/balpm-template-data/balpm-credentials.json" ]]; then
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

# Migrated template data dir: start Label Studio once on a free loopback port, wait for /health, stop.
template_dir="${venv_dir}/balpm-template-data"
rm -rf "${template_dir}" "${template_dir}.tmp"
mkdir -p "${template_dir}.tmp"
port="$("${venv_dir}/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
ls_user="balpm-e2e@example.com"
ls_password="balpm-e2e-password"
ls_token="balpm0e2e0legacy0token0$(date +%s)"
LABEL_STUDIO_BASE_DATA_DIR="${template_dir}.tmp" LABEL_STUDIO_USERNAME="${ls_user}" \
  LABEL_STUDIO_PASSWORD="${ls_password}" LABEL_STUDIO_USER_TOKEN="${ls_token}" \
  LATEST_VERSION_CHECK=false COLLECT_ANALYTICS=false \
  "${venv_dir}/bin/label-studio" start --internal-host 127.0.0.1 --port "${port}" --no-browser \
  --enable-legacy-api-token > "${template_dir}.tmp/balpm-first-start.log" 2>&1 &
ls_pid=$!
up=0
for _ in $(seq 1 900); do  # bounded: 900 s
  if ! kill -0 "${ls_pid}" 2>/dev/null; then break; fi
  if "${venv_dir}/bin/python" - "${port}" "${ls_token}" <<'PY' 2>/dev/null; then up=1; break; fi
import sys, urllib.request
req = urllib.request.Request(f"http://127.0.0.1:{sys.argv[1]}/api/current-user/whoami",
                             headers={"Authorization": f"Token {sys.argv[2]}"})
urllib.request.urlopen(req, timeout=5).read()
PY
  sleep 1
done
kill "${ls_pid}" 2>/dev/null || true
for _ in $(seq 1 30); do kill -0 "${ls_pid}" 2>/dev/null || break; sleep 1; done
kill -9 "${ls_pid}" 2>/dev/null || true
if [[ "${up}" != 1 ]]; then
  tail -50 "${template_dir}.tmp/balpm-first-start.log" >&2
  echo "Label Studio did not come up while building the template" >&2
  exit 1
fi
printf '{"username": "%s", "password": "%s", "token": "%s"}\n' "${ls_user}" "${ls_password}" "${ls_token}" \
  > "${template_dir}.tmp/balpm-credentials.json"
mv "${template_dir}.tmp" "${template_dir}"

printf '%s' "${stamp_want}" > "${stamp_file}"
echo "${venv_dir}"
