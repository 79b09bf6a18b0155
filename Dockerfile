# edge-agent in a container: the daemon only (no dcmtk, no nats-server; those are peers).
#
#   docker build -t edge-agent .
#   docker run --rm --stop-timeout 90 -p 11112:11112 -p 9108:9108 \
#       -v /srv/edge-agent/agent.yaml:/etc/edge-agent/agent.yaml:ro \
#       -v edge-agent-state:/var/lib/edge-agent \
#       -e EDGE_AGENT_BUS_TOKEN=... edge-agent
#
# --stop-timeout: docker's default 10 s is shorter than the drain (pipeline.drain_timeout_seconds,
# 30 s by default); a SIGKILL mid-drain loses nothing (the journal resumes it) but delays findings.
# The built-in /etc/edge-agent/agent.yaml is the repository's default with container paths and
# 0.0.0.0 listeners; mount your own for a real site (bus.url must name a reachable NATS server).
# GPU (TensorRT): run with --gpus all on an image whose base carries the CUDA runtime.

FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Only what the package build needs: the build context's .venv/state must not leak into the image.
COPY pyproject.toml README.md ./
COPY edge_agent ./edge_agent
# Every dependency ships manylinux wheels for CPython 3.11, so no compiler is needed.
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
    EDGE_AGENT_HEALTHZ_URL=http://127.0.0.1:9108/healthz
# The same path as in the build stage: a venv's scripts name their interpreter by absolute path.
COPY --from=build /opt/edge-agent /opt/edge-agent

# A fixed, non-root uid/gid so that volume ownership and Kubernetes runAsNonRoot checks are predictable.
RUN groupadd --system --gid 10001 edge-agent \
 && useradd --system --uid 10001 --gid edge-agent --home-dir /var/lib/edge-agent --no-create-home \
        --shell /usr/sbin/nologin edge-agent \
 && install -d -o edge-agent -g edge-agent -m 0750 /var/lib/edge-agent \
 && install -d -o root -g edge-agent -m 0750 /etc/edge-agent

COPY engines /usr/share/edge-agent/engines
COPY configs /usr/share/edge-agent/configs
# The default config's relative paths point into a source checkout; rewrite them for the image and
# listen on all interfaces (127.0.0.1 inside a container is unreachable from outside). check-config
# fails the build if the result is not a valid configuration or a model it names is missing.
RUN sed -e 's#^state_dir:.*#state_dir: /var/lib/edge-agent#' \
        -e 's#^model_repository:.*#model_repository: /usr/share/edge-agent/engines#' \
        -e 's#^\(  host:[[:space:]]*\)127\.0\.0\.1#\10.0.0.0#' \
        /usr/share/edge-agent/configs/agent.yaml > /etc/edge-agent/agent.yaml \
 && chown root:edge-agent /etc/edge-agent/agent.yaml && chmod 0640 /etc/edge-agent/agent.yaml \
 && edge-agent check-config /etc/edge-agent/agent.yaml

USER 10001:10001
WORKDIR /var/lib/edge-agent
VOLUME ["/var/lib/edge-agent"]
# 11112: DICOM (C-STORE SCP); 9108: /metrics, /healthz, /readyz.
EXPOSE 11112 9108

# The slim image has no curl; the interpreter is there anyway. /healthz is answered by the event
# loop, so a wedged loop fails the check. start-period covers engine loading and warm-up.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.build_opener(u.ProxyHandler({})).open(os.environ['EDGE_AGENT_HEALTHZ_URL'], timeout=4)"]

ENTRYPOINT ["edge-agent"]
CMD ["serve", "--config", "/etc/edge-agent/agent.yaml"]
