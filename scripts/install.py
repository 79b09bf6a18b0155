#!/usr/bin/env python3
"""Install edge-agent on a box from this checkout, upgrade it in place, or remove it (README, "Install on a box").

    sudo scripts/install              install or upgrade, then enable and (re)start the service
    sudo scripts/uninstall            remove it; the state, the config and the user stay (it says so)
    scripts/install --root DIR        the same files under DIR, and nothing else: no user, no systemctl. For
                                      tests and packaging (the config is checked with the box's folders in DIR).

What goes where:
    /opt/edge-agent/venv              the code: a virtualenv with this checkout pip-installed (not editable)
    /opt/edge-agent/engines           the bundled models (replaced by each upgrade)
    /etc/edge-agent/agent.yaml        the config: configs/agent.yaml with the box's absolute paths
    /var/lib/edge-agent               the state: spool, journal, outbox, built plans (never touched here)
    /usr/lib/systemd/system/edge-agent.service, /usr/lib/sysusers.d/edge-agent.conf,
    /usr/lib/tmpfiles.d/edge-agent.conf, /usr/share/doc/edge-agent, /usr/local/bin/edge-agent

An upgrade builds the new virtualenv beside the old one, stops the service, swaps them, checks the config as the
service's user with the new code and starts it; a config the new code refuses puts the old version back, running.
A config changed locally is kept and the new default is written beside it as agent.yaml.new (like dpkg's
conffiles: a config still equal to the default the last install wrote is replaced by the new default).

Only the standard library, and Python 3.8 syntax: it runs with the system's python3 before any virtualenv exists,
and says so plainly when that python3 is too old for edge-agent.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent
SERVICE = "edge-agent"
USER = "edge-agent"

OPT = "/opt/edge-agent"
VENV = f"{OPT}/venv"
ENGINES = f"{OPT}/engines"
# The default config this install wrote: a config still equal to it was not changed locally.
INSTALLED_DEFAULT = f"{OPT}/agent.yaml.default"
ETC = "/etc/edge-agent"
CONFIG = f"{ETC}/agent.yaml"
CONFIG_NEW = f"{ETC}/agent.yaml.new"
STATE = "/var/lib/edge-agent"
UNIT = "/usr/lib/systemd/system/edge-agent.service"
DROP_INS = "/etc/systemd/system/edge-agent.service.d"
SYSUSERS = "/usr/lib/sysusers.d/edge-agent.conf"
TMPFILES = "/usr/lib/tmpfiles.d/edge-agent.conf"
DOC = "/usr/share/doc/edge-agent"
COMMAND = "/usr/local/bin/edge-agent"

MIN_PYTHON = (3, 11)
EXIT_CONFIG = 3  # as edge-agent's own: the config was refused


class InstallError(Exception):
    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Box:
    """Where the box's paths are: '/' for the running system, or a staging root."""

    root: Path
    live: bool

    def at(self, path: str) -> Path:
        return self.root / path.lstrip("/")


def say(message: str = "") -> None:
    print(message, flush=True)


def run(cmd: list[str], what: str, cwd: str | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise InstallError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{detail}")
    return proc


def systemd_running() -> bool:
    return Path("/run/systemd/system").is_dir()  # sd_booted(3)


def checkout_version() -> str:
    found = re.search(r'^version = "([^"]+)"', (CHECKOUT / "pyproject.toml").read_text(), re.MULTILINE)
    if not found:
        raise InstallError(f"no version in {CHECKOUT / 'pyproject.toml'}")
    return found.group(1)


# -- the default config for a box ---------------------------------------------------------------------------------


def box_config(text: str) -> str:
    """configs/agent.yaml with the box's absolute paths (its own are relative to the checkout)."""
    for key, value in (("state_dir", STATE), ("model_repository", ENGINES)):
        text, count = re.subn(rf"^{key}:.*$", f"{key}: {value}", text, flags=re.MULTILINE)
        if count != 1:
            raise InstallError(f"configs/agent.yaml has {count} top-level '{key}:' lines, not one")
    header = (
        "# Installed by scripts/install from configs/agent.yaml, with the box's paths. Edit it freely: an upgrade\n"
        "# keeps a changed file and writes its new default beside it as agent.yaml.new.\n"
    )
    return header + text


def config_action(current: bytes | None, installed_default: bytes | None, new_default: bytes) -> str:
    """What an install does with /etc/edge-agent/agent.yaml: new, replaced, unchanged or kept (changed locally)."""
    if current is None:
        return "new"
    if current == new_default:
        return "unchanged"
    if installed_default is not None and current == installed_default:
        return "replaced"
    return "kept"


# -- files ----------------------------------------------------------------------------------------------------------


def write_file(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` atomically (a reader sees the old or the new file, never half of one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove(path: Path) -> bool:
    if path.is_symlink() or path.is_file():
        path.unlink()
        return True
    if path.is_dir():
        shutil.rmtree(path)
        return True
    return False


def read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


# -- the virtualenv -------------------------------------------------------------------------------------------------


def check_python(python: str) -> str:
    proc = subprocess.run([python, "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise InstallError(f"cannot run {python}: {proc.stderr.strip()}")
    version = proc.stdout.strip()
    if tuple(int(x) for x in version.split(".")[:2]) < MIN_PYTHON:
        raise InstallError(f"edge-agent needs Python {'.'.join(map(str, MIN_PYTHON))} or later; {python} is {version}")
    return version


def build_venv(box: Box, python: str, deps_from: Path | None) -> Path:
    """A virtualenv with this checkout installed, at /opt/edge-agent/venv.new (swapped in later)."""
    target = box.at(VENV + ".new")
    remove(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Tests (--deps-from): the dependencies, and pip, are those of an existing virtualenv of the same Python (one
    # .pth line), so only edge-agent itself is built and installed (the build still takes setuptools from the index).
    without_pip = ["--without-pip"] if deps_from is not None else []
    venv = subprocess.run([python, "-m", "venv", *without_pip, str(target)], capture_output=True, text=True)
    if venv.returncode != 0:
        raise InstallError(f"{python} -m venv failed (on Debian: apt-get install python3-venv):\n{venv.stderr.strip()}")
    py = str(target / "bin" / "python")
    pip = [py, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-compile"]
    if deps_from is not None:
        paths = run([str(deps_from / "bin" / "python"), "-c",
                     "import sysconfig; print(sysconfig.get_path('purelib')); print(sysconfig.get_path('platlib'))"],
                    "reading --deps-from").stdout.split()
        site = run([py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], "reading the venv").stdout
        (Path(site.strip()) / "edge-agent-deps.pth").write_text("".join(f"{p}\n" for p in dict.fromkeys(paths)))
        pip = [str(deps_from / "bin" / "python"), "-m", "pip", "--python", py, *pip[3:], "--no-deps"]
    with tempfile.TemporaryDirectory(prefix="edge-agent-src-") as tmp:
        # A copy: the build writes build/ and *.egg-info next to the sources, and the checkout is not ours to dirty.
        src = Path(tmp) / "src"
        src.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(CHECKOUT / name, src / name)
        shutil.copytree(CHECKOUT / "edge_agent", src / "edge_agent",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        proc = subprocess.run([*pip, str(src)], capture_output=True, text=True, cwd=tmp)
    if proc.returncode != 0:
        remove(target)
        raise InstallError("pip install of edge-agent failed (it needs the package index, or a mirror set in "
                           f"/etc/pip.conf):\n{proc.stderr.strip()[-3000:]}")
    return target


def settle_venv(box: Box, built: Path) -> None:
    """Make the venv built at venv.new right for /opt/edge-agent/venv: script shebangs, compiled modules.

    A virtualenv run as venv/bin/python finds itself wherever it is; only its scripts name a path (the one pip
    installed them at), and the compiled modules name their source file in tracebacks.
    """
    final = box.at(VENV)
    for script in (final / "bin").iterdir():
        if script.is_symlink() or not script.is_file():
            continue
        data = script.read_bytes()
        if str(built).encode() in data:
            mode = script.stat().st_mode & 0o7777
            write_file(script, data.replace(str(built).encode(), VENV.encode()), mode)
    # Compiled now, with the paths of the box: under ProtectSystem=strict the service could not write them.
    run([str(final / "bin" / "python"), "-m", "compileall", "-q", "-j", "0", "-s", str(final), "-p", VENV,
         str(final / "lib")], "compiling the venv", cwd="/")


def stage_engines(box: Box) -> tuple[Path, list[str]]:
    """The bundled models (each engines/<model> with a card; not the training recipes) at engines.new."""
    target = box.at(ENGINES + ".new")
    remove(target)
    target.mkdir(parents=True)
    names = []
    for model in sorted((CHECKOUT / "engines").iterdir()):
        if (model / "model.yaml").is_file():
            shutil.copytree(model, target / model.name,
                            ignore=shutil.ignore_patterns("recipe", "__pycache__", "*.pyc"))
            names.append(model.name)
    return target, names


def swap(new: Path, current: Path) -> Path | None:
    """Put ``new`` where ``current`` is; the previous one is kept at <current>.old (returned) until committed."""
    old = current.with_name(current.name + ".old")
    remove(old)
    if current.exists():
        current.rename(old)
    new.rename(current)
    return old if old.exists() else None


def restore(current: Path, old: Path | None) -> None:
    remove(current)
    if old is not None:
        old.rename(current)


# -- the system: user, state folder, systemd ----------------------------------------------------------------------


def user_exists() -> bool:
    return subprocess.run(["getent", "passwd", USER], capture_output=True).returncode == 0


def ensure_user_and_state(box: Box) -> None:
    if not box.live:
        box.at(STATE).mkdir(mode=0o750, parents=True, exist_ok=True)
        return
    # From the checkout's files: the installed copies are written once the new code has passed its check.
    if shutil.which("systemd-sysusers"):
        run(["systemd-sysusers", str(CHECKOUT / "systemd" / "edge-agent.sysusers.conf")], "creating the user")
    elif not user_exists():
        run(["useradd", "--system", "--user-group", "--home-dir", STATE, "--no-create-home",
             "--shell", "/usr/sbin/nologin", USER], "creating the user")
    if shutil.which("systemd-tmpfiles"):
        run(["systemd-tmpfiles", "--create", str(CHECKOUT / "systemd" / "edge-agent.tmpfiles.conf")],
            "creating the state folder")
    else:
        box.at(STATE).mkdir(mode=0o750, parents=True, exist_ok=True)
        shutil.chown(box.at(STATE), USER, USER)


def service_active() -> bool:
    return subprocess.run(["systemctl", "is-active", "--quiet", SERVICE]).returncode == 0


def under_root(config_text: str, root: Path) -> str:
    """A box config read under a staging root: the box's own folders (/opt/edge-agent, /etc/edge-agent,
    /var/lib/edge-agent) taken inside ``root``; every other path stays as written."""
    pattern = r"(?<![\w/.-])(" + "|".join(re.escape(p) for p in (OPT, ETC, STATE)) + r")(?=[/\s'\"]|$)"
    return re.sub(pattern, lambda m: str(root) + m.group(1), config_text, flags=re.MULTILINE)


def check_config(box: Box) -> str:
    """`edge-agent check-config` of the installed config with the installed code: on a box as the service's user,
    under --root as this user with the box's folders taken inside the root (under_root)."""
    code = [str(box.at(VENV) / "bin" / "python"), str(box.at(VENV) / "bin" / "edge-agent"), "check-config"]
    if box.live:
        proc = subprocess.run(["runuser", "-u", USER, "--", *code, CONFIG], capture_output=True, text=True, cwd="/")
    else:
        # Beside the real one: relative paths in it are relative to its folder.
        fd, mapped = tempfile.mkstemp(dir=box.at(ETC), prefix=".agent.yaml.check.")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(under_root(box.at(CONFIG).read_text(), box.root))
            proc = subprocess.run([*code, mapped], capture_output=True, text=True, cwd="/")
        finally:
            os.unlink(mapped)
        proc.stdout, proc.stderr = (proc.stdout.replace(mapped, CONFIG), proc.stderr.replace(mapped, CONFIG))
    if proc.returncode != 0:
        raise InstallError((proc.stderr or proc.stdout).strip(), code=proc.returncode)
    return proc.stdout.strip()


def journal_tail() -> str:
    proc = subprocess.run(["journalctl", "-u", SERVICE, "-n", "30", "--no-pager"], capture_output=True, text=True)
    return proc.stdout.strip()


# -- install ----------------------------------------------------------------------------------------------------------


def install(box: Box, python: str, deps_from: Path | None, start: bool) -> int:
    version = checkout_version()
    python_version = check_python(python)
    upgrade = box.at(VENV).exists()
    where = "" if box.live else f" under {box.root}"
    say(f"{'upgrading' if upgrade else 'installing'} edge-agent {version}{where}")

    built = build_venv(box, python, deps_from)
    say(f"  built the virtualenv with Python {python_version}")
    engines, models = stage_engines(box)
    ensure_user_and_state(box)

    new_default = box_config((CHECKOUT / "configs" / "agent.yaml").read_text()).encode()
    config_before = read_or_none(box.at(CONFIG))
    config_new_before = read_or_none(box.at(CONFIG_NEW))
    action = config_action(config_before, read_or_none(box.at(INSTALLED_DEFAULT)), new_default)

    use_systemd = box.live and systemd_running()
    was_active = use_systemd and service_active()
    if was_active:
        say("  stopping edge-agent for the upgrade")
        run(["systemctl", "stop", SERVICE], "stopping the service")
    old_venv = swap(built, box.at(VENV))
    old_engines = swap(engines, box.at(ENGINES))
    settle_venv(box, built)
    if action in ("new", "replaced"):
        write_config(box, CONFIG, new_default)
    if action == "kept":
        write_config(box, CONFIG_NEW, new_default)
    else:
        remove(box.at(CONFIG_NEW))

    try:
        checked = check_config(box)
    except InstallError as exc:
        if old_venv is None:
            install_system_files(box)
            then = f", then run `systemctl enable --now {SERVICE}`" if box.live else ""
            raise InstallError(f"{exc}\nedge-agent is installed but not started: its config check failed (above); "
                               f"fix that{then}", code=exc.code) from None
        # The new code refuses the config the old one ran with: put the old version back, as it was.
        restore(box.at(VENV), old_venv)
        restore(box.at(ENGINES), old_engines)
        if config_before is not None and action == "replaced":
            write_config(box, CONFIG, config_before)
        if config_new_before is not None:
            write_config(box, CONFIG_NEW, config_new_before)
        else:
            remove(box.at(CONFIG_NEW))
        if was_active:
            run(["systemctl", "start", SERVICE], "starting the previous version again")
        raise InstallError(f"{exc}\nupgrade stopped: edge-agent {version} refuses {CONFIG}; the previous "
                           f"version is back{' and running' if was_active else ''}", code=exc.code) from None
    for old in (old_venv, old_engines):
        if old is not None:
            remove(old)
    write_file(box.at(INSTALLED_DEFAULT), new_default, 0o644)
    install_system_files(box)

    service = "not enabled: with --root nothing of the running system is touched"
    if box.live and not use_systemd:
        service = (f"not started: systemd is not running here; on a box: systemctl enable --now {SERVICE} "
                   f"(or run `runuser -u {USER} -- {COMMAND} serve --config {CONFIG}`)")
    elif use_systemd:
        run(["systemctl", "daemon-reload"], "systemctl daemon-reload")
        run(["systemctl", "enable", "--quiet", SERVICE], "enabling the service")
        service = "enabled, not started (--no-start)"
        if start:
            proc = subprocess.run(["systemctl", "restart" if was_active else "start", SERVICE],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise InstallError(f"edge-agent did not start:\n{proc.stderr.strip()}\n{journal_tail()}")
            service = "enabled, restarted" if was_active else "enabled, started"

    config_line = {
        "new": f"{CONFIG} (new)",
        "replaced": f"{CONFIG} (the new default: the previous default had not been changed)",
        "unchanged": f"{CONFIG} (unchanged)",
        "kept": f"{CONFIG} (kept: changed locally; the new default is {CONFIG_NEW}: "
                f"diff {CONFIG} {CONFIG_NEW})",
    }[action]
    say(f"edge-agent {version} {'upgraded' if upgrade else 'installed'}{where}:")
    say(f"  code      {VENV}  (command: {COMMAND})")
    say(f"  models    {ENGINES}: {', '.join(models)}")
    say(f"  config    {config_line}")
    say(f"  check     {checked}")
    say(f"  state     {STATE}{' (kept as it was: spool, journal, outbox)' if upgrade else ''}")
    say(f"  unit      {UNIT}, with {Path(SYSUSERS).parent}/ and {Path(TMPFILES).parent}/ files")
    say(f"  service   {service}")
    return 0


def install_system_files(box: Box) -> None:
    """The unit, sysusers and tmpfiles files, the docs and the command: only once the new code is in place (a
    refused upgrade leaves the previous ones)."""
    for source, dest in ((CHECKOUT / "systemd" / "edge-agent.service", UNIT),
                         (CHECKOUT / "systemd" / "edge-agent.sysusers.conf", SYSUSERS),
                         (CHECKOUT / "systemd" / "edge-agent.tmpfiles.conf", TMPFILES)):
        write_file(box.at(dest), source.read_bytes(), 0o644)
    remove(box.at(DOC))
    write_file(box.at(DOC) / "README.md", (CHECKOUT / "README.md").read_bytes(), 0o644)
    for doc in sorted((CHECKOUT / "docs").glob("*.md")):
        write_file(box.at(DOC) / "docs" / doc.name, doc.read_bytes(), 0o644)
    command = box.at(COMMAND)
    command.parent.mkdir(parents=True, exist_ok=True)
    remove(command)
    command.symlink_to(f"{VENV}/bin/edge-agent")


def write_config(box: Box, path: str, data: bytes) -> None:
    # 0640 root:edge-agent: the daemon reads it, no one else; secrets stay in agent.env (0600, read by systemd).
    box.at(ETC).mkdir(mode=0o755, parents=True, exist_ok=True)
    write_file(box.at(path), data, 0o640)
    if box.live:
        shutil.chown(box.at(path), "root", USER)


# -- uninstall --------------------------------------------------------------------------------------------------------


def describe_state(state: Path) -> str:
    parts = []
    for entry in sorted(state.iterdir()):
        if entry.is_dir():
            files = sum(1 for p in entry.rglob("*") if p.is_file())
            parts.append(f"{entry.name}/ ({files} file{'' if files == 1 else 's'})")
        else:
            parts.append(entry.name)
    waiting = outbox_waiting(state / "journal.sqlite3")
    if waiting is not None:
        parts.append(f"{waiting} findings in the outbox not acknowledged by the broker")
    return ", ".join(parts) or "empty"


def outbox_waiting(journal: Path) -> int | None:
    """Findings the journal holds that the broker has not acknowledged; None if it cannot be read.

    Read from a copy: opening the journal itself, even read-only, would leave -wal/-shm files in the state that an
    uninstall promises to leave as it was.
    """
    if not journal.is_file():
        return None
    with tempfile.TemporaryDirectory(prefix="edge-agent-journal-") as tmp:
        for suffix in ("", "-wal"):
            if Path(f"{journal}{suffix}").is_file():
                shutil.copy2(f"{journal}{suffix}", f"{tmp}/journal.sqlite3{suffix}")
        try:
            db = sqlite3.connect(f"{tmp}/journal.sqlite3")
            try:
                (waiting,) = db.execute("SELECT count(*) FROM outbox WHERE state != 'acked'").fetchone()
            finally:
                db.close()
        except sqlite3.Error:
            return None
    return int(waiting)


def uninstall(box: Box) -> int:
    where = "" if box.live else f" under {box.root}"
    use_systemd = box.live and systemd_running()
    if use_systemd and box.at(UNIT).exists():
        run(["systemctl", "disable", "--now", "--quiet", SERVICE], "stopping and disabling the service")
    removed = []
    command = box.at(COMMAND)
    if command.is_symlink() and os.readlink(command) == f"{VENV}/bin/edge-agent":
        command.unlink()
        removed.append(COMMAND)
    for path in (UNIT, SYSUSERS, TMPFILES, DOC, OPT):
        if remove(box.at(path)):
            removed.append(path)
    if use_systemd:
        run(["systemctl", "daemon-reload"], "systemctl daemon-reload")
    say(f"edge-agent uninstalled{where}." if removed else f"edge-agent is not installed{where}: nothing to remove.")
    for path in removed:
        say(f"  removed   {path}")
    left = []
    if box.at(STATE).is_dir():
        left.append((STATE, f"the state: {describe_state(box.at(STATE))}"))
    if box.at(ETC).is_dir():
        names = ", ".join(sorted(p.name for p in box.at(ETC).iterdir())) or "empty"
        left.append((ETC, f"the config: {names}"))
    if box.at(DROP_INS).is_dir():
        left.append((DROP_INS, "your drop-ins for the unit (systemctl edit)"))
    if box.live and user_exists():
        left.append((f"user {USER}", f"the service's user (owns {STATE})"))
    if left:
        say("left in place (an install later picks them up again):")
        for what, why in left:
            say(f"  {what:<22}{why}")
        paths = " ".join(box.at(p).as_posix() for p, _ in left if p.startswith("/"))
        say(f"to remove them too: rm -rf {paths}" + (f" && userdel {USER}" if box.live and user_exists() else ""))
    return 0


# -- command line -----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/install", description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=None, metavar="DIR",
                   help="install under this folder instead of /, touching nothing of the running system")
    p.add_argument("--uninstall", action="store_true", help="remove edge-agent; state, config and user stay")
    p.add_argument("--python", default="python3", help="the Python that makes the virtualenv (default: python3)")
    p.add_argument("--deps-from", type=Path, default=None, metavar="VENV",
                   help="take the dependencies from this virtualenv of the same Python instead of the package index "
                        "(tests: only edge-agent itself is installed)")
    p.add_argument("--no-start", action="store_true", help="enable the service but do not start it")
    args = p.parse_args(argv)
    if args.root is not None and args.root.resolve() == Path("/"):
        p.error("--root / is the running system: leave --root out")
    box = Box(args.root.resolve(), live=False) if args.root is not None else Box(Path("/"), live=True)
    if box.live and os.geteuid() != 0:
        print("scripts/install changes the system: run it as root (sudo scripts/install), or use --root DIR",
              file=sys.stderr)
        return 1
    try:
        if args.uninstall:
            return uninstall(box)
        return install(box, args.python, args.deps_from.resolve() if args.deps_from else None, not args.no_start)
    except InstallError as exc:
        print(f"scripts/install: {exc}", file=sys.stderr)
        return exc.code


if __name__ == "__main__":
    sys.exit(main())
