# syntax=docker/dockerfile:1.7
#
# balpm server image (issue #8).
#
#   docker build -t balpm-server:0.1.0-cpu .                       # CPU (default)
#   docker build -t balpm-server:0.1.0-gpu --build-arg VARIANT=gpu .  # CUDA torch + faiss-gpu-cu12
#
# Stages: `deps` installs the third-party wheels from pyproject.toml only (cached until
# pyproject.toml or a build arg changes), `build` adds our two packages on top, `runtime`
# copies the finished virtualenv into a slim image that runs as uid 10001.
# The heredoc below (COPY <<EOF) needs BuildKit, i.e. Docker >= 23 or `docker buildx`.

# One pinned base for every stage (bump the patch version on Python security releases).
FROM python:3.11.14-slim-bookworm AS base

# ---------------------------------------------------------------------------------------
FROM base AS deps
ARG VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ARG FAISS_GPU_VERSION=1.14.1.post1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
# torch first and pinned: the CPU variant takes the CPU-only wheel from the PyTorch index
# (the PyPI wheel drags in ~3 GB of CUDA libraries); the GPU variant takes the PyPI wheel,
# which bundles the CUDA 12 runtime, and faiss-gpu-cu12 instead of faiss-cpu.
RUN case "${VARIANT}" in \
      cpu) pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}" ;; \
      gpu) pip install --no-cache-dir "torch==${TORCH_VERSION}" "faiss-gpu-cu12==${FAISS_GPU_VERSION}" ;; \
      *) echo "VARIANT must be cpu or gpu, got '${VARIANT}'" >&2; exit 1 ;; \
    esac \
 && pip freeze | grep -i '^torch==' > /opt/constraints.txt
WORKDIR /src
COPY pyproject.toml ./
# Only the dependency list of pyproject.toml, so editing source does not re-download wheels.
# On GPU, faiss-cpu is dropped: it and faiss-gpu-cu12 both install the `faiss` module.
RUN python -c 'import tomllib, os; deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]; gpu = os.environ["VARIANT"] == "gpu"; print("\n".join(d for d in deps if not (gpu and d.startswith("faiss-cpu"))))' > /opt/requirements.txt \
 && pip install --no-cache-dir -r /opt/requirements.txt -c /opt/constraints.txt

# ---------------------------------------------------------------------------------------
FROM deps AS build
COPY README.md ./
COPY client ./client
COPY service ./service
# --no-deps: every dependency is already in the layer above (and on GPU faiss-cpu must stay out).
RUN pip install --no-cache-dir --no-deps . \
 && python -c 'import balpm_server.settings, balpm.v1.balpm_pb2_grpc' \
 && find /opt/venv -name '__pycache__' -type d -prune -exec rm -rf {} +

# ---------------------------------------------------------------------------------------
FROM base AS runtime
ARG VARIANT=cpu
LABEL org.opencontainers.image.title="balpm-server" \
      org.opencontainers.image.description="gRPC service that picks which LLM preference pairs to label next" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.balpm.variant="${VARIANT}"
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN groupadd --system --gid 10001 balpm \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin balpm \
 && mkdir -p /var/lib/balpm \
 && chown 10001:10001 /var/lib/balpm
COPY --from=build /opt/venv /opt/venv

# gRPC health probe used by HEALTHCHECK and by Kubernetes exec probes when TLS is on
# (kubelet's native gRPC probe cannot speak TLS). Plaintext unless BALPM_TLS_CERT_FILE is set;
# then it verifies the server with HEALTHCHECK_TLS_CA_FILE (default: the client CA, else the
# server cert itself) and, under mutual TLS, presents the server's own cert/key as client cert.
# Usage: balpm-healthcheck [SERVICE]   ("" = whole server; exit 0 only when SERVING)
COPY --chmod=0755 <<'EOF' /usr/local/bin/balpm-healthcheck
#!/opt/venv/bin/python
import os
import sys

import grpc
import grpc_health.v1.health_pb2 as health_pb2
import grpc_health.v1.health_pb2_grpc as health_pb2_grpc


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def main():
    service = sys.argv[1] if len(sys.argv) > 1 else ""
    target = "127.0.0.1:" + os.environ.get("BALPM_PORT", "50051")
    cert = os.environ.get("BALPM_TLS_CERT_FILE", "")
    if cert:
        client_ca = os.environ.get("BALPM_TLS_CLIENT_CA_FILE", "")
        root = os.environ.get("HEALTHCHECK_TLS_CA_FILE") or client_ca or cert
        key = os.environ.get("BALPM_TLS_KEY_FILE", "")
        creds = grpc.ssl_channel_credentials(
            root_certificates=_read(root),
            private_key=_read(key) if client_ca else None,
            certificate_chain=_read(cert) if client_ca else None,
        )
        name = os.environ.get("HEALTHCHECK_TLS_SERVER_NAME", "localhost")
        channel = grpc.secure_channel(target, creds, options=[("grpc.ssl_target_name_override", name)])
    else:
        channel = grpc.insecure_channel(target)
    timeout = float(os.environ.get("HEALTHCHECK_TIMEOUT_S", "3"))
    try:
        with channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    except grpc.RpcError as e:
        print(f"balpm-healthcheck: {target} {service!r}: {e.code().name}", file=sys.stderr)
        return 1
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        print(f"balpm-healthcheck: {target} {service!r}: {name}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
EOF

# 0.0.0.0 so the port is reachable from outside the container; the server still refuses to
# serve plaintext on a non-loopback address unless TLS is configured or BALPM_INSECURE=true.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    HF_HOME=/tmp/hf \
    HF_HUB_OFFLINE=1 \
    BALPM_HOST=0.0.0.0 \
    BALPM_METRICS_HOST=0.0.0.0 \
    BALPM_DATA_DIR=/var/lib/balpm
WORKDIR /var/lib/balpm
USER 10001:10001
EXPOSE 50051 9090
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD ["balpm-healthcheck", "balpm.v1.BalpmService"]
ENTRYPOINT ["balpm-server"]
