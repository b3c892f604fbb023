"""The deployment files (Dockerfile, deploy/k8s, deploy/triton) agree with what the server reads.

Two layers:
  * source checks read deploy/k8s/base + overlays/* YAML directly (no renderer needed):
    every BALPM_* key is a real `Settings` env var, container args are real
    `balpm-server` flags, ports/probes/data dir/secret paths match the settings;
  * rendered checks use the output of each overlay, rendered with `kubectl kustomize`
    when kubectl exists, else taken from .cache/deploy-rendered/ (written by
    .ci/deploy_checks.sh) when newer than deploy/k8s, else skipped.
The HEALTHCHECK script baked into the image is also run against a real gRPC health server.
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
    sts = one(base_docs(), "StatefulSet", "balpm")
    args = container(sts, "balpm")["args"]
    parsed = parse_args(args)
    assert set(parsed) <= FIELDS, set(parsed) - FIELDS
    flags = server_flags()
    if flags is not None:
        for arg in args:
            assert arg.split("=", 1)[0] in flags, f"{arg} is not a balpm-server flag"
    # No `command`: the image's ENTRYPOINT is balpm-server.
    assert "command" not in container(sts, "balpm")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ports_probes_and_paths_match_settings(overlay: str) -> None:
    docs = base_docs()
    sts = one(docs, "StatefulSet", "balpm")
    c = container(sts, "balpm")
    s = settings_for(config_env(overlay), c["args"])
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {GRPC_PORT_NAME: s.port, METRICS_PORT_NAME: s.metrics_port}
    assert (s.port, s.metrics_port) == (50051, 9090)

    # Native gRPC probes (base): the health service names the server registers.
    assert c["readinessProbe"]["grpc"] == {"port": s.port, "service": SERVICE_NAME}
    for probe in ("livenessProbe", "startupProbe"):
        assert c[probe]["grpc"] == {"port": s.port, "service": ""}

    # Data dir on the PVC of the volumeClaimTemplate; writable /tmp (HF_HOME=/tmp/hf).
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    vct = [t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]]
    assert s.data_dir == "/var/lib/balpm"
    assert mounts[s.data_dir] in vct
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]

    # API keys file inside the Secret mount, under the key the Secret item projects.
    keys_dir, keys_name = os.path.split(s.api_keys_file)
    secret = volumes[mounts[keys_dir]]["secret"]
    assert secret["secretName"] == "balpm-api-keys"
    assert keys_name in [i["path"] for i in secret["items"]]

    # Drain fits in the grace period.
    assert sts["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > s.shutdown_grace_s + 5


def test_gpu_overlay_tls_files_and_exec_probes() -> None:
    s = Settings.from_env(environ=config_env("gpu"))
    patch = load_docs(K8S / "overlays" / "gpu" / "balpm-gpu.yaml")[0]
    c = container(patch, "balpm")
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in patch["spec"]["template"]["spec"]["volumes"]}
    for path in (s.tls_cert_file, s.tls_key_file, s.tls_client_ca_file):
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
    pol = one(docs, "NetworkPolicy", "balpm")
    ports = sorted(p["port"] for rule in pol["spec"]["ingress"] for p in rule["ports"])
    assert ports == sorted([s.port, s.metrics_port])
    grpc_rule = next(r for r in pol["spec"]["ingress"] if r["ports"][0]["port"] == s.port)
    for peer in grpc_rule["from"]:
        assert peer["podSelector"]["matchLabels"] == {"balpm.io/labelling-client": "true"}
    metrics_rule = next(r for r in pol["spec"]["ingress"] if r["ports"][0]["port"] == s.metrics_port)
    assert metrics_rule["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]
    triton = one(docs, "NetworkPolicy", "triton")
    sts = one(docs, "StatefulSet", "balpm")
    grpc_in = next(r for r in triton["spec"]["ingress"] if r["ports"][0]["port"] == 8001)
    assert grpc_in["from"] == [{"podSelector": {"matchLabels": sts["spec"]["selector"]["matchLabels"]}}]


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


def test_rendered_configmap_is_the_one_the_statefulset_reads(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    overlay, docs = rendered
    sts = one(docs, "StatefulSet", "balpm")
    c = container(sts, "balpm")
    (ref,) = [e["configMapRef"]["name"] for e in c["envFrom"]]
    cm = one(docs, "ConfigMap", ref)  # hash-suffixed name rewritten by kustomize
    assert set(cm["data"]) <= ENV_NAMES, set(cm["data"]) - ENV_NAMES
    assert cm["data"] == config_env(overlay)
    for e in c.get("env", []):
        assert not e["name"].startswith("BALPM_") or e["name"] in ENV_NAMES
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
    assert sts["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > s.shutdown_grace_s


def test_rendered_services_and_servicemonitors(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    sts = one(docs, "StatefulSet", "balpm")
    headless = one(docs, "Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    sel = sts["spec"]["selector"]["matchLabels"]
    assert headless["spec"]["selector"] == sel == one(docs, "Service", "balpm")["spec"]["selector"]
    assert sel.items() <= sts["spec"]["template"]["metadata"]["labels"].items()
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
            pods = [
                w
                for w in by_kind(docs, "StatefulSet") + by_kind(docs, "Deployment")
                if svc["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()
            ]
            assert pods and all(
                target in {p["name"] for c in w["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
                for w in pods
            )


def test_rendered_security_and_images(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    overlay, docs = rendered
    workloads = by_kind(docs, "StatefulSet") + by_kind(docs, "Deployment")
    assert {w["metadata"]["name"] for w in workloads} == {"balpm", "triton"}
    for w in workloads:
        pod = w["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
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
