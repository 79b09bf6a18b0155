"""Plans built on another machine (``build-engine --out DIR``), checked and added to this box's plan cache.

A site without build time on the box builds TensorRT for RTX plans on a workstation, ahead of time, and
ships the folder. Each plan is checked before it is added: its metadata is readable, the plan's bytes are
the ones the metadata hashes, the model it was built from is the model in this box's repository (same
SHA-256), and a TensorRT-RTX plan's own header names the version and the capability its metadata claims.
At start the daemon then picks, among the imported plans, the one for its GPU (trt_build.ensure_plan).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from edge_agent.errors import EdgeAgentError
from edge_agent.inference.card import is_model_name, load_card
from edge_agent.inference.plan_cache import META_SUFFIX, PLAN_SUFFIX, PlanCache, PlanMeta
from edge_agent.inference.trt_flavour import FLAVOURS, plan_problems


@dataclass(frozen=True)
class Imported:
    """One metadata file found, and what became of it."""

    source: Path
    meta: PlanMeta | None
    problem: str | None  # None: imported

    def describe(self) -> str:
        what = f"{self.meta.model}: {self.meta.key.describe()}" if self.meta is not None else str(self.source)
        return what if self.problem is None else f"{what}: {self.problem}"


def import_plans(folder: Path, model_repository: Path, cache: PlanCache) -> list[Imported]:
    """Check every plan under ``folder`` and add the good ones to ``cache``; one result per metadata file."""
    return [_import_one(meta_path, model_repository, cache) for meta_path in sorted(folder.rglob(f"*{META_SUFFIX}"))]


def _import_one(meta_path: Path, model_repository: Path, cache: PlanCache) -> Imported:
    try:
        meta = PlanMeta.from_json(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return Imported(meta_path, None, f"not plan metadata ({exc})")
    plan_path = meta_path.with_suffix(PLAN_SUFFIX)
    try:
        plan = plan_path.read_bytes()
    except OSError as exc:
        return Imported(meta_path, meta, f"its plan {plan_path.name} cannot be read ({exc.strerror})")
    if not is_model_name(meta.model):  # it becomes a folder in the plan cache
        return Imported(meta_path, None, f"its model name {meta.model[:80]!r} is not a model name")
    if meta.key.flavour not in FLAVOURS:
        return Imported(meta_path, meta, f"unknown flavour {meta.key.flavour!r}")
    if hashlib.sha256(plan).hexdigest() != meta.plan_sha256 or len(plan) != meta.plan_bytes:
        return Imported(meta_path, meta, "the plan is not the one its metadata describes (sha256 or length differ)")
    try:
        card = load_card(model_repository / meta.model)
    except (EdgeAgentError, ValueError) as exc:
        return Imported(meta_path, meta, f"no model {meta.model!r} in this box's repository ({exc})")
    if card.sha256 != meta.key.model_sha256:
        return Imported(meta_path, meta, f"built from another model file than this box's {card.name} "
                        f"{card.version} (model sha256 {meta.key.model_sha256[:12]}..., here {card.sha256[:12]}...)")
    problems = plan_problems(meta.key.flavour,
                             plan, meta.key.trt_version, meta.key.compute_capability)
    if problems:
        return Imported(meta_path, meta, "; ".join(problems))
    try:
        cache.put(meta, plan)
    except EdgeAgentError as exc:
        return Imported(meta_path, meta, str(exc))
    return Imported(meta_path, meta, None)
