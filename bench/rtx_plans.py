"""TensorRT for RTX plans of the bundled models, built ahead of time on this machine (no GPU needed): a table.

For every model, precision and target: the plan's size and build time, as `edge-agent build-engine --backend
tensorrt-rtx --out DIR` records them in each plan's metadata, and what the plan's own header says.

Run:  .venv/bin/python bench/rtx_plans.py [--models ct-demo cxr-nodule] [--precision fp32 fp16] [--markdown out.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from edge_agent.inference.plan_cache import PlanMeta  # noqa: E402
from edge_agent.inference.trt_flavour import RTX_TARGETS, read_rtx_header, sm_name  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["ct-demo", "cxr-nodule"])
    ap.add_argument("--precision", nargs="+", default=["fp32", "fp16"])
    ap.add_argument("--markdown", type=Path, help="also write the table to this file")
    args = ap.parse_args(argv)
    import tensorrt_rtx_bindings as trt

    targets = ",".join(sm_name(c) for c in RTX_TARGETS)
    with tempfile.TemporaryDirectory(prefix="rtx-plans-") as tmp_s:
        tmp = Path(tmp_s)
        raw = yaml.safe_load((REPO / "configs" / "agent.yaml").read_text())
        raw["state_dir"] = str(tmp / "state")
        raw["model_repository"] = str(REPO / "engines")
        config = tmp / "agent.yaml"
        config.write_text(yaml.safe_dump(raw))
        walls = {}
        for model in args.models:
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "edge_agent", "build-engine", model, "--config", str(config),
                            "--backend", "tensorrt-rtx", "--compute-capability", targets, "--precision",
                            *args.precision, "--out", str(tmp / "out")], check=True, capture_output=True)
            walls[model] = time.perf_counter() - started
        rows = []
        for path in sorted((tmp / "out").rglob("*.json")):
            meta = PlanMeta.from_json(path.read_text())
            header = read_rtx_header(path.with_suffix(".plan").read_bytes())
            rows.append((meta.model, meta.key.precision, float(meta.key.compute_capability), meta, header))
    rows.sort(key=lambda r: (r[0], r[1] != "fp32", r[2]))
    lines = [
        f"- machine: {platform.node()}, {os.cpu_count()} CPUs, {platform.machine()}, no GPU needed; "
        f"TensorRT for RTX {trt.__version__}",
        f"- command: `.venv/bin/python bench/rtx_plans.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        "",
        "| model | precision | target | plan MiB | build s | header: version, targets |",
        "|---|---|---|---:|---:|---|",
    ]
    for model, precision, _, meta, header in rows:
        lines.append(f"| {model} | {precision} | {sm_name(meta.key.compute_capability)} | "
                     f"{meta.plan_bytes / 2**20:.2f} | {meta.build_seconds:.2f} | {header.version}, "
                     f"{', '.join(sm_name(c) for c in header.capabilities)} |")
    lines.append("")
    lines.append("Whole command per model (every target and precision, process start and ONNX parsing included): "
                 + ", ".join(f"{m} {s:.1f} s" for m, s in walls.items()))
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
