"""scripts/install on a staging root (issue 10): the box's layout, the installed unit checked by systemd, the
installed `check-config` and `serve` against the installed paths, an upgrade that keeps the state and a changed
config (and puts the old version back when the new one refuses the config), an uninstall that says what it leaves.

The installs use `--deps-from` this test virtualenv: the installed virtualenv takes its dependencies from it (one
.pth line) and only edge-agent itself is built from the checkout (with setuptools from the package index, as
`scripts/setup` does), so an install takes seconds and needs no download of onnxruntime & co. One install serves
the whole module; the tests that change an install work on a copy of it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from edge_agent.journal import Journal
from tests.daemon import Daemon
from tests.natsutil import NatsServer
from tests.netutil import free_port

REPO = Path(__file__).resolve().parent.parent
INSTALL = REPO / "scripts" / "install"
UNINSTALL = REPO / "scripts" / "uninstall"
INSTALL_TIMEOUT_SECONDS = 240


def _installer() -> ModuleType:
    spec = importlib.util.spec_from_file_location("edge_agent_install_script", REPO / "scripts" / "install.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


installer = _installer()


def run_install(root: Path, *args: str, script: Path = INSTALL) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(script), "--root", str(root), "--python", sys.executable, "--deps-from", sys.prefix, *args],
        capture_output=True, text=True, timeout=INSTALL_TIMEOUT_SECONDS,
    )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """A fresh install under a staging root, and what the installer printed."""
    root = tmp_path_factory.mktemp("box")
    result = run_install(root)
    assert result.returncode == 0, result.stderr
    yield root, result.stdout


@pytest.fixture
def box_copy(installed: tuple[Path, str], tmp_path: Path) -> Path:
    """A copy of the installed root, for a test that changes it (the venv works wherever it is)."""
    copy = tmp_path / "box"
    shutil.copytree(installed[0], copy, symlinks=True)
    return copy


def installed_edge_agent(root: Path) -> tuple[str, ...]:
    """The installed command: its scripts name /opt/edge-agent/venv/bin/python (the box's), so run it by hand."""
    venv = root / "opt" / "edge-agent" / "venv" / "bin"
    return (str(venv / "python"), str(venv / "edge-agent"))


def test_install_lays_out_the_box(installed: tuple[Path, str]) -> None:
    root, out = installed
    lines = out.splitlines()
    assert lines[0] == f"installing edge-agent {installer.checkout_version()} under {root}"
    assert "  config    /etc/edge-agent/agent.yaml (new)" in lines
    assert "  models    /opt/edge-agent/engines: ct-demo, cxr-demo, cxr-nodule" in lines
    assert "  check     /etc/edge-agent/agent.yaml: OK (site local, 2 routes, models: cxr-nodule, ct-demo)" in lines
    assert "  service   not enabled: with --root nothing of the running system is touched" in lines

    venv = root / "opt" / "edge-agent" / "venv"
    assert (venv / "bin" / "edge-agent").read_text().splitlines()[0] == "#!/opt/edge-agent/venv/bin/python"
    assert os.readlink(root / "usr" / "local" / "bin" / "edge-agent") == "/opt/edge-agent/venv/bin/edge-agent"
    assert not (root / "opt" / "edge-agent" / "venv.new").exists()
    # Installed, not linked to this checkout: the module comes from the venv's site-packages.
    where = subprocess.run([installed_edge_agent(root)[0], "-c", "import edge_agent; print(edge_agent.__file__)"],
                           capture_output=True, text=True, timeout=60, cwd="/", check=True).stdout.strip()
    assert where.startswith(f"{venv}/lib/") and "site-packages/edge_agent/" in where
    assert not list(venv.rglob("*.egg-link")) and not list(venv.rglob("__editable__*"))
    # Installed, the commands' default config is the box's (from a checkout it is configs/agent.yaml).
    default = subprocess.run([*installed_edge_agent(root), "check-config"], capture_output=True, text=True,
                             timeout=60, cwd="/")
    assert (default.stdout + default.stderr).startswith("/etc/edge-agent/agent.yaml: ")

    engines = root / "opt" / "edge-agent" / "engines"
    assert sorted(p.name for p in engines.iterdir()) == ["ct-demo", "cxr-demo", "cxr-nodule"]
    assert (engines / "cxr-nodule" / "model.onnx").read_bytes() == (REPO / "engines/cxr-nodule/model.onnx").read_bytes()
    assert not (engines / "cxr-nodule" / "recipe").exists()  # the training code stays in the checkout

    config_path = root / "etc" / "edge-agent" / "agent.yaml"
    assert config_path.stat().st_mode & 0o777 == 0o640
    config = yaml.safe_load(config_path.read_text())
    assert (config["state_dir"], config["model_repository"]) == ("/var/lib/edge-agent", "/opt/edge-agent/engines")
    assert config["routes"] == yaml.safe_load((REPO / "configs" / "agent.yaml").read_text())["routes"]
    assert (root / "var" / "lib" / "edge-agent").is_dir()

    for source, dest in (("edge-agent.service", "usr/lib/systemd/system/edge-agent.service"),
                         ("edge-agent.sysusers.conf", "usr/lib/sysusers.d/edge-agent.conf"),
                         ("edge-agent.tmpfiles.conf", "usr/lib/tmpfiles.d/edge-agent.conf")):
        assert (root / dest).read_bytes() == (REPO / "systemd" / source).read_bytes()


def test_the_installed_unit_passes_systemd_analyze_verify(installed: tuple[Path, str], tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (Debian package 'systemd')")
    root = installed[0]
    text = (root / "usr/lib/systemd/system/edge-agent.service").read_text()
    # What the unit names is there: the command it runs and the documentation it points at.
    assert "ExecStart=/opt/edge-agent/venv/bin/edge-agent serve --config /etc/edge-agent/agent.yaml" in text
    docs = [line.partition("=")[2] for line in text.splitlines() if line.startswith("Documentation=")]
    assert docs == ["file:///usr/share/doc/edge-agent/README.md"]
    assert (root / docs[0].removeprefix("file:///")).read_bytes() == (REPO / "README.md").read_bytes()
    # verify checks ExecStart's binary on this machine: point it into the staging root.
    unit = tmp_path / "edge-agent.service"
    unit.write_text(text.replace("ExecStart=/opt/edge-agent/", f"ExecStart={root}/opt/edge-agent/"))
    proc = subprocess.run([tool, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr


def test_the_installed_check_config_and_serve_run_on_the_installed_paths(
    installed: tuple[Path, str], tmp_path: Path
) -> None:
    root = installed[0]
    command = installed_edge_agent(root)
    nats = NatsServer(tmp_path / "nats")
    nats.start()
    try:
        # The installed config with the box's folders inside the root, on free ports and this broker.
        raw = yaml.safe_load(installer.under_root((root / "etc/edge-agent/agent.yaml").read_text(), root))
        assert raw["state_dir"] == f"{root}/var/lib/edge-agent"
        raw["dicom"]["port"], raw["http"]["port"], raw["bus"]["url"] = free_port(), free_port(), nats.url
        config = root / "etc" / "edge-agent" / "test-agent.yaml"
        config.write_text(yaml.safe_dump(raw))
        check = subprocess.run([*command, "check-config", str(config)], capture_output=True, text=True, timeout=60,
                               cwd="/")
        assert check.returncode == 0, check.stderr
        assert check.stdout.strip() == f"{config}: OK (site local, 2 routes, models: cxr-nodule, ct-demo)"

        d = Daemon(config, tmp_path, command=command)
        try:
            d.start()
            assert d.http("/readyz")[0] == 200
            assert d.terminate() == 0, d.log()
        finally:
            if d.proc is not None and d.proc.poll() is None:
                d.kill9()
            d.close()
        assert (root / "var" / "lib" / "edge-agent" / "journal.sqlite3").is_file()

        # The installed serve refuses a bad config with exit 3 naming the key, before anything starts.
        raw["dicom"]["host"] = "127.0.0.1.5"
        config.write_text(yaml.safe_dump(raw))
        bad = subprocess.run([*command, "serve", "--config", str(config)], capture_output=True, text=True,
                             timeout=60, cwd="/")
        assert bad.returncode == 3, bad.stderr
        assert "dicom.host: '127.0.0.1.5' is neither an IP address nor a host name" in bad.stderr
        assert "Traceback" not in bad.stderr
    finally:
        nats.stop()
        (root / "etc" / "edge-agent" / "test-agent.yaml").unlink(missing_ok=True)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.timeout(2 * INSTALL_TIMEOUT_SECONDS)
def test_upgrade_keeps_state_and_a_changed_config_and_uninstall_says_what_it_leaves(box_copy: Path) -> None:
    root = box_copy
    state = root / "var" / "lib" / "edge-agent"
    etc = root / "etc" / "edge-agent"
    venv = root / "opt" / "edge-agent" / "venv"
    # The state a running box has: a journal with its outbox, a spool file (and nothing a test before left).
    shutil.rmtree(state)
    state.mkdir()
    journal = Journal(state / "journal.sqlite3")
    journal.close()
    spool_file = state / "spool" / "instances" / "ab" / "0123456789abcdef.dcm"
    spool_file.parent.mkdir(parents=True)
    spool_file.write_bytes(os.urandom(4096))
    state_before = {p: _digest(p) for p in state.rglob("*") if p.is_file()}
    config = etc / "agent.yaml"
    default = config.read_text()

    # 1. A config the new version refuses: the upgrade stops and the previous version is back, as it was.
    config.write_text(default.replace("site: local", "site: ward 3"))
    (venv / "previous").write_text("")
    refused = run_install(root)
    assert refused.returncode == 3, refused.stdout + refused.stderr
    assert "site: 'ward 3' must be one NATS subject token" in refused.stderr
    assert "upgrade stopped: edge-agent" in refused.stderr and "the previous version is back" in refused.stderr
    assert (venv / "previous").exists()
    assert sorted(p.name for p in venv.parent.iterdir()) == ["agent.yaml.default", "engines", "venv"]
    assert sorted(p.name for p in etc.iterdir()) == ["agent.yaml"]

    # 2. A config changed locally, and valid: kept; the new default goes beside it.
    changed = default.replace("site: local", "site: ward-3") + "# changed on this box\n"
    config.write_text(changed)
    upgraded = run_install(root)
    assert upgraded.returncode == 0, upgraded.stderr
    out = upgraded.stdout.splitlines()
    assert out[0].startswith("upgrading edge-agent")
    assert ("  config    /etc/edge-agent/agent.yaml (kept: changed locally; the new default is "
            "/etc/edge-agent/agent.yaml.new: diff /etc/edge-agent/agent.yaml /etc/edge-agent/agent.yaml.new)") in out
    assert "  check     /etc/edge-agent/agent.yaml: OK (site ward-3, 2 routes, models: cxr-nodule, ct-demo)" in out
    assert "  state     /var/lib/edge-agent (kept as it was: spool, journal, outbox)" in out
    assert config.read_text() == changed
    assert (etc / "agent.yaml.new").read_bytes() == (venv.parent / "agent.yaml.default").read_bytes()
    assert not (venv / "previous").exists()  # a new virtualenv
    assert sorted(p.name for p in venv.parent.iterdir()) == ["agent.yaml.default", "engines", "venv"]
    assert {p: _digest(p) for p in state.rglob("*") if p.is_file()} == state_before

    # 3. Uninstall: everything but the state and the config goes, and it says so.
    removed = subprocess.run([str(UNINSTALL), "--root", str(root)], capture_output=True, text=True, timeout=60)
    assert removed.returncode == 0, removed.stderr
    assert removed.stdout.splitlines() == [
        f"edge-agent uninstalled under {root}.",
        "  removed   /usr/local/bin/edge-agent",
        "  removed   /usr/lib/systemd/system/edge-agent.service",
        "  removed   /usr/lib/sysusers.d/edge-agent.conf",
        "  removed   /usr/lib/tmpfiles.d/edge-agent.conf",
        "  removed   /usr/share/doc/edge-agent",
        "  removed   /opt/edge-agent",
        "left in place (an install later picks them up again):",
        "  /var/lib/edge-agent   the state: journal.sqlite3, spool/ (1 file), "
        "0 findings in the outbox not acknowledged by the broker",
        "  /etc/edge-agent       the config: agent.yaml, agent.yaml.new",
        f"to remove them too: rm -rf {state} {etc}",
    ]
    assert not (root / "opt" / "edge-agent").exists()
    assert {p: _digest(p) for p in state.rglob("*") if p.is_file()} == state_before
    assert config.read_text() == changed


def test_the_config_is_replaced_only_when_it_is_the_default_the_last_install_wrote() -> None:
    action = installer.config_action
    assert action(None, None, b"new") == "new"
    assert action(b"new", b"old", b"new") == "unchanged"
    assert action(b"old", b"old", b"new") == "replaced"
    assert action(b"mine", b"old", b"new") == "kept"
    assert action(b"old", None, b"new") == "kept"  # no record of what was installed: never overwrite


def test_the_box_config_and_the_root_mapping() -> None:
    box = installer.box_config((REPO / "configs" / "agent.yaml").read_text())
    raw = yaml.safe_load(box)
    assert (raw["state_dir"], raw["model_repository"]) == ("/var/lib/edge-agent", "/opt/edge-agent/engines")
    with pytest.raises(installer.InstallError, match="0 top-level 'state_dir:' lines"):
        installer.box_config("site: a\n")
    text = ("state_dir: /var/lib/edge-agent\nmodel_repository: '/opt/edge-agent/engines'\n"
            "key_file: /etc/edge-agent/privacy.key\nother: /srv/opt/edge-agent/x\nmore: /opt/edge-agent-old\n")
    assert installer.under_root(text, Path("/r")) == (
        "state_dir: /r/var/lib/edge-agent\nmodel_repository: '/r/opt/edge-agent/engines'\n"
        "key_file: /r/etc/edge-agent/privacy.key\nother: /srv/opt/edge-agent/x\nmore: /opt/edge-agent-old\n")


def test_the_installer_refuses_to_touch_the_running_system_unless_root() -> None:
    if os.geteuid() == 0:
        result = subprocess.run([str(INSTALL), "--root", "/"], capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and "--root / is the running system" in result.stderr
        return
    result = subprocess.run([str(INSTALL)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "run it as root (sudo scripts/install)" in result.stderr
