"""TensorRT plans cached under the state directory, keyed by everything that makes a plan valid.

A serialized plan only runs on the GPU architecture and TensorRT version it was built with, and only
means the model it was built from. The key therefore holds the model's SHA-256, the GPU's name and
compute capability, the TensorRT version and the precision; the plan's metadata file repeats them and
is checked against the box before a plan is handed to TensorRT, so a plan copied from another box,
renamed or half written is refused, never loaded (DESIGN.md: "rebuilt or refused, never loaded").

Layout: ``<state_dir>/engines/<model>/<key>.plan`` and ``<key>.json`` beside it; timing caches under
``<state_dir>/engines/timing/``. The model name is a validated card name, never a DICOM value.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from edge_agent import __version__
from edge_agent.errors import EngineError
from edge_agent.inference.trt_flavour import TENSORRT, TENSORRT_RTX, sm_name

logger = logging.getLogger(__name__)

Precision = Literal["fp32", "fp16", "int8"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "fp16", "int8")
METADATA_FORMAT = 1
PLAN_SUFFIX = ".plan"
META_SUFFIX = ".json"


class PlanUnavailable(EngineError):
    """No usable plan for this box (none cached, or one that does not match), and none may be built."""


@dataclass(frozen=True, slots=True)
class Box:
    """What a plan is tied to on this machine: the GPU and the TensorRT library."""

    gpu_name: str
    compute_capability: str  # "9.0" for an H100, "8.7" for a Jetson Orin
    trt_version: str

    def describe(self) -> str:
        return f"{self.gpu_name} (sm {self.compute_capability}), TensorRT {self.trt_version}"


@dataclass(frozen=True, slots=True)
class PlanKey:
    """The identity of a plan: the same key means the same plan may be reused."""

    model_sha256: str
    gpu_name: str
    compute_capability: str
    trt_version: str
    precision: Precision
    # "tensorrt" or "tensorrt-rtx" (trt_flavour.py). A TensorRT-RTX plan is tied to a compute capability, not
    # to a GPU model: its gpu_name is "".
    flavour: str = "tensorrt"

    @classmethod
    def for_box(cls, model_sha256: str, box: Box, precision: Precision, flavour: str = "tensorrt") -> PlanKey:
        gpu_name = "" if flavour == TENSORRT_RTX else box.gpu_name
        return cls(model_sha256, gpu_name, box.compute_capability, box.trt_version, precision, flavour)

    def digest(self) -> str:
        """A short, file-name-safe hash of every key field (the GPU name may hold spaces and slashes)."""
        fields = asdict(self)
        if fields["flavour"] == TENSORRT:
            del fields["flavour"]  # plans cached before there were two flavours keep their names
        canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:32]

    def describe(self) -> str:
        """ "TensorRT for RTX 1.7.1.116, sm86, fp16" / "TensorRT 11.4.0.106 on NVIDIA H100 (sm 9.0), fp32"."""
        if self.flavour == TENSORRT_RTX:
            return f"TensorRT for RTX {self.trt_version}, {sm_name(self.compute_capability)}, {self.precision}"
        return f"TensorRT {self.trt_version} on {self.gpu_name} (sm {self.compute_capability}), {self.precision}"


@dataclass(frozen=True, slots=True)
class BatchProfile:
    """The optimisation profile the plan was built with for the batch dimension."""

    min: int
    opt: int
    max: int


@dataclass(frozen=True, slots=True)
class PlanMeta:
    """The metadata file written beside each plan."""

    model: str
    model_version: str
    key: PlanKey
    profile: BatchProfile
    plan_sha256: str
    plan_bytes: int
    workspace_bytes: int
    build_seconds: float
    built_at: float
    built_by: str = f"edge-agent {__version__}"
    format: int = METADATA_FORMAT
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> PlanMeta:
        """Parse a metadata file; ValueError on anything malformed (a half-written or foreign file)."""
        raw = json.loads(text)
        if not isinstance(raw, dict) or raw.get("format") != METADATA_FORMAT:
            raise ValueError(f"not a plan metadata file of format {METADATA_FORMAT}")
        try:
            key = PlanKey(**raw["key"])
            profile = BatchProfile(**raw["profile"])
            return cls(
                model=str(raw["model"]),
                model_version=str(raw["model_version"]),
                key=key,
                profile=profile,
                plan_sha256=str(raw["plan_sha256"]),
                plan_bytes=int(raw["plan_bytes"]),
                workspace_bytes=int(raw["workspace_bytes"]),
                build_seconds=float(raw["build_seconds"]),
                built_at=float(raw["built_at"]),
                built_by=str(raw["built_by"]),
                format=int(raw["format"]),
                extra=dict(raw.get("extra") or {}),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"missing or malformed field: {exc}") from None


def mismatches(meta: PlanMeta, key: PlanKey, profile: BatchProfile) -> list[str]:
    """What differs between a plan's metadata and what this box and card need (empty: it matches)."""
    out = []
    for name in ("flavour", "model_sha256", "gpu_name", "compute_capability", "trt_version", "precision"):
        have, want = getattr(meta.key, name), getattr(key, name)
        if have != want:
            out.append(f"{name} is {have!r}, this box needs {want!r}")
    if meta.profile != profile:
        out.append(f"batch profile is {asdict(meta.profile)}, the card asks for {asdict(profile)}")
    return out


def write_atomic(path: Path, data: bytes) -> None:
    """Temp file in the same folder, fsync, rename, fsync the folder: a crash leaves old or new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class PlanCache:
    """Plans and timing caches under ``<state_dir>/engines``."""

    def __init__(self, state_dir: Path, *, root: Path | None = None) -> None:
        # ``root`` instead of ``state_dir``: plans built for shipping (build-engine --out DIR) use DIR as is.
        self.root = root if root is not None else state_dir / "engines"

    def plan_path(self, model: str, key: PlanKey) -> Path:
        return self.root / model / f"{key.digest()}{PLAN_SUFFIX}"

    def meta_path(self, model: str, key: PlanKey) -> Path:
        return self.root / model / f"{key.digest()}{META_SUFFIX}"

    def timing_cache_path(self, box: Box) -> Path:
        """One timing cache per GPU architecture and TensorRT version, shared by every model."""
        digest = hashlib.sha256(f"{box.gpu_name}|{box.compute_capability}|{box.trt_version}".encode()).hexdigest()
        return self.root / "timing" / f"{digest[:32]}.cache"

    def entries(self, model: str) -> list[PlanMeta]:
        """Every readable plan metadata file for ``model`` (for diagnostics: what was built where)."""
        folder = self.root / model
        out = []
        try:
            files = sorted(folder.glob(f"*{META_SUFFIX}"))
        except OSError:
            return []
        for path in files:
            try:
                out.append(PlanMeta.from_json(path.read_text(encoding="utf-8")))
            except (OSError, ValueError):
                continue
        return out

    def find(self, model: str, key: PlanKey, profile: BatchProfile) -> PlanMeta | None:
        """The metadata of a cached plan matching ``key`` and ``profile``, or None (with the reason logged)."""
        meta_path = self.meta_path(model, key)
        plan_path = self.plan_path(model, key)
        if not meta_path.exists() or not plan_path.exists():
            return None
        try:
            meta = PlanMeta.from_json(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            logger.warning("engine %s: ignoring unreadable plan metadata %s: %s", model, meta_path.name, exc)
            return None
        problems = mismatches(meta, key, profile)
        if meta.model != model:
            problems.append(f"it was built for model {meta.model!r}")
        if problems:
            logger.warning("engine %s: ignoring cached plan %s: %s", model, plan_path.name, "; ".join(problems))
            return None
        return meta

    def load(self, model: str, key: PlanKey, profile: BatchProfile) -> tuple[bytes, PlanMeta] | None:
        """The plan's bytes and metadata if a matching, intact plan is cached; None if there is none.

        The bytes are hashed after reading, so a plan truncated or altered after it was written is
        refused here rather than handed to TensorRT's deserializer.
        """
        meta = self.find(model, key, profile)
        if meta is None:
            return None
        path = self.plan_path(model, key)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise EngineError(f"engine {model}: cannot read cached plan {path}: {exc.strerror}") from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != meta.plan_sha256 or len(data) != meta.plan_bytes:
            logger.warning(
                "engine %s: cached plan %s does not match its metadata's sha256; ignoring it", model, path.name
            )
            return None
        return data, meta

    def store(
        self,
        model: str,
        model_version: str,
        key: PlanKey,
        profile: BatchProfile,
        plan: bytes,
        *,
        workspace_bytes: int,
        build_seconds: float,
        extra: dict[str, Any] | None = None,
    ) -> PlanMeta:
        """Write a plan and then its metadata, each atomically; the metadata is the commit mark."""
        meta = PlanMeta(
            model=model,
            model_version=model_version,
            key=key,
            profile=profile,
            plan_sha256=hashlib.sha256(plan).hexdigest(),
            plan_bytes=len(plan),
            workspace_bytes=workspace_bytes,
            build_seconds=round(build_seconds, 3),
            built_at=time.time(),
            extra=dict(extra or {}),
        )
        self.put(meta, plan)
        return meta

    def put(self, meta: PlanMeta, plan: bytes) -> None:
        """Store a plan with its metadata (built here, or elsewhere: ``edge-agent import-plans``, whose caller
        checked that ``plan`` is what ``meta`` says)."""
        try:
            # A reader that finds the new plan with the old metadata refuses it by hash; never the reverse.
            write_atomic(self.plan_path(meta.model, meta.key), plan)
            write_atomic(self.meta_path(meta.model, meta.key), meta.to_json().encode())
        except OSError as exc:
            raise EngineError(f"engine {meta.model}: cannot write plan under {self.root / meta.model}: "
                              f"{exc.strerror}") from None

    def read_timing_cache(self, box: Box) -> bytes:
        """The serialized timing cache for this box, or b"" (TensorRT starts an empty one)."""
        try:
            return self.timing_cache_path(box).read_bytes()
        except FileNotFoundError:
            return b""
        except OSError as exc:
            logger.warning("timing cache unreadable, starting an empty one: %s", exc.strerror)
            return b""

    def write_timing_cache(self, box: Box, data: bytes) -> None:
        try:
            write_atomic(self.timing_cache_path(box), data)
        except OSError as exc:
            # Losing the timing cache only makes the next build slower: say so, do not fail the build.
            logger.warning("cannot save the timing cache: %s", exc.strerror)
