"""Model cards: ``engines/<name>/model.yaml`` says what a model is and how to feed it.

A card is validated as strictly as the agent's own config (unknown keys are errors, every problem
names its field path) and it pins the model file by SHA-256, so a model swapped or corrupted on disk
is refused at load instead of producing silently different findings.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from edge_agent.errors import ModelError

CARD_FILE = "model.yaml"
MODEL_FILE = "model.onnx"

# Model names become metric label values and NATS subject tokens: keep them short and tame.
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


def is_model_name(text: str) -> bool:
    """Whether ``text`` is a valid model (and operating point) name: it becomes a folder name in places."""
    return _NAME.match(text) is not None
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_HASH_CHUNK_BYTES = 1 << 20


class _Card(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _int_as_float(v: Any) -> Any:
    # YAML writes 40 for 40.0; strict mode would refuse an int for a float field.
    return float(v) if isinstance(v, int) and not isinstance(v, bool) else v


Float = Annotated[float, BeforeValidator(_int_as_float)]
Fraction = Annotated[Float, Field(ge=0.0, le=1.0)]


class WindowSpec(_Card):
    """A fixed VOI window in modality units (e.g. HU for CT)."""

    center: Float
    width: Annotated[Float, Field(gt=0)]


class NormaliseSpec(_Card):
    """``(x - mean) / std`` applied after windowing to [0, 1] and resizing."""

    mean: Float = 0.0
    std: Annotated[Float, Field(gt=0)] = 1.0


class Preprocessing(_Card):
    """How a decoded frame becomes the model's input tensor."""

    # "auto": the instance's own Window Center/Width if present, else its min-max range.
    window: WindowSpec | Literal["auto"] = "auto"
    invert_monochrome1: bool = True
    rescale: bool = True
    resize: tuple[Annotated[int, Field(ge=1, le=8192)], Annotated[int, Field(ge=1, le=8192)]]
    keep_aspect: bool = False
    normalise: NormaliseSpec = Field(default_factory=NormaliseSpec)

    @field_validator("resize", mode="before")
    @classmethod
    def _pair(cls, v: Any) -> Any:
        return tuple(v) if isinstance(v, list) else v

    @field_validator("window", mode="before")
    @classmethod
    def _window(cls, v: Any) -> Any:
        if v == "auto" or isinstance(v, dict | WindowSpec):
            return v
        raise ValueError("must be 'auto' or a mapping with center and width")


class InputSpec(_Card):
    name: str
    # [channels, height, width]; the batch dimension is dynamic and not written here.
    shape: tuple[Literal[1, 3], Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]]
    dtype: Literal["float32"] = "float32"

    @field_validator("shape", mode="before")
    @classmethod
    def _triple(cls, v: Any) -> Any:
        return tuple(v) if isinstance(v, list) else v


class OutputSpec(_Card):
    scores: str
    heatmap: str | None = None


class BatchSpec(_Card):
    """Batch sizes the model is built for (TensorRT optimisation profiles use them)."""

    min: Annotated[int, Field(ge=1)] = 1
    opt: Annotated[int, Field(ge=1)] = 1
    max: Annotated[int, Field(ge=1, le=1024)] = 8

    @model_validator(mode="after")
    def _order(self) -> BatchSpec:
        if not self.min <= self.opt <= self.max:
            raise ValueError(f"need min <= opt <= max, got {self.min}, {self.opt}, {self.max}")
        return self


class Figure(_Card):
    """A measured proportion or AUC with its bootstrap 95% confidence interval."""

    value: Fraction | None
    low: Fraction | None = None
    high: Fraction | None = None


class Validation(_Card):
    """How well the model did, where, and how to reproduce the figures (``edge-agent validate``)."""

    data: str  # what the figures were measured on
    command: str  # the command that reproduces them
    operating_point: str  # how the card's threshold was chosen
    images: Annotated[int, Field(ge=1)]
    positives: Annotated[int, Field(ge=0)]
    auc: Figure
    sensitivity: Figure
    specificity: Figure
    # Sensitivity at the card's threshold per subgroup ("size_bin=20-30": ...), and control AUCs.
    sensitivity_by: dict[str, Figure] = Field(default_factory=dict)
    controls: dict[str, Figure] = Field(default_factory=dict)
    smallest_reliable: str | None = None


class OperatingPoint(_Card):
    """A named threshold for one label, how it was chosen, what it means for a reading list, and what it gives."""

    label: str
    threshold: Fraction
    rule: str  # how it was chosen, on which split
    meaning: str  # what it means for the people reading the list
    # Measured at this threshold: "sensitivity", "specificity", "sensitivity_15mm_and_up"... on each split.
    validation: dict[str, Figure] = Field(default_factory=dict)
    test: dict[str, Figure] = Field(default_factory=dict)


class Calibration(_Card):
    """How the model's scores were mapped to probabilities (inside model.onnx: the scores are calibrated)."""

    method: Literal["platt"]
    fitted_on: str
    # p = sigmoid(slope * logit(raw score) + intercept)
    slope: Float
    intercept: Float
    # Expected calibration error (10 equal-width bins) before and after, on the split named.
    ece: dict[str, Fraction] = Field(default_factory=dict)


class TransferCheck(_Card):
    """The model on real images no training or tuning used: what was run and what it showed."""

    data: str
    command: str
    result: str


# What input and output drift is watched by (issue 10): fixed names, safe as metric label values.
NUMERIC_SIGNALS = ("score", "input_mean", "input_std", "pixel_spacing")
CATEGORICAL_SIGNALS = ("manufacturer",)
SignalName = Literal["score", "input_mean", "input_std", "pixel_spacing", "manufacturer"]
OTHER_CATEGORY = "other"
# Proportions are written with 6 decimals: their sum may miss 1 by a few millionths per bin.
_SUM_TOLERANCE = 1e-3


def _sums_to_one(proportions: list[float], missing: float = 0.0) -> None:
    total = sum(proportions) + missing
    if abs(total - 1.0) > _SUM_TOLERANCE:
        raise ValueError(f"proportions must add up to 1, they add up to {total:.6f}")


class NumericReference(_Card):
    """A numeric signal's reference distribution: the share of images in each bin between ``edges``."""

    # Bin 0 holds values below edges[0], bin i values in [edges[i-1], edges[i]), the last bin edges[-1] and up.
    edges: Annotated[list[Float], Field(min_length=1)]
    proportions: list[Fraction]
    missing: Fraction = 0.0  # the share of images without a value (e.g. no Pixel Spacing)

    @model_validator(mode="after")
    def _bins(self) -> NumericReference:
        if not all(math.isfinite(e) for e in self.edges):
            raise ValueError("edges must be finite numbers")
        if any(b <= a for a, b in itertools.pairwise(self.edges)):
            raise ValueError("edges must increase strictly")
        if len(self.proportions) != len(self.edges) + 1:
            raise ValueError(f"{len(self.edges)} edges make {len(self.edges) + 1} bins, not {len(self.proportions)}")
        _sums_to_one(self.proportions, self.missing)
        return self


class CategoricalReference(_Card):
    """A categorical signal's reference distribution: the common values, then every other value together."""

    categories: list[Annotated[str, Field(min_length=1)]]
    proportions: list[Fraction]  # one per category, then the share of "other"

    @model_validator(mode="after")
    def _categories(self) -> CategoricalReference:
        if len(set(self.categories)) != len(self.categories) or OTHER_CATEGORY in self.categories:
            raise ValueError(f"categories must be distinct and must not be {OTHER_CATEGORY!r}")
        if len(self.proportions) != len(self.categories) + 1:
            raise ValueError(f"{len(self.categories)} categories and 'other' need {len(self.categories) + 1} "
                             f"proportions, not {len(self.proportions)}")
        _sums_to_one(self.proportions)
        return self



def _check_sha256(v: str) -> str:
    if not _SHA256.match(v):
        raise ValueError("must be 64 lower-case hex digits (the SHA-256 of model.onnx)")
    return v

class DriftReference(_Card):
    """What inputs and scores looked like on the data a model was validated on (``edge-agent validate
    --drift-reference``); the daemon compares live traffic with it (edge_agent/drift.py)."""

    data: str  # what it was computed on
    command: str  # the command that computes it again
    # The model file it was computed with: for any other (a card whose sha256 moved on), the daemon does not use it.
    model_sha256: str
    images: Annotated[int, Field(ge=1)]  # model inputs (frames) it was computed from
    signals: Annotated[dict[SignalName, NumericReference | CategoricalReference], Field(min_length=1)]

    @field_validator("model_sha256")
    @classmethod
    def _sha(cls, v: str) -> str:
        return _check_sha256(v)

    @model_validator(mode="after")
    def _kinds(self) -> DriftReference:
        for name, signal in self.signals.items():
            expected = CategoricalReference if name in CATEGORICAL_SIGNALS else NumericReference
            if not isinstance(signal, expected):
                kind = "categorical (categories)" if expected is CategoricalReference else "numeric (edges)"
                raise ValueError(f"signals.{name}: must be {kind}")
        return self


class ModelCard(_Card):
    """What a model is, what it expects, and how its outputs become findings."""

    name: str
    version: str
    description: str
    intended_use: str
    trained: bool
    sha256: str
    # "slice": run on each instance/frame as it lands; "image": run on the one image of the series.
    granularity: Literal["image", "slice"]
    inputs: InputSpec
    outputs: OutputSpec
    labels: Annotated[list[str], Field(min_length=1)]
    thresholds: dict[str, Fraction]
    aggregation: Literal["max"] = "max"
    batch: BatchSpec = Field(default_factory=BatchSpec)
    preprocessing: Preprocessing
    # Provenance and performance (required of trained models by convention, shown by validate).
    statement: str | None = None  # the plain-words limit of use, e.g. "not for diagnosis"
    training_data: str | None = None
    validation: Validation | None = None
    # Named thresholds a deployment may choose (models.NAME.operating_point); ``thresholds`` is the default.
    operating_points: dict[str, OperatingPoint] = Field(default_factory=dict)
    calibration: Calibration | None = None
    transfer_checks: list[TransferCheck] = Field(default_factory=list)
    drift_reference: DriftReference | None = None

    _directory: Path = PrivateAttr(default=Path("."))

    @model_validator(mode="after")
    def _operating_points(self) -> ModelCard:
        for name, point in self.operating_points.items():
            if not is_model_name(name):
                raise ValueError(f"operating_points: {name!r} is not a name (lower-case letters, digits, '-', '_')")
            if point.label not in self.labels:
                raise ValueError(f"operating_points.{name}: label {point.label!r} is not one of {self.labels}")
        return self

    def with_operating_point(self, name: str | None) -> ModelCard:
        """This card with the thresholds of operating point ``name`` (None: the card's own thresholds).
        ValueError naming the card's points when it has no such point."""
        if name is None:
            return self
        point = self.operating_points.get(name)
        if point is None:
            have = ", ".join(sorted(self.operating_points)) or "none"
            raise ValueError(f"model {self.name} has no operating point {name!r} (its card has: {have})")
        card = self.model_copy(update={"thresholds": {**self.thresholds, point.label: point.threshold}})
        card._directory = self._directory
        return card

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not is_model_name(v):
            raise ValueError(f"{v!r} is not a model name (lower-case letters, digits, '-', '_'; at most 64)")
        return v

    @field_validator("version")
    @classmethod
    def _version(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v

    @field_validator("sha256")
    @classmethod
    def _sha(cls, v: str) -> str:
        return _check_sha256(v)

    @model_validator(mode="after")
    def _consistent(self) -> ModelCard:
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("labels: a label is listed twice")
        missing = [label for label in self.labels if label not in self.thresholds]
        extra = [key for key in self.thresholds if key not in self.labels]
        if missing:
            raise ValueError(f"thresholds: no threshold for label(s) {', '.join(missing)}")
        if extra:
            raise ValueError(f"thresholds: {', '.join(extra)} is not in labels")
        if tuple(self.preprocessing.resize) != tuple(self.inputs.shape[1:]):
            raise ValueError(
                f"preprocessing.resize {list(self.preprocessing.resize)} must equal inputs.shape[1:] "
                f"{list(self.inputs.shape[1:])}"
            )
        return self

    @property
    def directory(self) -> Path:
        """The model's folder in the repository."""
        return self._directory

    @property
    def model_path(self) -> Path:
        """The ONNX file this card describes."""
        return self._directory / MODEL_FILE

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """[channels, height, width] of one input image."""
        c, h, w = self.inputs.shape
        return (int(c), int(h), int(w))


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks so that large models do not sit twice in memory."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in {"literal['auto']", "WindowSpec", "tuple[int, int]", "NumericReference", "CategoricalReference"}:
            continue  # pydantic's name for a union branch, not a key the author wrote
        else:
            out += ("." if out else "") + str(part)
    return out


def _message(err: Any) -> str:
    if err.get("type") == "extra_forbidden":
        return "unknown key"
    if err.get("type") == "missing":
        return "required key is missing"
    return str(err.get("msg", "invalid")).removeprefix("Value error, ")


def parse_card(raw: Any, source: str = "model.yaml") -> ModelCard:
    """Validate an already-parsed card document; ModelError names every bad field."""
    if not isinstance(raw, dict):
        raise ModelError(f"{source}: a model card must be a YAML mapping")
    try:
        return ModelCard.model_validate(raw)
    except ValidationError as exc:
        errors = [(_loc(e["loc"]) or "(card)", e) for e in exc.errors()]
        # A {center, width} window with a bad value also fails the "auto" branch of its union; that
        # second complaint only confuses, so drop a literal mismatch when a deeper error explains it.
        problems = [
            f"{path}: {_message(e)}"
            for path, e in errors
            if not (e["type"] == "literal_error" and any(p.startswith(path + ".") for p, _ in errors))
        ]
        raise ModelError(f"{source}: " + "; ".join(problems)) from None


def load_card(model_dir: Path, *, verify: bool = True) -> ModelCard:
    """Read ``model_dir/model.yaml``, validate it, and check model.onnx against its sha256."""
    card_path = model_dir / CARD_FILE
    try:
        text = card_path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ModelError(f"{card_path}: cannot read model card: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ModelError(f"{card_path}: {where}not valid YAML: {getattr(exc, 'problem', exc)}") from None
    card = parse_card(raw, str(card_path))
    if card.name != model_dir.name:
        # Routes name models by folder; a card that calls itself something else is a copy-paste slip.
        raise ModelError(f"{card_path}: name: {card.name!r} does not match its folder {model_dir.name!r}")
    card._directory = model_dir
    if verify:
        verify_model_file(card)
    return card


def verify_model_file(card: ModelCard) -> None:
    """Raise ModelError unless the card's model file exists and matches its sha256."""
    path = card.model_path
    try:
        actual = sha256_file(path)
    except OSError as exc:
        raise ModelError(f"{path}: cannot read model file: {exc.strerror}") from None
    if actual != card.sha256:
        raise ModelError(
            f"{path}: sha256 mismatch: the card says {card.sha256}, the file is {actual}; "
            "the model file was changed or corrupted, or the card was not updated"
        )


def list_models(repository: Path) -> list[str]:
    """Names of the models in a repository: the sub-folders that hold a model.yaml, sorted."""
    try:
        entries = sorted(repository.iterdir())
    except OSError as exc:
        raise ModelError(f"{repository}: cannot read the model repository: {exc.strerror}") from None
    return [p.name for p in entries if p.is_dir() and (p / CARD_FILE).is_file()]


DRIFT_KEY = "drift_reference"


def write_drift_reference(model_dir: Path, reference: dict[str, Any]) -> Path:
    """Put ``reference`` into ``model_dir``'s card as its ``drift_reference`` section, replacing any earlier one.

    The rest of the card is kept as written (comments included): the section is the card's last block. The
    new card is validated before it replaces the old one, atomically.
    """
    card_path = model_dir / CARD_FILE
    try:
        text = card_path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ModelError(f"{card_path}: cannot read model card: {exc.strerror}") from None
    kept = strip_drift_reference(text)
    block = yaml.safe_dump(
        {DRIFT_KEY: reference}, sort_keys=False, width=110, allow_unicode=False, default_flow_style=None
    )
    new_text = kept.rstrip("\n") + "\n" + block
    parse_card(yaml.safe_load(new_text), str(card_path))
    tmp = card_path.with_name(f".{CARD_FILE}.tmp")
    try:
        tmp.write_text(new_text, encoding="utf-8")
        os.replace(tmp, card_path)
    except OSError as exc:
        raise ModelError(f"{card_path}: cannot write model card: {exc.strerror}") from None
    return card_path


def strip_drift_reference(text: str) -> str:
    """A card's text without its top-level ``drift_reference`` block (the lines up to the next top-level key)."""
    out: list[str] = []
    skipping = False
    for line in text.splitlines(keepends=True):
        top_level = bool(line.strip()) and not line[0].isspace() and not line.startswith("#")
        if top_level:
            skipping = line.startswith(f"{DRIFT_KEY}:")
        if not skipping:
            out.append(line)
    return "".join(out)
