"""What a validation found, and how it is written down: report.json, report.md and roc.png."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.inference.card import ModelCard
from edge_agent.validate.plots import RocText, roc_png
from edge_agent.validate.stats import Estimate, GroupReport


@dataclass(frozen=True, slots=True)
class ValidationReport:
    """What ``validate`` found; also written as report.json / report.md / roc.png in its ``out_dir``."""

    model: str
    version: str
    label: str
    threshold: float
    images: int
    failures: list[tuple[str, str]]
    overall: GroupReport
    subgroups: list[GroupReport]
    roc: list[tuple[float, float]]
    cases: list[tuple[str, int, float]]  # (file as in the CSV, label, score) for every decoded file
    bootstrap: int
    seconds: float
    files: dict[str, str] = field(default_factory=dict)
    statement: str | None = None
    # The card's own figures next to these (metric, card, measured, same to 3 decimals); empty if it has none.
    against_card: list[tuple[str, float | None, float | None, bool]] = field(default_factory=list)

    @property
    def reproduces_card(self) -> bool | None:
        """True when every figure the card states was measured again here, to 3 decimals; None without any."""
        return all(same for *_, same in self.against_card) if self.against_card else None

    @property
    def operating_point(self) -> tuple[float, float] | None:
        """(false positive rate, true positive rate) at the card's threshold, when both classes are present."""
        sens, spec = self.overall.sensitivity.value, self.overall.specificity.value
        return (1.0 - spec, sens) if sens is not None and spec is not None else None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["failures"] = [{"file": f, "reason": r} for f, r in self.failures]
        out["cases"] = [{"file": f, "label": y, "score": s} for f, y, s in self.cases]
        out["against_card"] = [
            {"metric": m, "card": c, "measured": v, "same": same} for m, c, v, same in self.against_card
        ]
        out["reproduces_card"] = self.reproduces_card
        return out


def against_card(card: ModelCard, overall: GroupReport) -> list[tuple[str, float | None, float | None, bool]]:
    """The card's stated overall figures beside the measured ones (only when the image count matches)."""
    stated = card.validation
    if stated is None:
        return []
    out: list[tuple[str, float | None, float | None, bool]] = [
        ("images", float(stated.images), float(overall.n), stated.images == overall.n),
        ("positives", float(stated.positives), float(overall.positives), stated.positives == overall.positives),
    ]
    for name in ("auc", "sensitivity", "specificity"):
        card_fig = getattr(stated, name)
        measured: Estimate = getattr(overall, name)
        same = (
            card_fig.value is not None
            and measured.value is not None
            and round(card_fig.value, 3) == round(measured.value, 3)
        )
        out.append((name, card_fig.value, measured.value, same))
    return out


def roc_text(report: ValidationReport) -> RocText:
    """The ROC plot's title, legend and caption: enough to read the picture without the report beside it."""
    o = report.overall
    auc = o.auc
    interval = f" (95% CI {auc.low:.3f}-{auc.high:.3f})" if auc.low is not None and auc.high is not None else ""
    curve = f"ROC curve, AUC {auc.value:.3f}{interval}" if auc.value is not None else "ROC curve (AUC n/a)"
    point: tuple[str, ...] = ()
    if report.operating_point is not None:
        point = (
            f"card threshold {report.threshold:g}:",
            f"sensitivity {o.sensitivity.value:.3f}, specificity {o.specificity.value:.3f}",
        )
    caption = (
        f"{report.images} images ({o.positives} with '{report.label}', {o.negatives} without), each scored by "
        f"edge-agent's own preprocessing and engine. The curve shows the true and false positive rates at every "
        f"threshold; the red square is the rate pair at the model card's threshold; the dashed diagonal is a "
        f"model that guesses. Intervals: percentile bootstrap over images, {report.bootstrap} resamples."
    )
    if report.operating_point is None:
        caption += " No curve: the labels need both positive and negative images."
    if report.statement:
        caption += f"\n{report.statement}"
    return RocText(
        title=f"ROC curve of {report.model} {report.version}, label '{report.label}'",
        curve=curve,
        operating_point=point,
        caption=caption,
    )


def write_reports(report: ValidationReport, out_dir: Path) -> None:
    """report.json, report.md and roc.png in ``out_dir``; their paths go into ``report.files``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": out_dir / "report.json", "markdown": out_dir / "report.md", "roc": out_dir / "roc.png"}
    report.files.update({k: str(v) for k, v in files.items()})
    files["json"].write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    files["markdown"].write_text(markdown(report), encoding="utf-8")
    files["roc"].write_bytes(roc_png(report.roc, report.operating_point, roc_text(report)))


def markdown(report: ValidationReport) -> str:
    """The report as a Markdown document."""
    o = report.overall
    lines = [
        f"# Validation of {report.model} {report.version}",
        "",
        f"{report.images} images ({o.positives} positive, {o.negatives} negative); label `{report.label}`, "
        f"threshold {report.threshold:g} (from the model card). 95% intervals: percentile bootstrap over images, "
        f"{report.bootstrap} resamples.",
        "",
        "| metric | value (95% CI) |",
        "|---|---|",
        f"| ROC AUC | {o.auc.text()} |",
        f"| sensitivity at threshold | {o.sensitivity.text()} |",
        f"| specificity at threshold | {o.specificity.text()} |",
        "",
        "![ROC curve](roc.png)",
        "",
    ]
    if report.statement:
        lines[2:2] = [f"**{report.statement}**", ""]
    if report.against_card:
        verdict = "reproduced" if report.reproduces_card else "NOT reproduced"
        lines += [f"## Against the model card: {verdict}", "", "| figure | card | measured | same |"]
        lines.append("|---|---|---|---|")
        for metric, stated, measured, same in report.against_card:
            lines.append(f"| {metric} | {_fmt(stated)} | {_fmt(measured)} | {'yes' if same else 'NO'} |")
        lines.append("")
    lines += [
        "## Subgroups",
        "",
        "| subgroup | n | positive | negative | sensitivity | specificity | AUC |",
        "|---|---|---|---|---|---|---|",
    ]
    for g in report.subgroups:
        mark = "*" if g.against_all_negatives else ""
        lines.append(
            f"| {g.column} = {g.value} | {g.n} | {g.positives} | {g.negatives}{mark} | {g.sensitivity.text()} "
            f"| {g.specificity.text()} | {g.auc.text()} |"
        )
    if any(g.against_all_negatives for g in report.subgroups):
        lines += [
            "",
            "\\* a subgroup only positive images have (e.g. nodule size): its positives against every negative image, "
            "so its specificity is the overall one and its AUC says how well those lesions stand out.",
        ]
    if report.failures:
        lines += ["", f"## Files that could not be decoded ({len(report.failures)})", ""]
        lines += [f"- `{name}`: {reason}" for name, reason in report.failures]
    return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.0f}" if float(value).is_integer() and value > 1 else f"{value:.3f}"
