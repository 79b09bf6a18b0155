"""The long fault-injection run: every scenario of tests/fault_scenarios.py against the real daemon, a real
nats-server and real DICOM senders, with the SIGKILL run at full size. Prints a table and writes
docs/reliability.md (command, machine, date, the table, what went wrong).

Run:  .venv/bin/python bench/faults.py --kills 20 --instances 1000
      .venv/bin/python bench/faults.py --kills 3 --instances 150 --only sigkill broker-killed

The disk scenarios need root (a tmpfs, chattr +i, a read-only bind mount); without it they are listed as not run.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fault_scenarios import SCENARIOS
from tests.fault_tools import CannotInject
from tests.faults import Outcome

REPO = Path(__file__).resolve().parent.parent

COLUMNS = ("fault", "how injected", "times", "instances sent", "acknowledged", "findings", "lost",
           "repeated finding_ids in the stream", "duplicates rejected by the stream", "result")


def sizes(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """How big each scenario runs here (the CI subset in tests/test_faults.py runs them small)."""
    if name == "sigkill":
        return {"kills": args.kills, "instances": args.instances, "seed": args.seed}
    if name in ("sigterm-slow-engine", "broker-killed"):
        return {"rounds": args.rounds}
    return {}


def run_one(name: str, scenario: Callable[..., Outcome], work: Path, kwargs: dict[str, Any]) -> Outcome:
    started = time.monotonic()
    try:
        return scenario(work, **kwargs)
    except (CannotInject, pytest.skip.Exception) as exc:
        return Outcome(fault=name, injected="-", skipped=str(exc), seconds=time.monotonic() - started)
    except Exception as exc:  # one scenario's crash is a row of the table, not the end of the run
        return Outcome(fault=name, injected="-", problems=[f"the scenario itself failed: {exc!r}"],
                       seconds=time.monotonic() - started)


def result(out: Outcome) -> str:
    if out.skipped is not None:
        return "not run"
    return "pass" if out.ok else f"FAIL ({len(out.problems)} problem{'s' * (len(out.problems) != 1)})"


def row(out: Outcome) -> list[str]:
    if out.skipped is not None:
        return [out.fault, "-", "-", "-", "-", "-", "-", "-", "-", "not run"]
    return [out.fault, out.injected, str(out.times), f"{out.sent} ({out.stores} C-STOREs)", str(out.acknowledged),
            str(out.findings), str(out.lost), str(out.duplicate_ids), str(out.duplicates_rejected), result(out)]


def markdown_table(outcomes: list[Outcome]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" if i < 2 else "---:" for i in
                                                                 range(len(COLUMNS) - 1)) + "|---|"]
    for out in outcomes:
        cells = [c.replace("|", "/") for c in row(out)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def text_table(outcomes: list[Outcome]) -> str:
    short = ("fault", "times", "sent", "acked", "findings", "lost", "dup ids", "dups rejected", "result", "s")
    body = [[o.fault, str(o.times), str(o.sent), str(o.acknowledged), str(o.findings), str(o.lost),
             str(o.duplicate_ids), str(o.duplicates_rejected), result(o), f"{o.seconds:.0f}"] for o in outcomes]
    widths = [max(len(r[i]) for r in [list(short), *body]) for i in range(len(short))]
    fmt = "  ".join(f"{{:<{w}}}" if i in (0, 8) else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join(fmt.format(*r) for r in [list(short), *body])


def git_version() -> str:
    def git(*a: str) -> str:
        res = subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, check=False)
        return res.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = " with uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else ""
    return f"commit {commit}{dirty}"


def document(outcomes: list[Outcome], command: str, elapsed_seconds: float) -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    nproc = subprocess.run(["nproc"], capture_output=True, text=True, check=False).stdout.strip()
    machine = (f"nproc {nproc} ({os.cpu_count()} CPUs), Python {platform.python_version()}, {platform.system()} "
               f"{platform.release()}, {'root' if os.geteuid() == 0 else 'not root'}")
    out = [
        "# Reliability under faults",
        "",
        "Written by `bench/faults.py` (do not edit by hand; run it again). It drives the real daemon (a subprocess "
        "with a real `NOTIFY_SOCKET`), a real `nats-server -js` and real DICOM senders (a pynetdicom SCU that records "
        "every C-STORE response, and dcmtk's `storescu`), injects each fault below, and checks the findings stream "
        "against what the senders were told.",
        "",
        f"- command: `{command}`",
        f"- machine: {machine}",
        f"- date: {now}; edge-agent {git_version()}; {elapsed_seconds / 60:.1f} minutes in all",
        "",
        markdown_table(outcomes),
        "",
        "## What the columns mean",
        "",
        "- **instances sent**: distinct SOP instances sent (C-STORE requests in brackets: re-sends after a kill, "
        "identical re-sends and retries included). **acknowledged**: distinct instances answered Success (0x0000 "
        "or a 0xB000 warning); from then on each is the daemon's responsibility.",
        "- **findings**: messages in the `EDGE_FINDINGS` stream at the end, read from its first sequence number.",
        "- **lost**: series with at least one acknowledged instance and no finding for its latest revision, or one "
        "that covers fewer instances: the latest revision's finding must have `instances_inferred` equal to the "
        "series' acknowledged instances, `instances_failed` 0, and list each of them in `sop_instance_uids`.",
        "- **repeated finding_ids in the stream**: messages beyond the first with the same `finding_id` (= "
        "Nats-Msg-Id); 0 wherever a re-publish falls inside the stream's duplicate window. A re-publish after the "
        "window has passed is stored again: that is counted, not failed, in the duplicate-window row.",
        "- **duplicates rejected by the stream**: publishes the stream answered with `duplicate: true`, as the "
        "daemon counts them in `edge_agent_findings_total{outcome=\"duplicate\"}`. That counter restarts with each "
        "process, so it is scraped before each kill and summed; what a process counted between the last scrape and "
        "its SIGKILL is missed, so after kills this is a lower bound.",
        "- Also checked in every row: each revision of a series covers strictly more instances than the one before "
        "(an identical re-send changes nothing), no finding has `instances_failed` > 0 (every instance sent decodes, "
        "so that would be a cancelled inference counted as a failure), the Nats-Msg-Id header is the finding_id, and "
        "for the disk faults that the daemon stays up, answers `/healthz`, keeps producing findings and says what is "
        "wrong in a WARNING/ERROR line of its own.",
        "",
    ]
    problems = [o for o in outcomes if o.problems or o.skipped]
    out += ["## What went wrong", ""]
    if not problems:
        out.append("Nothing: every scenario passed.")
    for o in problems:
        out.append(f"- **{o.fault}**: " + (f"not run: {o.skipped}" if o.skipped else ""))
        out += [f"  - {p}" for p in o.problems]
    out += ["", "## Notes", ""]
    for o in outcomes:
        if o.notes:
            out.append(f"- **{o.fault}** ({o.seconds:.0f} s): " + "; ".join(o.notes))
    out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=20, help="SIGKILLs in the random-kill run (default 20)")
    ap.add_argument("--instances", type=int, default=1000, help="instances in the random-kill run (default 1000)")
    ap.add_argument("--rounds", type=int, default=3, help="repeats of the SIGTERM and broker-kill faults (default 3)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--only", nargs="*", choices=sorted(SCENARIOS), help="run only these scenarios")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "reliability.md", help="the document to write")
    ap.add_argument("--keep", action="store_true", help="keep the work folders (daemon logs, journals) for a look")
    args = ap.parse_args(argv)
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # its SCU logs every association a kill breaks

    command = ".venv/bin/python bench/faults.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="edge-faults-"))
    outcomes: list[Outcome] = []
    for name, scenario in SCENARIOS.items():
        if args.only and name not in args.only:
            continue
        print(f"-- {name} ...", flush=True)
        out = run_one(name, scenario, root / name, sizes(name, args))
        print(out.summary() if out.skipped is None else f"{name}: not run: {out.skipped}", flush=True)
        outcomes.append(out)
    elapsed = time.monotonic() - started
    print()
    print(text_table(outcomes))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(document(outcomes, command, elapsed))
    print(f"\nwrote {args.out}" + (f"; work folders in {root}" if args.keep else ""))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if all(o.ok or o.skipped for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
