# edge-agent in a container: the daemon and the bundled models (no dcmtk, no nats-server; those are peers).
#
#   docker build -t edge-agent .
#   docker run -d --name edge-agent --stop-timeout 90 -p 11112:11112 -p 127.0.0.1:9108:9108 \
#       --add-host nats:BROKER_ADDRESS -v edge-agent-state:/var/lib/edge-agent edge-agent
#
# The whole stack (nats-server, this image, Prometheus, Grafana): docker compose -f deploy/compose.yaml up -d
#
# --stop-timeout: docker's default 10 s is shorter than the drain (pipeline.drain_timeout_seconds,
# 30 s by default); a SIGKILL mid-drain loses nothing (the journal resumes it) but delays findings.
# The built-in /etc/edge-agent/agent.yaml is deploy/agent.yaml: configs/agent.yaml with container paths,
# 0.0.0.0 listeners and the broker at nats://nats:4222. Mount a folder of your own over /etc/edge-agent
# for a real site. GPU (TensorRT): Dockerfile.tensorrt.
# Checked in CI by hadolint and tests/test_container.py (README, "Docker").

FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Only what the package build needs: the build context's .venv/state must not leak into the image.
COPY pyproject.toml README.md ./
COPY edge_agent ./edge_agent
# A regular (not editable) install into a venv that the next stage copies whole. Every dependency ships
# manylinux wheels for CPython 3.11, so no compiler is needed.
RUN python -m venv /opt/edge-agent \
 && /opt/edge-agent/bin/pip install . \
 && /opt/edge-agent/bin/pip check

FROM python:3.11-slim-bookworm
LABEL org.opencontainers.image.title="edge-agent" \
      org.opencontainers.image.description="Streaming DICOM triage inference daemon" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/edge-agent/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    EDGE_AGENT_READYZ_URL=http://127.0.0.1:9108/readyz
# The same path as in the build stage: a venv's scripts name their interpreter by absolute path.
COPY --from=build /opt/edge-agent /opt/edge-agent

# A fixed, non-root uid/gid so that volume ownership and Kubernetes runAsNonRoot checks are predictable.
RUN groupadd --system --gid 10001 edge-agent \
 && useradd --system --uid 10001 --gid edge-agent --home-dir /var/lib/edge-agent --no-create-home \
        --shell /usr/sbin/nologin edge-agent \
 && install -d -o edge-agent -g edge-agent -m 0750 /var/lib/edge-agent \
 && install -d -o root -g edge-agent -m 0750 /etc/edge-agent

# The bundled models (cards and ONNX files) and the monitoring files, for reference.
COPY engines /usr/share/edge-agent/engines
COPY configs /usr/share/edge-agent/configs
# The container's configuration. check-config fails the build if it is not valid or a model it names is missing.
COPY deploy/agent.yaml /etc/edge-agent/agent.yaml
RUN chown root:edge-agent /etc/edge-agent/agent.yaml \
 && chmod 0640 /etc/edge-agent/agent.yaml \
 && edge-agent check-config /etc/edge-agent/agent.yaml

USER 10001:10001
WORKDIR /var/lib/edge-agent
# State (spool, journal, heat maps, plans) outlives the container; the config folder can be replaced whole.
VOLUME ["/var/lib/edge-agent", "/etc/edge-agent"]
# 11112: DICOM (C-STORE SCP); 9108: /metrics, /healthz, /readyz, /status (deploy/agent.yaml).
EXPOSE 11112 9108

# Healthy means ready: /readyz answers 200 only when the DICOM port is open, every engine is warm, the spool
# is writable and inference keeps up (else 503 with the reasons, which `docker inspect` shows). The slim
# image has no curl; the interpreter is there anyway. start-period covers engine loading and warm-up.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.build_opener(u.ProxyHandler({})).open(os.environ['EDGE_AGENT_READYZ_URL'], timeout=4)"]

ENTRYPOINT ["edge-agent"]
CMD ["serve", "--config", "/etc/edge-agent/agent.yaml"]
