"""The config: strict validation, errors with field paths, env secrets, exit code 3."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from edge_agent.config import DEFAULT_CONFIG_PATH, check_models, load_config, parse_config
from edge_agent.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def _problems(raw: object) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, env={})
    return dict(info.value.problems)


def test_default_config_is_valid_and_names_the_bundled_models() -> None:
    config = load_config(DEFAULT_CONFIG_PATH, env={})
    assert config.site == "local"
    assert config.state_dir.is_absolute()
    assert config.model_repository == (REPO / "engines").resolve()
    assert config.model_names() == ["cxr-nodule", "ct-demo"]


def test_unknown_key_names_its_path_and_suggests_the_right_one() -> None:
    problems = _problems({"site": "a", "state_dir": "/s", "dicom": {"ae_titel": "X"}})
    assert problems == {"dicom.ae_titel": "unknown key; did you mean 'ae_title'?"}


def test_no_silent_coercion_of_wrong_types() -> None:
    problems = _problems({"site": "a", "state_dir": "/s", "dicom": {"port": "11112"}, "http": {"port": 70000}})
    assert set(problems) == {"dicom.port", "http.port"}


def test_back_pressure_and_complete_on_release_are_checked() -> None:
    config = load_config(DEFAULT_CONFIG_PATH, env={})
    assert config.pipeline.max_pending_instances == 2000
    assert [r.complete_on_release for r in config.routes] == [False, False]
    route = {"name": "ct", "model": "ct-demo", "complete_on_release": "yes"}
    problems = _problems({"site": "a", "state_dir": "/s", "pipeline": {"max_pending_instances": 1},
                          "routes": [route]})
    assert set(problems) == {"pipeline.max_pending_instances", "routes[0].complete_on_release"}


def test_inference_niceness_is_a_linux_niceness() -> None:
    assert load_config(DEFAULT_CONFIG_PATH, env={}).pipeline.inference_niceness == 10
    for bad in (-1, 20, "low"):
        problems = _problems({"site": "a", "state_dir": "/s", "pipeline": {"inference_niceness": bad}})
        assert set(problems) == {"pipeline.inference_niceness"}


def test_every_error_is_reported_at_once_with_list_indices() -> None:
    raw = {
        "state_dir": "/s",
        "routes": [
            {"name": "ok", "model": "m"},
            {
                "name": "bad",
                "model": "m",
                "priority": "asap",
                "match": {"series_description": "(", "slices": {"min": 5, "max": 2}},
            },
        ],
    }
    problems = _problems(raw)
    assert "site" in problems
    assert "routes[1].priority" in problems
    assert problems["routes[1].match.series_description"].startswith("not a valid regular expression")
    assert "below min" in problems["routes[1].match.slices"]


def test_bad_ae_titles_are_refused() -> None:
    problems = _problems(
        {"site": "a", "state_dir": "/s", "dicom": {"ae_title": "A" * 17, "allowed_calling_aets": ["OK", "BAD\\AE"]}}
    )
    assert set(problems) == {"dicom.ae_title", "dicom.allowed_calling_aets"}


def test_route_to_a_missing_model_suggests_the_nearest() -> None:
    config = parse_config({"site": "a", "state_dir": "/s", "routes": [{"name": "r", "model": "cxr-nodle"}]}, env={})
    with pytest.raises(ConfigError) as info:
        check_models(config, ["cxr-nodule", "ct-demo"])
    assert info.value.lines() == ["routes[0].model: no model 'cxr-nodle'; did you mean 'cxr-nodule'?"]


def test_secrets_come_from_the_environment() -> None:
    config = parse_config(
        {"site": "a", "state_dir": "/s", "bus": {"token": "from-yaml"}},
        env={"EDGE_AGENT_BUS_TOKEN": "from-env", "EDGE_AGENT_BUS_USER": "u", "EDGE_AGENT_BUS_PASSWORD": "p"},
    )
    assert (config.bus.token, config.bus.user, config.bus.password) == ("from-env", "u", "p")


def test_invalid_yaml_says_where(tmp_path: Path) -> None:
    bad = tmp_path / "agent.yaml"
    bad.write_text("site: a\nstate_dir: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad, env={})
    assert "line" in str(info.value) and "not valid YAML" in str(info.value)


@pytest.mark.parametrize("text", [
    # A second block appended to change the port would drop the first's allowed AE titles.
    "site: a\nstate_dir: /s\ndicom:\n  allowed_calling_aets: [CT1]\ndicom:\n  port: 11113\n",
    "site: a\nstate_dir: /s\ndicom:\n  port: 11112\n  port: 11113\n",
])
def test_a_key_given_twice_is_refused_with_its_line(tmp_path: Path, text: str) -> None:
    bad = tmp_path / "agent.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(bad, env={})
    assert "appears twice in one mapping" in str(info.value) and "line 5" in str(info.value)


@pytest.mark.parametrize(("key", "section", "value"), [
    ("bus.duplicate_window_seconds", "bus", {"duplicate_window_seconds": float("inf")}),
    ("dicom.acse_timeout_seconds", "dicom", {"acse_timeout_seconds": float("inf")}),
    ("pipeline.drain_timeout_seconds", "pipeline", {"drain_timeout_seconds": float("nan")}),
])
def test_an_infinite_or_nan_duration_is_refused(key: str, section: str, value: dict[str, float]) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"site": "a", "state_dir": "/s", section: value}, env={})
    assert info.value.lines()[0].startswith(f"{key}: ") and "finite" in info.value.lines()[0]


def test_the_http_port_must_not_be_a_dicom_port() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"site": "a", "state_dir": "/s", "dicom": {"port": 11112}, "http": {"port": 11112}}, env={})
    assert "http.port 11112 is also a DICOM port" in str(info.value)


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge_agent", *args], capture_output=True, text=True, timeout=60, cwd=REPO
    )


def test_check_config_exits_0_on_the_default() -> None:
    result = _run_cli("check-config", str(DEFAULT_CONFIG_PATH))
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


@pytest.mark.parametrize("command", ["check-config", "serve"])
def test_bad_config_exits_3_naming_the_field(tmp_path: Path, command: str) -> None:
    raw = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    raw["state_dir"] = str(tmp_path / "state")
    raw["model_repository"] = str(REPO / "engines")
    raw["routes"][0]["model"] = "cxr-nodle"
    raw["dicom"]["max_associations"] = 0
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    args = [command, str(cfg)] if command == "check-config" else [command, "--config", str(cfg)]
    result = _run_cli(*args)
    assert result.returncode == 3, result.stderr
    assert "dicom.max_associations" in result.stderr
    # The route's unknown model is reported in the same run as the schema error (issue 10), by both commands.
    assert "routes[0].model: no model 'cxr-nodle'; did you mean 'cxr-nodule'?" in result.stderr
    assert "Traceback" not in result.stderr
