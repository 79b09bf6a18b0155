"""The command line: serve, check-config, status, send, tail, build-engine, import-plans, verify-engine, validate."""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from edge_agent import __version__
from edge_agent.config import DEFAULT_CONFIG_PATH, AgentConfig, ModelDeployment, load_config
from edge_agent.errors import ConfigError, EdgeAgentError, ModelError, StateDirLockedError

if TYPE_CHECKING:
    from edge_agent.agent import Agent
    from edge_agent.inference.card import ModelCard
    from edge_agent.inference.engine import FloatArray

logger = logging.getLogger(__name__)

# Exit codes. systemd's unit has RestartPreventExitStatus=3: a bad config is not retried.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
# Another edge-agent runs on the same state_dir: this one exited without touching it.
EXIT_STATE_DIR_LOCKED = 4


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-agent", description="DICOM triage inference daemon")
    p.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the daemon")
    s.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH, help="YAML config (default: %(default)s)")
    s.add_argument("--log-format", choices=["text", "json"], default=None,
                   help="text, or one JSON object per line for journald (default: logging.format of the config)")

    c = sub.add_parser("check-config", help="validate a config file and the models it names; exit 3 if invalid")
    c.add_argument("file", type=Path, nargs="?", default=DEFAULT_CONFIG_PATH)

    rq = sub.add_parser(
        "requeue-rejected",
        help="give findings the broker rejected (too large, not permitted) another try, once the cause is fixed",
    )
    rq.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH, help="YAML config (default: %(default)s)")

    snd = sub.add_parser("send", help="send DICOM files or folders to a DICOM SCP (C-STORE)")
    snd.add_argument("paths", type=Path, nargs="+")
    snd.add_argument("--host", default="127.0.0.1")
    snd.add_argument("--port", type=int, default=11112)
    snd.add_argument("--called-aet", default="EDGE_AGENT")
    snd.add_argument("--calling-aet", default="EDGE_SEND")

    st = sub.add_parser("status", help="ask the running daemon how it is doing (GET /status on its HTTP port)")
    where = st.add_mutually_exclusive_group()
    where.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH,
                       help="the daemon's config, for its http.host and http.port (default: %(default)s)")
    where.add_argument("--url", default=None, help="the daemon's HTTP address, e.g. http://127.0.0.1:9108")
    st.add_argument("--json", action="store_true", help="print the status document as JSON, for scripts")
    st.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer (default: %(default)s)")

    t = sub.add_parser("tail", help="print findings from the JetStream stream as they arrive (one JSON per line)")
    t.add_argument("--url", default=None, help="NATS URL (default: bus.url of --config)")
    t.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH)
    t.add_argument("--subject", default=None,
                   help="NATS subject filter, e.g. 'edge.findings.*.CT.>' (default: <subject_prefix>.>)")
    t.add_argument("--site", default=None, help="only this site's findings")
    t.add_argument("--modality", default=None, help="only findings of this modality (CT, CR, ...)")
    t.add_argument("--model", default=None, help="only this model's findings")
    start = t.add_mutually_exclusive_group()
    start.add_argument("--all", action="store_true", help="start from the first finding in the stream, not the next")
    start.add_argument("--since", default=None,
                       help="start from findings stored since a duration ago (10m, 2h, 1d) or a time "
                            "(2026-01-31T12:00:00Z)")
    t.add_argument("--count", type=int, default=None, help="exit after this many findings")
    t.add_argument("--timeout", type=float, default=None, help="exit after this many seconds")
    t.add_argument("--connect-timeout", type=float, default=10.0,
                   help="give up when the NATS server cannot be reached at start for this long (default: %(default)s)")

    b = sub.add_parser(
        "build-engine",
        help="build (or rebuild) TensorRT plans of a model: for this GPU, or ahead of time for TensorRT for RTX",
    )
    b.add_argument("model")
    b.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH)
    b.add_argument("--backend", choices=["tensorrt", "tensorrt-rtx"], default=None,
                   help="the TensorRT flavour (default: the deployment's backend if it is one, else tensorrt)")
    b.add_argument("--compute-capability", default=None, metavar="LIST",
                   help="tensorrt-rtx only: comma-separated targets to build for, e.g. sm86,sm89,sm120 (no GPU needed; "
                   "default: this machine's GPU)")
    b.add_argument("--precision", nargs="+", choices=["fp32", "fp16", "int8"], default=None,
                   help="one or more precisions (default: the deployment's)")
    b.add_argument("--workspace-bytes", type=int, default=None, help="default: the deployment's workspace_bytes")
    b.add_argument("--out", type=Path, default=None,
                   help="write the plans under this folder (to ship to a box: edge-agent import-plans) instead of "
                   "the state directory's plan cache")
    b.add_argument("--force", action="store_true", help="rebuild even if a matching plan is cached")

    ip = sub.add_parser("import-plans", help="check plans built elsewhere (build-engine --out) and add them to the "
                        "plan cache")
    ip.add_argument("folder", type=Path, help="a folder written by build-engine --out")
    ip.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH)

    v = sub.add_parser("verify-engine", help="compare a model's engine with ONNX Runtime on the CPU")
    v.add_argument("model")
    v.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH)
    v.add_argument("--backend", choices=["tensorrt", "tensorrt-rtx", "onnxruntime", "auto"], default=None)
    v.add_argument("--dicom", type=Path, nargs="*", default=[], help="DICOM files or folders to use as inputs")
    v.add_argument("--count", type=int, default=32, help="number of input images (default: %(default)s)")
    v.add_argument("--tolerance", type=float, default=None, help="largest score difference accepted")

    val = sub.add_parser(
        "validate",
        help="run a model over labelled DICOM through the daemon's preprocessing; sensitivity, specificity, AUC",
    )
    val.add_argument("model", help="a model name in the repository, or a model folder")
    val.add_argument("data", type=Path, help="folder of DICOM files named in the labels CSV")
    val.add_argument("--labels", type=Path, default=None, help="labels CSV (default: DATA/labels.csv)")
    val.add_argument("--out", type=Path, default=Path("validation"), help="report folder (default: %(default)s)")
    val.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH, help="for the model repository")
    val.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default: %(default)s)")
    val.add_argument("--seed", type=int, default=0)
    val.add_argument(
        "--subgroup",
        action="append",
        default=None,
        help="a labels CSV column or DICOM keyword to break down by (repeatable; default: all)",
    )
    val.add_argument(
        "--drift-reference",
        action="store_true",
        help="also write the inputs' and scores' distributions into the model card as its drift_reference",
    )
    val.add_argument("--reference-data", default=None, help="what the data is, in words, for the drift reference")
    return p


def _setup_logging(level: str, fmt: str = "text") -> None:
    from edge_agent.logs import setup_logging

    setup_logging(level, fmt)


def _load_checked(path: Path) -> AgentConfig:
    from edge_agent.configcheck import load_checked

    return load_checked(path)


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
    _setup_logging(config.logging.level, args.log_format or config.logging.format)
    # `kill -USR1 <pid>` prints every thread's stack to stderr (the journal): the first thing to ask
    # of a daemon that looks stuck.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    agent = Agent(config)
    try:
        asyncio.run(agent.run())
    except StateDirLockedError as exc:
        logger.error("edge-agent not started: %s", exc)
        return EXIT_STATE_DIR_LOCKED
    except EdgeAgentError as exc:
        logger.error("edge-agent stopped: %s", exc)
        return _exit_past(agent, EXIT_FAILURE)
    return _exit_past(agent, EXIT_OK)


def _exit_past(agent: Agent, code: int) -> int:
    """``code``, or, when the stop left an engine call running (logged as it did), the process ends here with it:
    Python's exit would wait for that call's thread, which may never return."""
    if agent.engine_call_left_running:
        logging.shutdown()  # flushed and closed: nothing logged is lost
        sys.stdout.flush()
        os._exit(code)
    return code


def cmd_requeue_rejected(args: argparse.Namespace) -> int:
    """Move every rejected outbox row back to pending; a running daemon publishes them at its next poll."""
    from edge_agent.journal import Journal

    config = _load_or_report(args.config)
    if config is None:
        return EXIT_CONFIG
    path = config.state_dir / "journal.sqlite3"
    if not path.exists():
        print(f"no journal at {path}", file=sys.stderr)
        return EXIT_FAILURE
    try:
        journal = Journal(path)  # SQLite in WAL mode: safe beside the running daemon
        try:
            count = journal.outbox.requeue_rejected()
        finally:
            journal.close()
    except EdgeAgentError as exc:
        print(f"cannot re-queue: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"{count} rejected finding(s) queued again")
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


def cmd_status(args: argparse.Namespace) -> int:
    """Exit 0 when the daemon answered (ready or not: the output says), 1 when it did not."""
    import json

    from edge_agent.status_client import StatusError, base_url, fetch_status, normalise_url, render

    if args.url is not None:
        url = normalise_url(args.url)
    else:
        try:
            url = base_url(load_config(args.config).http)
        except ConfigError as exc:
            print(str(exc), file=sys.stderr)
            return EXIT_CONFIG
    try:
        doc = fetch_status(url, args.timeout)
    except StatusError as exc:
        print(f"edge-agent status: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(json.dumps(doc, indent=2, sort_keys=True) if args.json else render(doc, url))
    return EXIT_OK


def cmd_tail(args: argparse.Namespace) -> int:
    import time

    from edge_agent.bus.tail import findings_subject, parse_since, tail

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_CONFIG
    url = args.url or config.bus.url
    narrowed = args.site is not None or args.modality is not None or args.model is not None
    if args.subject is not None and narrowed:
        print("tail: give either --subject or --site/--modality/--model, not both", file=sys.stderr)
        return EXIT_USAGE
    subject = args.subject or findings_subject(config.bus.subject_prefix, site=args.site, modality=args.modality,
                                               model=args.model)
    try:
        since = None if args.since is None else parse_since(args.since, time.time())
    except ValueError as exc:
        print(f"tail: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        asyncio.run(
            tail(
                url,
                config.bus.stream,
                subject,
                from_start=args.all,
                max_messages=args.count,
                timeout_seconds=args.timeout,
                since=since,
                notes=sys.stderr,
                token=config.bus.token,
                user=config.bus.user,
                password=config.bus.password,
                credentials_file=config.bus.credentials_file,
                tls=config.bus.tls,
                connect_timeout_seconds=args.connect_timeout,
            )
        )
    except KeyboardInterrupt:
        return EXIT_OK
    except EdgeAgentError as exc:
        print(f"tail failed: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _model_and_deployment(config_path: Path, model: str) -> tuple[AgentConfig, ModelCard, ModelDeployment] | None:
    from edge_agent.inference.card import load_card

    config = _load_or_report(config_path)
    if config is None:
        return None
    try:
        card = load_card(config.model_repository / model)
    except ModelError as exc:
        print(str(exc), file=sys.stderr)
        return None
    return config, card, config.deployment(model)


def cmd_build_engine(args: argparse.Namespace) -> int:
    from edge_agent.inference.factory import resolve_precision
    from edge_agent.inference.plan_cache import PlanCache
    from edge_agent.inference.trt_build import BuildOptions, build_and_cache, ensure_plan
    from edge_agent.inference.trt_flavour import TENSORRT, TENSORRT_RTX, Flavour, import_flavour, parse_capability
    from edge_agent.inference.verify import dicom_files, dicom_inputs

    loaded = _model_and_deployment(args.config, args.model)
    if loaded is None:
        return EXIT_CONFIG
    config, card, deployment = loaded
    flavour: Flavour = args.backend or (TENSORRT_RTX if deployment.backend == TENSORRT_RTX else TENSORRT)
    try:
        capabilities: list[str | None] = (
            [parse_capability(c) for c in args.compute_capability.split(",") if c.strip()]
            if args.compute_capability else [None])
    except ValueError as exc:
        print(f"build-engine {args.model}: --compute-capability: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.compute_capability and flavour != TENSORRT_RTX:
        print(f"build-engine {args.model}: --compute-capability is for --backend tensorrt-rtx (the full TensorRT "
              "builds on the GPU it runs on)", file=sys.stderr)
        return EXIT_CONFIG
    _setup_logging("INFO")
    if args.workspace_bytes is not None:
        deployment = deployment.model_copy(update={"workspace_bytes": args.workspace_bytes})
    precisions = args.precision or [resolve_precision(deployment)]
    cache = PlanCache(config.state_dir, root=args.out.resolve() if args.out is not None else None)
    total = len(precisions) * len(capabilities)
    done = 0
    try:
        trt = import_flavour(flavour)
        for precision in precisions:
            deployment_p = deployment.model_copy(update={"precision": precision})
            images: list[FloatArray] = []
            if precision == "int8" and deployment.calibration_dir is not None:
                images = list(dicom_inputs(card, dicom_files(deployment.calibration_dir), limit=512))
            for capability in capabilities:
                options = BuildOptions(resolve_precision(deployment_p), deployment.workspace_bytes, images,
                                       flavour=flavour, capability=capability)
                if args.force:
                    _, meta = build_and_cache(card, cache, options, trt)
                    built = True
                else:
                    _, meta, built = ensure_plan(card, cache, options, allow_build=True, trt=trt,
                                                 box=options.target_box(trt))
                done += 1
                where = cache.plan_path(card.name, meta.key)
                verb = f"built in {meta.build_seconds:.1f} s" if built else "already cached (use --force to rebuild)"
                print(
                    f"[{done}/{total}] {card.name} {card.version}: {meta.key.describe()}, batch {meta.profile.min}/"
                    f"{meta.profile.opt}/{meta.profile.max}, {meta.plan_bytes / 2**20:.1f} MiB: {verb}\n  {where}",
                    flush=True,
                )
    except EdgeAgentError as exc:
        print(f"build-engine {args.model}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if args.out is not None:
        print(f"ship {args.out} to the box and run there: edge-agent import-plans {args.out}")
    return EXIT_OK


def cmd_import_plans(args: argparse.Namespace) -> int:
    from edge_agent.inference.plan_cache import PlanCache
    from edge_agent.inference.plan_import import import_plans

    config = _load_or_report(args.config)
    if config is None:
        return EXIT_CONFIG
    _setup_logging("WARNING")
    results = import_plans(args.folder, config.model_repository, PlanCache(config.state_dir))
    for r in results:
        print(("imported " if r.problem is None else "REFUSED  ") + r.describe())
    if not results:
        print(f"import-plans: no plan metadata (*.json) under {args.folder}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK if all(r.problem is None for r in results) else EXIT_FAILURE


def cmd_verify_engine(args: argparse.Namespace) -> int:
    from edge_agent.inference.factory import create_engine, resolve_precision
    from edge_agent.inference.verify import (
        DEFAULT_TOLERANCE,
        dicom_files,
        dicom_inputs,
        synthetic_inputs,
        verify_engine,
    )

    loaded = _model_and_deployment(args.config, args.model)
    if loaded is None:
        return EXIT_CONFIG
    config, card, deployment = loaded
    _setup_logging("WARNING")
    if args.backend is not None:
        deployment = deployment.model_copy(update={"backend": args.backend})
    tolerance = args.tolerance or deployment.verify_max_abs_diff or DEFAULT_TOLERANCE[resolve_precision(deployment)]
    try:
        if args.dicom:
            files = [f for p in args.dicom for f in (dicom_files(p) if p.is_dir() else [p])]
            inputs = dicom_inputs(card, files, args.count)
        else:
            inputs = synthetic_inputs(card, args.count)
        engine = create_engine(card, deployment, config.state_dir)
        engine.load()
        try:
            report = verify_engine(card, engine, inputs, tolerance=tolerance, batch=deployment.max_batch)
        finally:
            engine.close()
    except EdgeAgentError as exc:
        print(f"verify-engine {args.model}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(report.summary())
    return EXIT_OK if report.passed else EXIT_FAILURE


def cmd_validate(args: argparse.Namespace) -> int:
    from edge_agent.validate.report import markdown
    from edge_agent.validate.run import validate

    _setup_logging("INFO")
    model_dir = Path(args.model)
    if not (model_dir / "model.yaml").is_file():
        try:
            model_dir = load_config(args.config).model_repository / args.model
        except ConfigError as exc:
            print(str(exc), file=sys.stderr)
            return EXIT_CONFIG
    labels = args.labels or args.data / "labels.csv"
    try:
        report = validate(
            model_dir, args.data, labels, args.out, bootstrap=args.bootstrap, seed=args.seed, subgroups=args.subgroup,
            drift_reference=args.drift_reference, reference_data=args.reference_data,
        )
    except EdgeAgentError as exc:
        print(f"validate: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(markdown(report))
    print(f"reports: {', '.join(report.files.values())}")
    return EXIT_OK


COMMANDS = {
    "serve": cmd_serve,
    "check-config": cmd_check_config,
    "send": cmd_send,
    "requeue-rejected": cmd_requeue_rejected,
    "status": cmd_status,
    "tail": cmd_tail,
    "build-engine": cmd_build_engine,
    "import-plans": cmd_import_plans,
    "verify-engine": cmd_verify_engine,
    "validate": cmd_validate,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return COMMANDS[args.command](args)
