"""Paths and config errors (issue 10): relative paths, missing folders, every error at once, addresses, and a
configs/agent.yaml that documents every key of the config model."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import types
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from edge_agent.config import DEFAULT_CONFIG_PATH, AgentConfig, load_config, parse_config
from edge_agent.configcheck import load_checked, state_dir_problem
from edge_agent.errors import ConfigError
from tests.certs import CertPaths

REPO = Path(__file__).resolve().parent.parent
ENGINES = REPO / "engines"


def _check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge_agent", "check-config", str(path)], capture_output=True,
                          text=True, timeout=60, cwd="/")


def _write(path: Path, raw: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return path


def _problems(path: Path) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        load_checked(path, env={})
    return dict(info.value.problems)


# -- relative paths --------------------------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_config_files_folder(tmp_path: Path, certs: CertPaths) -> None:
    box = tmp_path / "etc"
    (box / "tls").mkdir(parents=True)
    for name in ("ca.pem", "client.pem", "client.key"):
        source = {"ca.pem": certs.ca_file, "client.pem": certs.client_cert_file, "client.key": certs.client_key_file}
        (box / "tls" / name).write_bytes(source[name].read_bytes())
    (box / "calibration").mkdir()
    (box / "nats.creds").write_text("creds\n")
    os.symlink(ENGINES, box / "engines")
    cfg = _write(box / "agent.yaml", {
        "site": "a", "state_dir": "../state", "model_repository": "engines",
        "bus": {"url": "tls://127.0.0.1:4222", "credentials_file": "nats.creds",
                "tls": {"ca_file": "tls/ca.pem", "cert_file": "tls/client.pem", "key_file": "tls/client.key"}},
        "models": {"ct-demo": {"calibration_dir": "calibration"}},
        "routes": [{"name": "ct", "model": "ct-demo"}],
    })
    # Read from another folder: nothing depends on where the command runs.
    cwd = os.getcwd()
    os.chdir("/")
    try:
        config = load_checked(cfg, env={})
    finally:
        os.chdir(cwd)
    assert config.state_dir == tmp_path / "state"
    assert config.model_repository == box / "engines"  # the symlink as written, not where it points
    assert config.bus.credentials_file == str(box / "nats.creds")
    assert config.bus.tls is not None
    assert (config.bus.tls.ca_file, config.bus.tls.key_file) == (box / "tls" / "ca.pem", box / "tls" / "client.key")
    assert config.deployment("ct-demo").calibration_dir == box / "calibration"


def test_the_repository_default_resolves_from_any_folder() -> None:
    result = _check_config(DEFAULT_CONFIG_PATH)
    assert result.returncode == 0, result.stderr
    assert load_config(DEFAULT_CONFIG_PATH, env={}).model_repository == ENGINES


# -- paths that must exist --------------------------------------------------------------------------------------


def test_the_copied_default_config_is_exit_3_naming_model_repository_not_a_traceback(tmp_path: Path) -> None:
    """The issue's report: configs/agent.yaml copied into /etc/edge-agent keeps ../engines and ../state."""
    cfg = tmp_path / "etc" / "edge-agent" / "agent.yaml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text(DEFAULT_CONFIG_PATH.read_text())
    result = _check_config(cfg)
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    assert f"model_repository: {tmp_path / 'etc' / 'engines'}: no such folder" in result.stderr


def test_missing_files_and_folders_name_their_keys(tmp_path: Path) -> None:
    cfg = _write(tmp_path / "agent.yaml", {
        "site": "a", "state_dir": "state", "model_repository": str(ENGINES),
        "bus": {"credentials_file": "missing.creds"},
        "models": {"ct-demo": {"calibration_dir": "no-calibration"}},
        "dicom": {"tls": {"cert_file": "tls/dicom.pem", "key_file": "/nonexistent/dicom.key"}},
        "routes": [{"name": "ct", "model": "ct-demo"}],
    })
    problems = _problems(cfg)
    assert problems["bus.credentials_file"] == f"cannot read {tmp_path / 'missing.creds'}: No such file or directory"
    assert problems["models.ct-demo.calibration_dir"] == f"{tmp_path / 'no-calibration'}: no such folder"
    assert f"cannot read {tmp_path / 'tls' / 'dicom.pem'}" in problems["dicom.tls"]
    assert set(problems) == {"bus.credentials_file", "models.ct-demo.calibration_dir", "dicom.tls"}


def test_state_dir_must_be_a_folder_the_daemon_can_create_or_write(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    assert state_dir_problem(tmp_path / "new" / "deeper") is None  # created at start
    assert state_dir_problem(tmp_path) is None
    assert state_dir_problem(afile) == f"{afile} is not a folder"
    assert state_dir_problem(afile / "state") == f"cannot create {afile / 'state'}: {afile} is not a folder"
    cfg = _write(tmp_path / "agent.yaml", {"site": "a", "state_dir": "afile/state", "model_repository": str(ENGINES)})
    assert _problems(cfg) == {"state_dir": f"cannot create {afile / 'state'}: {afile} is not a folder"}


def test_a_read_only_parent_is_named_with_the_user(tmp_path: Path) -> None:
    # access(2) says what the daemon's user would meet; root passes any mode check, so drop to nobody.
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        problem = state_dir_problem(locked / "state")
        assert problem is not None and problem.startswith(f"cannot create {locked / 'state'}: {locked} is not writable")
        return
    # Outside pytest's own folder, which only root may enter.
    top = Path(tempfile.mkdtemp(prefix="edge-agent-ro-"))
    try:
        top.chmod(0o755)
        _check_as_nobody(top / "locked")
    finally:
        shutil.rmtree(top)


def _check_as_nobody(locked: Path) -> None:
    locked.mkdir(mode=0o755)
    code = ("import sys; from pathlib import Path; from edge_agent.configcheck import state_dir_problem; "
            f"print(state_dir_problem(Path({str(locked / 'state')!r})))")
    result = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable, "-c",
                             code], capture_output=True, text=True, timeout=60, cwd="/",
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"cannot create {locked / 'state'}: {locked} is not writable by user nobody"


# -- every error in one run -------------------------------------------------------------------------------------


def test_schema_errors_paths_and_unknown_models_come_in_one_run(tmp_path: Path) -> None:
    cfg = _write(tmp_path / "agent.yaml", {
        "site": "a", "state_dir": str(tmp_path / "afile" / "state"), "model_repository": str(ENGINES),
        "dicom": {"host": "127.0.0.1.5", "ae_titel": "X"},
        "http": {"port": "9108"},
        "models": {"ct-demo": {"precision": "int9"}, "cxr-nodle": {}},
        "routes": [{"name": "a", "model": "cxr-nodle"}, {"name": "a", "model": "ct-demo", "priority": "asap"},
                   {"name": "b", "model": 7}],
    })
    (tmp_path / "afile").write_text("")
    result = _check_config(cfg)
    assert result.returncode == 3
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines[0] == f"{cfg}: invalid configuration"
    assert sorted(line.strip() for line in lines[1:]) == sorted([
        "dicom.host: '127.0.0.1.5' is neither an IP address nor a host name",
        "dicom.ae_titel: unknown key; did you mean 'ae_title'?",
        "http.port: Input should be a valid integer",
        "models.ct-demo.precision: unknown precision 'int9'; one of: fp32, fp16, int8",
        "routes[1].priority: 'asap' is not one of: urgent, routine",
        "routes[2].model: Input should be a valid string",
        f"state_dir: cannot create {tmp_path / 'afile' / 'state'}: {tmp_path / 'afile'} is not a folder",
        "routes[0].model: no model 'cxr-nodle'; did you mean 'cxr-nodule'?",
        "routes[1].name: route name 'a' is used twice",
        "models.cxr-nodle: no model 'cxr-nodle'; did you mean 'cxr-nodule'?",
    ])


def test_a_broken_card_is_reported_beside_schema_errors(tmp_path: Path) -> None:
    repo = tmp_path / "engines"
    (repo / "broken").mkdir(parents=True)
    (repo / "broken" / "model.yaml").write_text("name: broken\n")
    cfg = _write(tmp_path / "agent.yaml", {"site": "a b", "state_dir": "state", "model_repository": "engines",
                                           "routes": [{"name": "r", "model": "broken"}]})
    problems = _problems(cfg)
    assert set(problems) == {"site", "models.broken"}


def test_unreadable_or_invalid_yaml_is_the_one_error_that_stops_the_rest(tmp_path: Path) -> None:
    result = _check_config(tmp_path / "missing.yaml")
    assert result.returncode == 3
    assert "cannot read config: No such file or directory" in result.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("site: [\n")
    result = _check_config(bad)
    assert result.returncode == 3 and "not valid YAML" in result.stderr and "Traceback" not in result.stderr


# -- addresses --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0", "::", "::1", "fe80::1%eth0", "localhost",
                                  "edge-box.radiology.example"])
def test_listen_addresses_and_host_names_are_accepted(host: str) -> None:
    config = parse_config({"site": "a", "state_dir": "/s", "dicom": {"host": host}, "http": {"host": host}}, env={})
    assert (config.dicom.host, config.http.host) == (host, host)


@pytest.mark.parametrize("host", ["127.0.0.1.5", "10.1.2.300", "", "ct 1", "-box", "a..b"])
def test_an_address_that_is_neither_ip_nor_name_is_refused_naming_the_key(host: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"site": "a", "state_dir": "/s", "dicom": {"host": host}, "http": {"host": host}}, env={})
    assert dict(info.value.problems) == {
        "dicom.host": f"{host!r} is neither an IP address nor a host name",
        "http.host": f"{host!r} is neither an IP address nor a host name",
    }


@pytest.mark.parametrize("url", ["nats://127.0.0.1:4222", "tls://nats.site.example:4222", "nats://[::1]:4222",
                                 "nats://a:4222, nats://b:4222", "nats://user:secret@nats:4222", "ws://h"])
def test_nats_urls_are_accepted(url: str) -> None:
    assert parse_config({"site": "a", "state_dir": "/s", "bus": {"url": url}}, env={}).bus.url == url


@pytest.mark.parametrize(("url", "message"), [
    ("nats://127.0.0.1.5:4222", "'nats://127.0.0.1.5:4222': '127.0.0.1.5' is neither an IP address nor a host name"),
    ("nats://h:70000", "'nats://h:70000': port 70000 is not between 1 and 65535"),
    ("http://h:4222", "'http://h:4222' is not a NATS URL like nats://host:4222"),
    # The password never reaches the message (it is printed and logged).
    ("nats://user:secret@127.0.0.1.5:4222", "'nats://***@127.0.0.1.5:4222': '127.0.0.1.5' is neither"),
    # Also a password that holds "/", "@" or a space (refused: such a URL needs them percent-encoded).
    ("nats://edge:s3c/secret@h:70000", "'nats://***@h:70000' is not a NATS URL"),
    ("nats://edge:p@ss-secret@h:70000", "'nats://***@h:70000' is not a NATS URL"),
    ("nats://edge:two secret@h:70000", "'nats://***@h:70000' is not a NATS URL"),
])
def test_bad_nats_urls_are_refused(url: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"site": "a", "state_dir": "/s", "bus": {"url": url}}, env={})
    assert info.value.lines()[0].startswith(f"bus.url: {message}")
    assert "secret" not in str(info.value)


# -- configs/agent.yaml documents every key -----------------------------------------------------------------------

_KEY = re.compile(r"^(?P<indent> *)(?:- +)?(?P<key>[A-Za-z_][A-Za-z0-9_-]*):(?:\s|$)")
# Commented keys are lower case, which tells them from prose ("# Accepted: every storage SOP class").
_COMMENTED_KEY = re.compile(r"^ *(?:- +)?[a-z_][a-z0-9_]*:(?:\s|$)")


def model_key_paths(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Every key the config model takes, as dotted paths; '*' stands for a mapping's own keys (models.*)."""
    out: set[str] = set()
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        out.add(path)
        for inner, wildcard in _nested_models(field.annotation):
            out |= model_key_paths(inner, f"{path}.*." if wildcard else f"{path}.")
    return out


def _nested_models(annotation: Any) -> list[tuple[type[BaseModel], bool]]:
    """The models inside a field's type: X, X | None, list[X] (no key of its own), dict[str, X] (a '*' key)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [(annotation, False)]
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is dict:
        return [(m, True) for m, _ in _nested_models(args[1])]
    if origin in (list, typing.Union, types.UnionType, typing.Annotated):
        return [found for arg in args for found in _nested_models(arg)]
    return []


def documented_key_paths(text: str) -> set[str]:
    """Dotted paths of every key in a YAML file, written or commented out (`# tls:` / `#   port: 2762`)."""
    paths: set[str] = set()
    stack: list[tuple[int, str]] = []
    for raw in text.splitlines():
        stripped = raw.lstrip(" ")
        if stripped.startswith("#"):
            # A commented key: '# ' stands where the key's indentation would be ('  # tls:' is a key at 2).
            body = stripped[1:]
            line = " " * (len(raw) - len(stripped)) + body[1:] if body.startswith(" ") else ""
            if not _COMMENTED_KEY.match(line):
                continue
        else:
            line = raw
        found = _KEY.match(line)
        if not found:
            continue
        column = len(found.group("indent")) + (line.index(found.group("key")) - len(found.group("indent")))
        while stack and stack[-1][0] >= column:
            stack.pop()
        path = ".".join([p for _, p in stack] + [found.group("key")])
        paths.add(path)
        stack.append((column, found.group("key")))
        # Flow mappings on the same line: `slices: {min: 1, max: 2000}`.
        value = line[found.end():].split(" #")[0].strip()
        if value.startswith("{"):
            try:
                flow = yaml.safe_load(value)
            except yaml.YAMLError:
                flow = None
            if isinstance(flow, dict):
                paths |= {f"{path}.{k}" for k in flow}
    return paths


def _documented(pattern: str, documented: set[str]) -> bool:
    want = pattern.split(".")
    return any(len(p.split(".")) == len(want) and all(w in ("*", g) for w, g in zip(want, p.split("."), strict=True))
               for p in documented)


def test_the_documentation_walk_finds_keys_and_commented_keys() -> None:
    text = ("a: 1\nb:\n  c: 2   # note: not a key\n  # d: 3\n  # e:\n  #   f: x\nlist:\n  - name: x\n"
            "    match:\n      slices: {min: 1, max: 2}\n# Prose: not a key\n")
    assert documented_key_paths(text) == {"a", "b", "b.c", "b.d", "b.e", "b.e.f", "list", "list.name",
                                          "list.match", "list.match.slices", "list.match.slices.min",
                                          "list.match.slices.max"}


def test_every_config_key_is_documented_in_the_default_config() -> None:
    documented = documented_key_paths(DEFAULT_CONFIG_PATH.read_text())
    missing = sorted(p for p in model_key_paths(AgentConfig) if not _documented(p, documented))
    assert missing == [], f"configs/agent.yaml does not show these keys (write them, or as '# key: value'): {missing}"


def test_an_operating_point_the_card_does_not_have_is_named_with_the_ones_it_has(tmp_path: Path) -> None:
    cfg = _write(tmp_path / "agent.yaml", {
        "site": "a", "state_dir": str(tmp_path / "state"), "model_repository": str(ENGINES),
        "models": {"cxr-nodule": {"operating_point": "screening"}},
        "routes": [{"name": "cxr", "model": "cxr-nodule"}],
    })
    assert _problems(cfg) == {"models.cxr-nodule.operating_point": "model cxr-nodule has no operating point "
                              "'screening' (its card has: high_specificity, triage)"}
    done = _check_config(cfg)
    assert done.returncode == 3 and "models.cxr-nodule.operating_point" in done.stderr + done.stdout
