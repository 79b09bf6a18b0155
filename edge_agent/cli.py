"""The command line: serve, check-config, send, tail."""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from edge_agent import __version__
from edge_agent.config import DEFAULT_CONFIG_PATH, AgentConfig, check_models, load_config
from edge_agent.errors import ConfigError, EdgeAgentError, ModelError

logger = logging.getLogger(__name__)

# Exit codes. systemd's unit has RestartPreventExitStatus=3: a bad config is not retried.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-agent", description="DICOM triage inference daemon")
    p.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the daemon")
    s.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH, help="YAML config (default: %(default)s)")

    c = sub.add_parser("check-config", help="validate a config file and the models it names; exit 3 if invalid")
    c.add_argument("file", type=Path, nargs="?", default=DEFAULT_CONFIG_PATH)

    snd = sub.add_parser("send", help="send DICOM files or folders to a DICOM SCP (C-STORE)")
    snd.add_argument("paths", type=Path, nargs="+")
    snd.add_argument("--host", default="127.0.0.1")
    snd.add_argument("--port", type=int, default=11112)
    snd.add_argument("--called-aet", default="EDGE_AGENT")
    snd.add_argument("--calling-aet", default="EDGE_SEND")

    t = sub.add_parser("tail", help="print findings from the JetStream stream as they arrive (one JSON per line)")
    t.add_argument("--url", default=None, help="NATS URL (default: bus.url of --config)")
    t.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH)
    t.add_argument("--subject", default=None, help="subject filter (default: <subject_prefix>.>)")
    t.add_argument("--all", action="store_true", help="start from the first finding in the stream, not the next")
    t.add_argument("--count", type=int, default=None, help="exit after this many findings")
    t.add_argument("--timeout", type=float, default=None, help="exit after this many seconds")
    return p


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # pynetdicom logs every PDU at INFO, including peer AE titles: keep it to warnings.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def _load_checked(path: Path) -> AgentConfig:
    from edge_agent.inference.card import list_models, load_card

    config = load_config(path)
    available = list_models(config.model_repository)
    check_models(config, available)
    problems = []
    for name in config.model_names():
        try:
            load_card(config.model_repository / name)
        except ModelError as exc:
            problems.append((f"models.{name}", str(exc)))
    if problems:
        raise ConfigError(problems, str(path))
    return config


def _load_or_report(path: Path) -> AgentConfig | None:
    """The checked config, or None after printing every problem with its field path."""
    try:
        return _load_checked(path)
    except ConfigError as exc:
        print(f"{path}: invalid configuration", file=sys.stderr)
        for line in exc.lines():
            print(f"  {line}", file=sys.stderr)
        return None


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load_or_report(args.file)
    if config is None:
        return EXIT_CONFIG
    print(
        f"{args.file}: OK (site {config.site}, {len(config.routes)} routes, models: "
        f"{', '.join(config.model_names()) or 'none'})"
    )
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    from edge_agent.agent import Agent

    config = _load_or_report(args.config)
    if config is None:
        return EXIT_CONFIG
    _setup_logging(config.logging.level)
    # `kill -USR1 <pid>` prints every thread's stack to stderr (the journal): the first thing to ask
    # of a daemon that looks stuck.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        asyncio.run(Agent(config).run())
    except EdgeAgentError as exc:
        logger.error("edge-agent stopped: %s", exc)
        return EXIT_FAILURE
    return EXIT_OK


def cmd_send(args: argparse.Namespace) -> int:
    from edge_agent.dicom.sender import send_files

    _setup_logging("WARNING")
    try:
        report = send_files(list(args.paths), args.host, args.port, args.called_aet, args.calling_aet)
    except EdgeAgentError as exc:
        print(f"send failed: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(report.summary() if hasattr(report, "summary") else report)
    return EXIT_OK if report.failed == 0 else EXIT_FAILURE


def cmd_tail(args: argparse.Namespace) -> int:
    from edge_agent.bus.tail import tail

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_CONFIG
    url = args.url or config.bus.url
    subject = args.subject or f"{config.bus.subject_prefix}.>"
    try:
        asyncio.run(
            tail(
                url,
                config.bus.stream,
                subject,
                from_start=args.all,
                max_messages=args.count,
                timeout_seconds=args.timeout,
                token=config.bus.token,
                user=config.bus.user,
                password=config.bus.password,
                credentials_file=config.bus.credentials_file,
            )
        )
    except KeyboardInterrupt:
        return EXIT_OK
    except EdgeAgentError as exc:
        print(f"tail failed: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


COMMANDS = {"serve": cmd_serve, "check-config": cmd_check_config, "send": cmd_send, "tail": cmd_tail}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return COMMANDS[args.command](args)
