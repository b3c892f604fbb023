"""The deployment files (Dockerfile, deploy/k8s, deploy/triton) agree with what the server reads.

Two layers:
  * source checks read deploy/k8s/base + overlays/* YAML directly (no renderer needed):
    every BALPM_* key is a real `Settings` env var, container args are real
    `balpm-server` flags, ports/probes/data dir/secret paths match the settings;
  * rendered checks use the output of each overlay, rendered with `kubectl kustomize`
    when kubectl exists, else taken from .cache/deploy-rendered/ (written by
    .ci/deploy_checks.sh) when newer than deploy/k8s, else skipped.
The HEALTHCHECK script baked into the image is also run against a real gRPC health server.

balpm runs in cluster mode (issue 21): a Deployment of interchangeable replicas sharing one
PostgreSQL database and one S3 bucket; cpu-dev brings its own PostgreSQL StatefulSet and MinIO,
gpu a CloudNativePG Cluster.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from balpm_server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
BASE = K8S / "base"
OVERLAYS = ("cpu-dev", "gpu")
RENDERED_CACHE = ROOT / ".cache" / "deploy-rendered"
TRITON_REPO = ROOT / "deploy" / "triton" / "model_repository"
TRITON_MODEL_DIR = TRITON_REPO / "balpm_extractor"
DOCKERFILE = ROOT / "Dockerfile"
TRITON_DOCKERFILE = ROOT / "deploy" / "triton" / "Dockerfile"

ENV_NAMES = set(Settings.env_names().values())
FIELDS = set(Settings.env_names())
# The proto's service name, as the server registers it with grpc.health.v1.
SERVICE_NAME = "balpm.v1.BalpmService"
GRPC_PORT_NAME = "grpc"
METRICS_PORT_NAME = "metrics"
HEALTHCHECK_BIN = "balpm-healthcheck"
# Secrets the balpm Deployment reads (the first one has the CloudNativePG app-secret layout).
DATABASE_SECRET, DATABASE_SECRET_KEY = "balpm-pg-app", "uri"
BUCKET_SECRET = "balpm-s3"
AWS_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
CNPG_API = "postgresql.cnpg.io/v1"
CNPG_CLUSTER = "balpm-pg"


# --- helpers ---------------------------------------------------------------------------


def load_docs(path: Path) -> list[dict[str, Any]]:
    """All YAML documents of a file (empty documents dropped)."""
    with path.open() as f:
        return [d for d in yaml.safe_load_all(f) if d]


def kustomization(dir_: Path) -> dict[str, Any]:
    return load_docs(dir_ / "kustomization.yaml")[0]


def generator_literals(dir_: Path, name: str = "balpm-config") -> dict[str, str]:
    out: dict[str, str] = {}
    for gen in kustomization(dir_).get("configMapGenerator", []):
        if gen["name"] == name:
            for lit in gen.get("literals", []):
                key, _, value = lit.partition("=")
                out[key] = value
    return out


def config_env(overlay: str) -> dict[str, str]:
    """The balpm-config data an overlay ends with (base literals merged with the overlay's)."""
    env = generator_literals(BASE)
    env.update(generator_literals(K8S / "overlays" / overlay))
    return env


def by_kind(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = by_kind(docs, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def env_of(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A container's `env` entries by name."""
    return {e["name"]: e for e in c.get("env", [])}


def generated(name: str, base_name: str) -> bool:
    """Whether `name` is `base_name` or kustomize's hash-suffixed version of it."""
    return name == base_name or re.fullmatch(re.escape(base_name) + r"-[a-z0-9]{10}", name) is not None


def secret_data(docs: list[dict[str, Any]], name: str) -> dict[str, str]:
    """The decoded data of the (generated) Secret a workload references by `name`."""
    import base64

    (secret,) = [d for d in by_kind(docs, "Secret") if d["metadata"]["name"] == name]
    out = {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
    out.update(secret.get("stringData", {}))
    return out


def pods_selected(docs: list[dict[str, Any]], match: dict[str, str]) -> list[dict[str, Any]]:
    """Workloads (Deployment/StatefulSet/Job) whose pod template carries all of `match`'s labels."""
    return [
        w for w in workloads_of(docs) if match.items() <= w["spec"]["template"]["metadata"].get("labels", {}).items()
    ]


def workloads_of(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return by_kind(docs, "Deployment") + by_kind(docs, "StatefulSet") + by_kind(docs, "Job")


def base_docs() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for res in kustomization(BASE)["resources"]:
        docs += load_docs(BASE / res)
    return docs


def all_source_yaml() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml"))


def parse_args(args: list[str]) -> dict[str, str]:
    """`--flag=value` container args -> {field_name: value}."""
    out = {}
    for arg in args:
        assert arg.startswith("--") and "=" in arg, f"use --flag=value form, got {arg!r}"
        flag, _, value = arg.partition("=")
        out[flag[2:].replace("-", "_")] = value
    return out


def settings_for(env: dict[str, str], args: list[str]) -> Settings:
    """The Settings balpm-server builds from this environment and these args (as main() does).

    Uses the server's own argument parser when it imports; otherwise each `--flag=value`
    overrides BALPM_FLAG (same precedence, same type parsing as the environment).
    """
    try:
        from balpm_server.server import build_arg_parser
    except Exception:  # pragma: no cover - server module mid-rewrite
        merged = dict(env)
        for field, value in parse_args(args).items():
            merged[Settings.env_names()[field]] = value
        return Settings.from_env(environ=merged)
    parsed = vars(build_arg_parser().parse_args(args))
    return Settings.from_env(environ=env, **{k: v for k, v in parsed.items() if v is not None})


def server_flags() -> set[str] | None:
    """Option strings of the real `balpm-server` parser, or None if the server can't be imported."""
    try:
        from balpm_server.server import build_arg_parser
    except Exception:  # pragma: no cover - server module mid-rewrite
        return None
    return {s for a in build_arg_parser()._actions for s in a.option_strings}


def triton_config(name: str = "config.pbtxt") -> str:
    path = TRITON_MODEL_DIR / name if name == "config.pbtxt" else TRITON_MODEL_DIR / "configs" / name
    return path.read_text()


def pbtxt_param(text: str, key: str) -> str:
    m = re.search(r'key:\s*"' + re.escape(key) + r'"\s*(?:#[^\n]*\n\s*)*value:\s*\{\s*string_value:\s*"([^"]*)"', text)
    assert m, f"parameter {key} not in config"
    return m.group(1)


def quantity_bytes(q: str) -> int:
    """A Kubernetes binary/decimal quantity (e.g. "12Gi", "500M") in bytes."""
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti|k|M|G|T)?", str(q))
    assert m, f"unsupported quantity {q!r}"
    mult: dict[str | None, int] = {None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    mult.update({"k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12})
    return int(m.group(1)) * mult[m.group(2)]


def dockerfile_stage(text: str, stage: str) -> str:
    """The instructions of one `FROM ... AS stage` block."""
    m = re.search(r"(?ms)^FROM \S+ AS " + stage + r"\n(.*?)(?=^FROM |\Z)", text)
    assert m, f"stage {stage} not found"
    return m.group(1)


def healthcheck_script() -> str:
    m = re.search(
        r"(?ms)^COPY [^\n]*<<'EOF' /usr/local/bin/" + HEALTHCHECK_BIN + r"\n(.*?)^EOF\n", DOCKERFILE.read_text()
    )
    assert m, "healthcheck heredoc not found in Dockerfile"
    return m.group(1)


# --- source checks: settings contract ---------------------------------------------------


def test_every_balpm_key_in_any_manifest_is_a_settings_env_var() -> None:
    seen: set[str] = set()
    pattern = re.compile(r"\bBALPM_[A-Z0-9_]+")
    for path in all_source_yaml():
        for name in pattern.findall(path.read_text()):
            seen.add(name)
            assert name in ENV_NAMES, f"{path.relative_to(ROOT)}: {name} is not read by Settings"
    # Also env entries and ConfigMap data written out as YAML structures.
    for path in all_source_yaml():
        for doc in load_docs(path):
            if not isinstance(doc, dict):
                continue
            if doc.get("kind") == "ConfigMap":
                for key in doc.get("data", {}):
                    assert key in ENV_NAMES, f"{path.name}: ConfigMap key {key}"
    assert {"BALPM_EXTRACTOR", "BALPM_TRITON_URL", "BALPM_API_KEYS_FILE"} <= seen


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_configmap_values_parse_as_settings(overlay: str) -> None:
    env = config_env(overlay)
    assert env, "balpm-config has no literals"
    assert set(env) <= ENV_NAMES, set(env) - ENV_NAMES
    s = Settings.from_env(environ=env)  # raises on a value that is not the field's type
    assert s.extractor == "triton"
    assert s.host == "0.0.0.0" and s.metrics_host == "0.0.0.0", "must bind all interfaces in a pod"
    if overlay == "gpu":
        assert s.device == "cuda"
        assert s.tls_cert_file and s.tls_key_file and not s.insecure
    else:
        assert s.device == "cpu"
        assert s.insecure and not s.tls_cert_file


def test_container_args_are_real_server_flags() -> None:
    dep = one(base_docs(), "Deployment", "balpm")
    args = container(dep, "balpm")["args"]
    parsed = parse_args(args)
    assert set(parsed) <= FIELDS, set(parsed) - FIELDS
    flags = server_flags()
    if flags is not None:
        for arg in args:
            assert arg.split("=", 1)[0] in flags, f"{arg} is not a balpm-server flag"
    # No `command`: the image's ENTRYPOINT is balpm-server.
    assert "command" not in container(dep, "balpm")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ports_probes_and_paths_match_settings(overlay: str) -> None:
    docs = base_docs()
    dep = one(docs, "Deployment", "balpm")
    c = container(dep, "balpm")
    s = settings_for(config_env(overlay), c["args"])
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {GRPC_PORT_NAME: s.port, METRICS_PORT_NAME: s.metrics_port}
    assert (s.port, s.metrics_port) == (50051, 9090)

    # Native gRPC probes (base): the health service names the server registers.
    assert c["readinessProbe"]["grpc"] == {"port": s.port, "service": SERVICE_NAME}
    for probe in ("livenessProbe", "startupProbe"):
        assert c[probe]["grpc"] == {"port": s.port, "service": ""}

    # Cluster mode: the data dir is only a cache (emptyDir, bounded above the artifact cache);
    # no PVC of its own. Writable /tmp (HF_HOME=/tmp/hf).
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert s.data_dir == "/var/lib/balpm"
    assert "volumeClaimTemplates" not in dep["spec"]
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert "emptyDir" in volumes[mounts[s.data_dir]]
    assert (
        quantity_bytes(volumes[mounts[s.data_dir]]["emptyDir"]["sizeLimit"])
        > Settings.from_env(environ=generator_literals(BASE)).artifact_cache_bytes
    )

    # API keys file inside the Secret mount, under the key the Secret item projects.
    keys_dir, keys_name = os.path.split(s.api_keys_file)
    secret = volumes[mounts[keys_dir]]["secret"]
    assert secret["secretName"] == "balpm-api-keys"
    assert keys_name in [i["path"] for i in secret["items"]]

    # Drain fits in the grace period.
    assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > s.shutdown_grace_s + 5


def test_gpu_overlay_tls_files_and_exec_probes() -> None:
    s = Settings.from_env(environ=config_env("gpu"))
    patch = load_docs(K8S / "overlays" / "gpu" / "balpm-gpu.yaml")[0]
    assert patch["kind"] == "Deployment"
    c = container(patch, "balpm")
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in patch["spec"]["template"]["spec"]["volumes"]}
    # Forwarding between replicas is TLS too; its CA file is in the same Secret.
    assert s.cluster and s.cluster_tls_ca_file
    for path in (s.tls_cert_file, s.tls_key_file, s.tls_client_ca_file, s.cluster_tls_ca_file):
        dir_, name = os.path.split(path)
        secret = volumes[mounts[dir_]]["secret"]
        assert secret["secretName"] == "balpm-tls"
        assert name in [i["path"] for i in secret["items"]]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    # kubelet gRPC probes cannot do TLS -> exec probes with the image's health checker.
    json_patch: list[dict[str, Any]] = yaml.safe_load((K8S / "overlays" / "gpu" / "balpm-tls-probes.yaml").read_text())
    ops = {op["path"].rsplit("/", 1)[1]: op for op in json_patch}
    assert set(ops) == {"startupProbe", "livenessProbe", "readinessProbe"}
    assert ops["readinessProbe"]["value"]["exec"]["command"] == [HEALTHCHECK_BIN, SERVICE_NAME]
    assert ops["livenessProbe"]["value"]["exec"]["command"] == [HEALTHCHECK_BIN, ""]
    assert f"/usr/local/bin/{HEALTHCHECK_BIN}" in DOCKERFILE.read_text()


def test_triton_settings_match_triton_deployment_and_model_config() -> None:
    docs = base_docs()
    s = Settings.from_env(environ=config_env("gpu"))
    host, _, port = s.triton_url.rpartition(":")
    svc = one(docs, "Service", host)
    assert {"name": GRPC_PORT_NAME, "port": int(port)}.items() <= next(
        p for p in svc["spec"]["ports"] if p["name"] == GRPC_PORT_NAME
    ).items()
    dep = one(docs, "Deployment", "triton")
    c = container(dep, "triton")
    cports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert cports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    args = c["args"]
    assert f"--grpc-port={cports['grpc']}" in args and f"--http-port={cports['http']}" in args
    assert f"--metrics-port={cports['metrics']}" in args
    if not (TRITON_MODEL_DIR / "config.pbtxt").exists():
        pytest.skip("Triton model repository not present yet")
    for config_name in ("config.pbtxt", "cpu.pbtxt"):
        text = triton_config(config_name)
        assert re.search(r'(?m)^name:\s*"' + re.escape(s.triton_model) + '"', text), config_name
        assert f'name: "{s.triton_output}"' in text, config_name
        assert int(pbtxt_param(text, "max_length_tokens")) == s.max_length_tokens, config_name
        # The image puts the default weights where model_path points.
        assert pbtxt_param(text, "model_path") in TRITON_DOCKERFILE.read_text()
    # cpu-dev selects configs/cpu.pbtxt.
    patches = kustomization(K8S / "overlays" / "cpu-dev")["patches"]
    assert any("--model-config-name=cpu" in p.get("patch", "") for p in patches)
    repo_arg = next(a for a in args if a.startswith("--model-repository="))
    assert f"COPY model_repository {repo_arg.split('=', 1)[1]}" in TRITON_DOCKERFILE.read_text()


def test_network_policies_open_exactly_the_server_ports() -> None:
    docs = base_docs()
    s = Settings.from_env(environ=config_env("cpu-dev"))
    dep = one(docs, "Deployment", "balpm")
    balpm_pods = {"podSelector": {"matchLabels": dep["spec"]["selector"]["matchLabels"]}}
    pol = one(docs, "NetworkPolicy", "balpm")
    assert pol["spec"]["podSelector"] == balpm_pods["podSelector"]
    ports = sorted({p["port"] for rule in pol["spec"]["ingress"] for p in rule["ports"]})
    assert ports == sorted([s.port, s.metrics_port])
    grpc_rules = [r for r in pol["spec"]["ingress"] if [p["port"] for p in r["ports"]] == [s.port]]
    peers = [peer for r in grpc_rules for peer in r["from"]]
    # Labelling clients (here or in labelled namespaces) and the other replicas (forwarding), nothing else.
    clients = [p for p in peers if p != balpm_pods]
    assert clients and all(p["podSelector"]["matchLabels"] == {"balpm.io/labelling-client": "true"} for p in clients)
    assert balpm_pods in peers
    metrics_rule = next(r for r in pol["spec"]["ingress"] if r["ports"][0]["port"] == s.metrics_port)
    assert metrics_rule["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]
    # Egress to the other replicas' gRPC port (the owner of a pool).
    assert any(balpm_pods in r["to"] and [p["port"] for p in r["ports"]] == [s.port] for r in pol["spec"]["egress"])
    triton = one(docs, "NetworkPolicy", "triton")
    grpc_in = next(r for r in triton["spec"]["ingress"] if r["ports"][0]["port"] == 8001)
    assert grpc_in["from"] == [balpm_pods]


def test_dockerfile_matches_server() -> None:
    text = DOCKERFILE.read_text()
    runtime = dockerfile_stage(text, "runtime")
    s = Settings()
    assert re.search(rf"(?m)^EXPOSE {s.port} {s.metrics_port}$", runtime)
    assert re.search(r'(?m)^ENTRYPOINT \["balpm-server"\]$', runtime)
    assert re.search(r"(?m)^USER 10001:10001$", runtime)
    assert "HEALTHCHECK" in runtime and f'"{HEALTHCHECK_BIN}", "{SERVICE_NAME}"' in runtime
    for needed in ("HF_HOME=/tmp/hf", "BALPM_DATA_DIR=/var/lib/balpm", "BALPM_HOST=0.0.0.0"):
        assert needed in runtime
    for name in re.findall(r"\bBALPM_[A-Z0-9_]+", text):
        assert name in ENV_NAMES, name
    # The entry point is the console script pyproject declares.
    assert 'balpm-server = "balpm_server.server:main"' in (ROOT / "pyproject.toml").read_text()
    # CPU wheels only for the CPU variant; GPU gets faiss-gpu-cu12 (extra `gpu`).
    assert "--index-url https://download.pytorch.org/whl/cpu" in text and "faiss-gpu-cu12" in text


# --- rendered checks ---------------------------------------------------------------------


def _render(overlay: str) -> list[dict[str, Any]] | None:
    kubectl = shutil.which("kubectl")
    if kubectl:
        out = subprocess.run(
            [kubectl, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, timeout=120
        )
        if out.returncode == 0:
            return [d for d in yaml.safe_load_all(out.stdout) if d]
    cached = RENDERED_CACHE / f"{overlay}.yaml"
    newest_source = max(p.stat().st_mtime for p in all_source_yaml())
    if cached.exists() and cached.stat().st_mtime >= newest_source:
        return load_docs(cached)
    return None


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    docs = _render(request.param)
    if docs is None:
        pytest.skip("no kustomize renderer and no fresh .cache/deploy-rendered (run .ci/deploy_checks.sh)")
    return request.param, docs


def test_rendered_configmap_is_the_one_the_deployment_reads(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    overlay, docs = rendered
    dep = one(docs, "Deployment", "balpm")
    c = container(dep, "balpm")
    (ref,) = [e["configMapRef"]["name"] for e in c["envFrom"]]
    cm = one(docs, "ConfigMap", ref)  # hash-suffixed name rewritten by kustomize
    assert set(cm["data"]) <= ENV_NAMES, set(cm["data"]) - ENV_NAMES
    assert cm["data"] == config_env(overlay)
    for e in c.get("env", []):
        assert not e["name"].startswith("BALPM_") or e["name"] in ENV_NAMES
        assert e["name"] not in cm["data"], f"{e['name']} set twice (env wins over envFrom)"
    s = settings_for(cm["data"], c["args"])
    probe_ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert probe_ports[GRPC_PORT_NAME] == s.port
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        if "grpc" in c[probe]:
            assert c[probe]["grpc"]["port"] == s.port
        else:
            assert c[probe]["exec"]["command"][0] == HEALTHCHECK_BIN
            assert s.tls_cert_file, "exec probes are only for TLS"
    want = SERVICE_NAME
    got = c["readinessProbe"].get("grpc", {}).get("service") or c["readinessProbe"]["exec"]["command"][1]
    assert got == want
    assert {m["mountPath"] for m in c["volumeMounts"]} >= {s.data_dir, "/tmp", os.path.dirname(s.api_keys_file)}
    assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > s.shutdown_grace_s
    # The data dir's emptyDir holds the artifact cache.
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    data = volumes[next(m["name"] for m in c["volumeMounts"] if m["mountPath"] == s.data_dir)]
    assert quantity_bytes(data["emptyDir"]["sizeLimit"]) > s.artifact_cache_bytes


def test_rendered_cluster_mode(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    """N interchangeable replicas: a Deployment, cluster settings, per-pod identity, shared storage."""
    overlay, docs = rendered
    assert not [w for w in by_kind(docs, "StatefulSet") if w["metadata"]["name"] == "balpm"]
    dep = one(docs, "Deployment", "balpm")
    spec = dep["spec"]
    assert spec["replicas"] >= 2
    assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    pod = spec["template"]["spec"]
    c = container(dep, "balpm")
    cm = one(docs, "ConfigMap", c["envFrom"][0]["configMapRef"]["name"])["data"]
    s = settings_for(cm, c["args"])
    assert s.cluster is True and cm["BALPM_CLUSTER"] == "true"
    assert 0 < s.ownership_ttl_s <= 30

    env = env_of(c)
    names = list(env)
    # Per-pod identity from the downward API.
    assert env["BALPM_REPLICA_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    # $(POD_IP) only expands when POD_IP is defined earlier in the list.
    assert env["BALPM_ADVERTISE_ADDRESS"]["value"] == f"$(POD_IP):{s.port}"
    assert names.index("POD_IP") < names.index("BALPM_ADVERTISE_ADDRESS")

    # Shared storage: the database URL and the bucket credentials from Secrets, never literals.
    db = env["BALPM_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
    assert db["key"] == DATABASE_SECRET_KEY and generated(db["name"], DATABASE_SECRET)
    assert "BALPM_DATABASE_URL" not in cm
    assert s.artifact_url.startswith("s3://") and len(s.artifact_url.split("/")) >= 4, s.artifact_url
    for name in AWS_ENV:
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["key"] == name and generated(ref["name"], BUCKET_SECRET)
    assert not any("value" in env[n] for n in ("BALPM_DATABASE_URL", *AWS_ENV))

    # Spread over nodes; one replica at a time may be evicted (drains never blocked).
    selector = spec["selector"]["matchLabels"]
    spreads = pod["topologySpreadConstraints"]
    assert {t["topologyKey"] for t in spreads} >= {"kubernetes.io/hostname"}
    assert all(t["labelSelector"]["matchLabels"] == selector and t["maxSkew"] == 1 for t in spreads)
    pdbs = [p for p in by_kind(docs, "PodDisruptionBudget") if p["spec"]["selector"]["matchLabels"] == selector]
    (pdb,) = pdbs
    assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]
    assert selector.items() <= spec["template"]["metadata"]["labels"].items()

    # The secrets exist in the overlay (cpu-dev generates them) or are documented (gpu).
    if overlay == "cpu-dev":
        data = secret_data(docs, db["name"])
        assert data[DATABASE_SECRET_KEY].startswith("postgresql://")
        s3 = secret_data(docs, env["AWS_REGION"]["valueFrom"]["secretKeyRef"]["name"])
        assert set(AWS_ENV) <= set(s3)
    else:
        readme = (ROOT / "deploy" / "README.md").read_text()
        assert f"{CNPG_CLUSTER}-app" in readme and BUCKET_SECRET in readme
        assert db["name"] == f"{CNPG_CLUSTER}-app"


def test_rendered_storage_network_policies(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    """balpm may reach PostgreSQL on 5432 (and the database pods accept it), and the bucket."""
    overlay, docs = rendered
    dep = one(docs, "Deployment", "balpm")
    selector = dep["spec"]["selector"]["matchLabels"]
    policies = by_kind(docs, "NetworkPolicy")
    balpm_policies = [p for p in policies if p["spec"]["podSelector"] == {"matchLabels": selector}]
    egress = [r for p in balpm_policies for r in p["spec"].get("egress", [])]
    to_5432 = [peer for r in egress if 5432 in {p["port"] for p in r["ports"]} for peer in r["to"]]
    assert to_5432, "no egress to PostgreSQL"
    db_labels = {"cpu-dev": {"app.kubernetes.io/name": "postgres"}, "gpu": {"cnpg.io/cluster": CNPG_CLUSTER}}[overlay]
    assert all(db_labels.items() <= peer["podSelector"]["matchLabels"].items() for peer in to_5432)
    # The database pods admit balpm on 5432.
    db_policies = [
        p for p in by_kind(docs, "NetworkPolicy")
        if p["spec"]["podSelector"].get("matchLabels", {}).items() >= db_labels.items() and p["spec"]["podSelector"]
    ]  # fmt: skip
    admitted = [
        peer
        for p in db_policies
        for r in p["spec"].get("ingress", [])
        if 5432 in {x["port"] for x in r["ports"]}
        for peer in r["from"]
    ]
    assert {"podSelector": {"matchLabels": selector}} in admitted
    if overlay == "cpu-dev":
        (sts,) = pods_selected(docs, to_5432[0]["podSelector"]["matchLabels"])
        assert sts["kind"] == "StatefulSet"
        # The bucket (MinIO) on its S3 port.
        minio_svc = one(docs, "Service", "minio")
        s3_port = minio_svc["spec"]["ports"][0]["port"]
        assert any(
            s3_port in {p["port"] for p in r["ports"]}
            and all(peer["podSelector"]["matchLabels"] == minio_svc["spec"]["selector"] for peer in r["to"])
            for r in egress
        )
    else:
        assert any(443 in {p["port"] for p in r["ports"]} for r in egress), "no egress to the bucket (HTTPS)"


def test_rendered_cpu_dev_postgres_and_bucket() -> None:
    docs = _render("cpu-dev")
    if docs is None:
        pytest.skip("no kustomize renderer and no fresh .cache/deploy-rendered (run .ci/deploy_checks.sh)")
    sts = one(docs, "StatefulSet", "postgres")
    assert sts["spec"]["replicas"] == 1
    c = container(sts, "postgres")
    image = c["image"]
    assert re.fullmatch(r"docker\.io/library/postgres:16\.\d+(-\w+)?", image), image
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert "POSTGRES_PASSWORD" not in env, "the password comes as a file"
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    pgdata = env["PGDATA"]
    data_mount = next(path for path in mounts if pgdata.startswith(path + "/"))
    assert mounts[data_mount] in [t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]]
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"]["whenDeleted"] == "Retain"
    # The URL balpm uses points at this database, with its user, password and database.
    dep = one(docs, "Deployment", "balpm")
    benv = env_of(container(dep, "balpm"))
    ref = benv["BALPM_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
    secret = secret_data(docs, ref["name"])
    pw_dir, pw_file = os.path.split(env["POSTGRES_PASSWORD_FILE"])
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    pw_secret = volumes[mounts[pw_dir]]["secret"]
    assert pw_secret["secretName"] == ref["name"]
    pw_key = next(i["key"] for i in pw_secret["items"] if i["path"] == pw_file)
    svc = one(docs, "Service", sts["spec"]["serviceName"])
    assert svc["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    port = svc["spec"]["ports"][0]["port"]
    assert secret[ref["key"]] == (
        f"postgresql://{env['POSTGRES_USER']}:{secret[pw_key]}@{svc['metadata']['name']}:{port}/{env['POSTGRES_DB']}"
    )
    # The bucket: balpm's endpoint is the MinIO Service, and the Job creates the bucket of BALPM_ARTIFACT_URL.
    s = Settings.from_env(environ=config_env("cpu-dev"))
    bucket = s.artifact_url.split("/")[2]
    s3 = secret_data(docs, benv["AWS_ENDPOINT_URL_S3"]["valueFrom"]["secretKeyRef"]["name"])
    minio = one(docs, "Service", "minio")
    assert s3["AWS_ENDPOINT_URL_S3"] == f"http://{minio['metadata']['name']}:{minio['spec']['ports'][0]['port']}"
    (minio_dep,) = pods_selected(docs, minio["spec"]["selector"])
    assert minio_dep["kind"] == "Deployment" and minio_dep["spec"]["strategy"]["type"] == "Recreate"
    job = one(docs, "Job", "minio-create-bucket")
    script = container(job, "create-bucket")["command"][-1]
    assert f"mb --ignore-existing dev/{bucket}" in script and f"version enable dev/{bucket}" in script
    # balpm's bucket credentials are MinIO's root pair (dev only).
    creds = secret_data(docs, volumes_secret(minio_dep, "credentials"))
    assert (creds["access_key"], creds["secret_key"]) == (s3["AWS_ACCESS_KEY_ID"], s3["AWS_SECRET_ACCESS_KEY"])


def volumes_secret(workload: dict[str, Any], volume: str) -> str:
    volumes = workload["spec"]["template"]["spec"]["volumes"]
    return next(v["secret"]["secretName"] for v in volumes if v["name"] == volume)


def test_rendered_gpu_cloudnative_pg_cluster() -> None:
    docs = _render("gpu")
    if docs is None:
        pytest.skip("no kustomize renderer and no fresh .cache/deploy-rendered (run .ci/deploy_checks.sh)")
    assert not by_kind(docs, "StatefulSet"), "gpu runs PostgreSQL through CloudNativePG"
    (cluster,) = [d for d in by_kind(docs, "Cluster") if d["apiVersion"] == CNPG_API]
    assert cluster["metadata"]["name"] == CNPG_CLUSTER and cluster["metadata"]["namespace"] == "balpm"
    spec = cluster["spec"]
    assert spec["instances"] == 3
    assert re.fullmatch(r"ghcr\.io/cloudnative-pg/postgresql:16\.\d+", spec["imageName"]), spec["imageName"]
    assert quantity_bytes(spec["storage"]["size"]) >= 10 * 2**30
    assert spec["affinity"]["enablePodAntiAffinity"] is True
    initdb = spec["bootstrap"]["initdb"]
    assert initdb["database"] and initdb["owner"]
    # balpm reads the operator-generated app secret (<cluster>-app, key uri).
    benv = env_of(container(one(docs, "Deployment", "balpm"), "balpm"))
    ref = benv["BALPM_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": f"{CNPG_CLUSTER}-app", "key": "uri"}
    assert not [s for s in by_kind(docs, "Secret") if s["metadata"]["name"] == ref["name"]], "the operator makes it"
    # Backups to the object store, scheduled.
    store = spec["backup"]["barmanObjectStore"]
    assert store["destinationPath"].startswith("s3://")
    assert {"accessKeyId", "secretAccessKey"} <= set(store["s3Credentials"])
    (scheduled,) = by_kind(docs, "ScheduledBackup")
    assert scheduled["apiVersion"] == CNPG_API and scheduled["spec"]["cluster"]["name"] == CNPG_CLUSTER
    assert len(scheduled["spec"]["schedule"].split()) == 6, "CloudNativePG cron has a seconds field"
    # Only CRD kinds the deploy checks know to skip (kubernetes-validate has no schema for them).
    script = (ROOT / ".ci" / "deploy_checks.sh").read_text()
    for d in docs:
        group = d["apiVersion"].rpartition("/")[0]
        if "." in group and not group.endswith(".k8s.io"):  # not a built-in API group
            assert f'"{d["kind"]} {d["apiVersion"]}"' in script, f"{d['kind']} not in crd_kinds of deploy_checks.sh"


def test_rendered_services_and_servicemonitors(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    dep = one(docs, "Deployment", "balpm")
    sel = dep["spec"]["selector"]["matchLabels"]
    client = one(docs, "Service", "balpm")
    assert client["spec"]["type"] == "ClusterIP" and client["spec"]["selector"] == sel
    headless = one(docs, "Service", "balpm-headless")
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["selector"] == sel
    # Only ready replicas in DNS (no shard names to keep any more).
    assert not headless["spec"].get("publishNotReadyAddresses", False)
    assert sel.items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    for sm in by_kind(docs, "ServiceMonitor"):
        assert sm["apiVersion"] == "monitoring.coreos.com/v1"
        match = sm["spec"]["selector"]["matchLabels"]
        services = [s for s in by_kind(docs, "Service") if match.items() <= s["metadata"]["labels"].items()]
        for ep in sm["spec"]["endpoints"]:
            exposing = [s for s in services if ep["port"] in {p["name"] for p in s["spec"]["ports"]}]
            assert len(exposing) == 1, f"{sm['metadata']['name']}: port {ep['port']} must be on exactly one Service"
            assert ep["path"] == "/metrics"
            (svc,) = exposing
            target = next(p["targetPort"] for p in svc["spec"]["ports"] if p["name"] == ep["port"])
            pods = pods_selected(docs, svc["spec"]["selector"])
            assert pods and all(
                target in {p["name"] for c in w["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
                for w in pods
            )


def test_rendered_security_and_images(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    overlay, docs = rendered
    workloads = workloads_of(docs)
    expected = {"balpm", "triton"} | ({"postgres", "minio", "minio-create-bucket"} if overlay == "cpu-dev" else set())
    assert {w["metadata"]["name"] for w in workloads} == expected
    for w in workloads:
        pod = w["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
        assert pod.get("serviceAccountName"), "dedicated service account"
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert sc["runAsUser"] >= 10000
            image = c["image"]
            assert "@sha256:" in image or re.fullmatch(r"[^:]+(:\d+)?/[^:]+:[\w.-]+", image), image
            assert not image.endswith(":latest")
            assert c["imagePullPolicy"] in ("Always", "IfNotPresent")
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]) and {"cpu", "memory"} <= set(
                c["resources"]["limits"]
            )
            gpus = c["resources"]["limits"].get("nvidia.com/gpu")
            assert (gpus == 1) if overlay == "gpu" else gpus is None
        labels = w["spec"]["template"]["metadata"]["labels"]
        for key in ("name", "component", "part-of", "instance"):
            assert f"app.kubernetes.io/{key}" in labels
    for d in docs:
        labels = d["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/part-of") == "balpm", d["metadata"]["name"]
        assert "app.kubernetes.io/instance" in labels
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == ("balpm-dev" if overlay == "cpu-dev" else "balpm")
    # Every pod is covered by a NetworkPolicy that names it (besides the default deny).
    policies = by_kind(docs, "NetworkPolicy")
    for w in workloads:
        labels = w["spec"]["template"]["metadata"]["labels"]
        selectors = [p["spec"]["podSelector"].get("matchLabels") for p in policies]
        assert any(sel and sel.items() <= labels.items() for sel in selectors), w["metadata"]["name"]
    hpas = by_kind(docs, "HorizontalPodAutoscaler")
    if overlay == "gpu":
        (hpa,) = hpas
        assert hpa["spec"]["scaleTargetRef"]["name"] == "triton"
        assert "replicas" not in one(docs, "Deployment", "triton")["spec"], "the HPA owns replicas"
    else:
        assert not hpas
        assert "--model-config-name=cpu" in container(one(docs, "Deployment", "triton"), "triton")["args"]
    assert {p["metadata"]["name"] for p in by_kind(docs, "PodDisruptionBudget")} == {"balpm", "triton"}


# --- the image's health checker, run for real ------------------------------------------------


@pytest.fixture()
def health_server() -> Iterator[tuple[health.HealthServicer, grpc.Server, int]]:
    servicer = health.HealthServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    yield servicer, server, 0
    server.stop(0)


def run_healthcheck(tmp_path: Path, port: int, service: str, **env: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / HEALTHCHECK_BIN
    script.write_text(healthcheck_script())
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("BALPM_", "HEALTHCHECK_"))}
    environ.update({"BALPM_PORT": str(port), "HEALTHCHECK_TIMEOUT_S": "5", **env})
    return subprocess.run(
        [sys.executable, str(script), service], env=environ, capture_output=True, text=True, timeout=60
    )


@pytest.mark.service  # starts a gRPC health server on loopback
def test_healthcheck_plaintext(tmp_path: Path, health_server: Any) -> None:
    servicer, server, _ = health_server
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
    assert run_healthcheck(tmp_path, port, "").returncode == 0
    res = run_healthcheck(tmp_path, port, SERVICE_NAME)
    assert res.returncode == 1 and "NOT_SERVING" in res.stderr
    servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    assert run_healthcheck(tmp_path, port, SERVICE_NAME).returncode == 0
    assert run_healthcheck(tmp_path, port, "no.such.Service").returncode == 1
    servicer.enter_graceful_shutdown()
    assert run_healthcheck(tmp_path, port, "").returncode == 1


@pytest.mark.service  # starts a gRPC health server on loopback
@pytest.mark.parametrize("mutual", [False, True])
def test_healthcheck_tls(tmp_path: Path, health_server: Any, mutual: bool) -> None:
    if not shutil.which("openssl"):
        pytest.skip("openssl not installed")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=balpm",
         "-addext", "subjectAltName=DNS:localhost,DNS:balpm", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    servicer, server, _ = health_server
    creds = grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())],
        root_certificates=cert.read_bytes() if mutual else None,
        require_client_auth=mutual,
    )
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    env = {"BALPM_TLS_CERT_FILE": str(cert), "BALPM_TLS_KEY_FILE": str(key)}
    if mutual:
        env["BALPM_TLS_CLIENT_CA_FILE"] = str(cert)
    res = run_healthcheck(tmp_path, port, SERVICE_NAME, **env)
    assert res.returncode == 0, res.stderr
    # Plaintext against a TLS port fails (the probe must follow the server's TLS settings).
    assert run_healthcheck(tmp_path, port, SERVICE_NAME).returncode == 1
