"""YAML -> one typed, validated configuration object.

Every section is a pydantic model with ``extra="forbid"``: an unknown or misspelt key is an error
that names its path, never a value silently ignored or coerced (STYLE.md 1).
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Mapping
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictBool,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from edge_agent import privacy, tlsutil
from edge_agent.dicom.hosts import is_host_name, parse_host_entry, peer_address
from edge_agent.errors import ConfigError, TLSFileError
from edge_agent.logs import LogFormat

# The checkout's configs/agent.yaml when run from a clone; the box's config once installed (scripts/install).
_CHECKOUT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "configs" / "agent.yaml"
BOX_CONFIG_PATH = Path("/etc/edge-agent/agent.yaml")
DEFAULT_CONFIG_PATH = _CHECKOUT_CONFIG_PATH if _CHECKOUT_CONFIG_PATH.is_file() else BOX_CONFIG_PATH

# Secrets come from the environment so that they never need to be written into a YAML file
# that is world-readable or checked into configuration management.
SECRET_ENV = {
    "EDGE_AGENT_BUS_TOKEN": ("bus", "token"),
    "EDGE_AGENT_BUS_USER": ("bus", "user"),
    "EDGE_AGENT_BUS_PASSWORD": ("bus", "password"),
    "EDGE_AGENT_BUS_CREDENTIALS": ("bus", "credentials_file"),
}

DEFAULT_INFER_TIMEOUT_SECONDS = 30.0

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 6.2: 16 chars, no backslash, no control chars
_SUBJECT_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")


def _enum_value(kind: type[StrEnum], v: Any) -> Any:
    if isinstance(v, str):
        if v in {m.value for m in kind}:
            return kind(v)
        raise ValueError(f"{v!r} is not one of: {', '.join(m.value for m in kind)}")
    return v


class _Strict(BaseModel):
    # No .inf or .nan anywhere: an infinite timeout or window is a typo, and some (a stream's duplicate window)
    # would fail only later, where the broker is asked.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


def _check_ae(value: str) -> str:
    if not _AE_TITLE.match(value) or not value.strip():
        raise ValueError(f"{value!r} is not a valid AE title (1-16 printable characters, no backslash)")
    return value


def _check_host_entry(value: str) -> str:
    parse_host_entry(value)  # raises ValueError naming what is wrong
    return value


# One entry of dicom.calling_aet_hosts: an address, a network or a host name (see edge_agent.dicom.hosts).
HostEntryText = Annotated[str, AfterValidator(_check_host_entry)]


def _check_host(value: str) -> str:
    # is_host_name refuses a last label of digits, so a mistyped address (127.0.0.1.5) is not taken for a name.
    if peer_address(value) is None and not is_host_name(value):
        raise ValueError(f"{value!r} is neither an IP address nor a host name")
    return value


# An address to listen on or connect to: an IP address (0.0.0.0 / :: for every interface) or a host name.
HostText = Annotated[str, AfterValidator(_check_host)]


class DicomTLSConfig(_Strict):
    """DICOM TLS (PS3.15 B.12/B.13): TLS 1.2 or later on its own port. PEM files (relative: to the config file)."""

    port: Annotated[int, Field(ge=1, le=65535)] = 2762
    cert_file: Path
    key_file: Path
    # The CA that client certificates must chain to; with require_client_cert, a peer without one is refused.
    ca_file: Path | None = None
    require_client_cert: StrictBool = False
    # Serve TLS only: the plain port is not opened.
    only: StrictBool = False

    @field_validator("ca_file", "cert_file", "key_file", mode="before")
    @classmethod
    def _absolute(cls, v: Any, info: ValidationInfo) -> Any:
        return _config_path(v, info)

    @model_validator(mode="after")
    def _loads(self) -> DicomTLSConfig:
        if self.require_client_cert and self.ca_file is None:
            raise ValueError("require_client_cert needs ca_file (the CA client certificates must chain to)")
        try:
            tlsutil.server_context(self.cert_file, self.key_file, self.ca_file, self.require_client_cert)
        except TLSFileError as exc:
            raise ValueError(str(exc)) from None
        return self


class DicomConfig(_Strict):
    host: HostText = "0.0.0.0"
    port: Annotated[int, Field(ge=1, le=65535)] = 11112
    ae_title: str = "EDGE_AGENT"
    allowed_calling_aets: list[str] = Field(default_factory=list)
    # Optional: AE title -> the hosts it may call from. An AE not listed here may call from any host.
    # Entries: IP addresses, networks (10.1.2.0/24) or host names (resolved at start, then every minute).
    calling_aet_hosts: dict[str, list[HostEntryText]] = Field(default_factory=dict)
    max_associations: Annotated[int, Field(ge=1, le=1024)] = 16
    # The largest P-DATA PDU a peer may send (announced as Maximum Length Received); a longer declared
    # PDU aborts the association at its header. Data is streamed to disk, never buffered per PDU.
    max_pdu_bytes: Annotated[int, Field(ge=4096, le=64 * 2**20)] = 2**20
    # The largest dataset one C-STORE may carry (as received); above it the rest is read and dropped and
    # the answer is 0xA700. Also the cap on a Deflated dataset once inflated.
    max_dataset_bytes: Annotated[int, Field(ge=2**20, le=2**40)] = 2 * 2**30
    # Accept Deflated Explicit VR Little Endian (inflated in a stream, capped at max_dataset_bytes).
    accept_deflate: StrictBool = True
    # Storage SOP Class UIDs accepted; empty: every storage SOP class (a forwarding PACS sends whole studies:
    # what no route wants is recorded and released).
    sop_classes: list[str] = Field(default_factory=list)
    # Connections from one address at a time (associated or not): one host cannot take every slot.
    max_connections_per_host: Annotated[int, Field(ge=1, le=1024)] = 8
    # Connections that have not yet completed association negotiation, from all hosts together.
    max_pending_connections: Annotated[int, Field(ge=1, le=4096)] = 32
    # A connection must complete its A-ASSOCIATE-RQ within this (the ARTIM timer): a bare TCP connect (a
    # health check, a port scan, a slow-loris) holds no association slot and not for long.
    acse_timeout_seconds: Annotated[float, Field(gt=0)] = 10.0
    # Kept for configs that set it; the receiver has no DIMSE wait of its own (see network_timeout_seconds).
    dimse_timeout_seconds: Annotated[float, Field(gt=0)] = 60.0
    # An association that sends nothing for this long is aborted.
    network_timeout_seconds: Annotated[float, Field(gt=0)] = 60.0
    tls: DicomTLSConfig | None = None
    # 1: the receiver runs on a loop of the daemon's own process. More: that many receiver processes, each
    # with its own loop, spool writes and journal connection, handed the connections the daemon accepts
    # (edge_agent/dicom/receivers.py; README "Receiver processes" says when they pay).
    receiver_processes: Annotated[int, Field(ge=1, le=64)] = 1

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return _check_ae(v)

    @field_validator("allowed_calling_aets")
    @classmethod
    def _aes(cls, v: list[str]) -> list[str]:
        return [_check_ae(x) for x in v]

    @field_validator("sop_classes")
    @classmethod
    def _uids(cls, v: list[str]) -> list[str]:
        for uid in v:
            if not re.fullmatch(r"[0-9]+(\.[0-9]+)*", uid) or len(uid) > 64:
                raise ValueError(f"{uid!r} is not a UID (digits and dots, at most 64 characters)")
        return v

    @model_validator(mode="after")
    def _hosts_need_aet(self) -> DicomConfig:
        for aet in self.calling_aet_hosts:
            _check_ae(aet)
            if self.allowed_calling_aets and aet not in self.allowed_calling_aets:
                raise ValueError(f"calling_aet_hosts names {aet!r}, which is not in allowed_calling_aets")
        return self


class Retention(StrEnum):
    DELETE = "delete"
    KEEP = "keep"


class SpoolConfig(_Strict):
    # Below this many free bytes on the spool's file system the receiver answers 0xA700.
    min_free_bytes: Annotated[int, Field(ge=0)] = 1_000_000_000
    # After the finding is acknowledged by JetStream: delete the instances, or keep them for
    # ``retain_seconds`` (then delete). ``keep`` with 0 keeps them until an operator removes them.
    retention: Retention = Retention.DELETE
    retain_seconds: Annotated[float, Field(ge=0)] = 0.0

    @field_validator("retention", mode="before")
    @classmethod
    def _retention(cls, v: Any) -> Any:
        return _enum_value(Retention, v)


def resolve_config_path(v: Any, base_dir: Path | None) -> Any:
    """A path from the config, made absolute: a relative one is relative to ``base_dir`` (the config file's
    folder), or to the current folder for a config read from no file. Anything but a str or Path is left for
    the field's type check.
    """
    if isinstance(v, str):
        if not v.strip():
            raise ValueError("must not be empty")
        v = Path(v)
    if isinstance(v, Path) and not v.is_absolute():
        # abspath, not resolve(): '..' is folded but a symlink the operator chose is kept as written.
        v = Path(os.path.abspath(base_dir / v if base_dir is not None else v))
    return v


def _config_path(v: Any, info: ValidationInfo | None = None) -> Any:
    """resolve_config_path against the validation context's ``base_dir`` (set by load_config)."""
    context = info.context if info is not None and isinstance(info.context, Mapping) else {}
    base = context.get("base_dir")
    return resolve_config_path(v, Path(base) if base is not None else None)


def _tls_file(check: Callable[[Path], None], path: Path | None) -> Path | None:
    if path is not None:
        try:
            check(path)
        except TLSFileError as exc:
            raise ValueError(exc.message) from None
    return path


class BusTLSConfig(_Strict):
    """TLS to the NATS server; mutual TLS when cert_file and key_file are given. PEM files (relative: to the config
    file)."""

    # The CA the server's certificate must chain to; unset: the system's CA store.
    ca_file: Path | None = None
    # The client certificate (and its chain) and its unencrypted key, for a server with `verify: true`.
    cert_file: Path | None = None
    key_file: Path | None = None
    # The name the server's certificate must carry, when it is not the host in bus.url (an IP address, say).
    server_name: str | None = None
    # TLS from the first byte (nats-server `tls { handshake_first: true }`), instead of after the server's
    # plain-text INFO: a server that does not speak TLS then fails the handshake instead of being talked to in
    # clear (nats-py upgrades only when the server's INFO asks for TLS).
    handshake_first: StrictBool = False

    @field_validator("ca_file", "cert_file", "key_file", mode="before")
    @classmethod
    def _absolute(cls, v: Any, info: ValidationInfo) -> Any:
        return _config_path(v, info)

    @field_validator("ca_file")
    @classmethod
    def _ca(cls, v: Path | None) -> Path | None:
        return _tls_file(tlsutil.check_certificate_file, v)

    @field_validator("cert_file")
    @classmethod
    def _cert(cls, v: Path | None) -> Path | None:
        return _tls_file(tlsutil.check_certificate_file, v)

    @field_validator("key_file")
    @classmethod
    def _key(cls, v: Path | None) -> Path | None:
        return _tls_file(tlsutil.check_key_file, v)

    @field_validator("server_name")
    @classmethod
    def _server_name(cls, v: str | None) -> str | None:
        if v is not None and not is_host_name(v) and peer_address(v) is None:
            raise ValueError(f"{v!r} is neither a host name nor an IP address")
        return v

    @model_validator(mode="after")
    def _loads(self) -> BusTLSConfig:
        # The files are readable and hold PEM (checked above); here OpenSSL loads them together, which also
        # finds a key that is not the certificate's and an encrypted key.
        try:
            tlsutil.client_context(self.ca_file, self.cert_file, self.key_file)
        except TLSFileError as exc:
            raise ValueError(str(exc)) from None
        return self


class BusConfig(_Strict):
    url: str = "nats://127.0.0.1:4222"
    stream: str = "EDGE_FINDINGS"
    subject_prefix: str = "edge.findings"
    publish_timeout_seconds: Annotated[float, Field(gt=0)] = 5.0
    reconnect_wait_seconds: Annotated[float, Field(gt=0)] = 1.0
    # JetStream's de-duplication window: a retried publish with the same Nats-Msg-Id inside it is dropped.
    duplicate_window_seconds: Annotated[float, Field(gt=0)] = 600.0
    max_age_days: Annotated[float, Field(gt=0)] = 14.0
    # A PubAck is not an fsync (JetStream syncs every 2 min by default): after an unclean stop, findings
    # acknowledged this recently are published again. Longer than the broker's sync interval, and inside the
    # duplicate window so that the stream drops the copies it kept.
    republish_window_seconds: Annotated[float, Field(ge=0)] = 180.0
    token: str | None = None
    user: str | None = None
    password: str | None = None
    credentials_file: str | None = None
    tls: BusTLSConfig | None = None

    @field_validator("credentials_file", mode="before")
    @classmethod
    def _credentials_file(cls, v: Any, info: ValidationInfo) -> Any:
        path = _config_path(v, info)
        if not isinstance(path, Path):
            return v
        try:
            with path.open("rb"):
                pass
        except OSError as exc:
            raise ValueError(f"cannot read {path}: {exc.strerror}") from None
        return str(path)

    @model_validator(mode="after")
    def _republish_inside_duplicate_window(self) -> BusConfig:
        if self.republish_window_seconds > self.duplicate_window_seconds:
            raise ValueError(
                "republish_window_seconds must not exceed duplicate_window_seconds: the stream would keep "
                "both copies of a finding re-published after an unclean stop"
            )
        return self

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        for part in v.split(","):
            # A token or user:password in the URL stays out of the message (it is printed and logged).
            # Everything up to the last "@": a password may hold "/", "@" or spaces.
            shown = re.sub(r"//.*@", "//***@", part.strip())
            found = re.match(r"^(nats|tls|ws|wss)://(?:[^\s/@]*@)?(\[[0-9A-Fa-f:.]+\]|[^\s/:@\[\]]+)(?::(\d+))?/?$",
                             part.strip())
            if not found:
                raise ValueError(f"{shown!r} is not a NATS URL like nats://host:4222")
            host, port = found.group(2).strip("[]"), found.group(3)
            if peer_address(host) is None and not is_host_name(host):
                raise ValueError(f"{shown!r}: {host!r} is neither an IP address nor a host name")
            if port is not None and not 1 <= int(port) <= 65535:
                raise ValueError(f"{shown!r}: port {port} is not between 1 and 65535")
        return v

    @field_validator("stream")
    @classmethod
    def _stream(cls, v: str) -> str:
        if not _SUBJECT_TOKEN.match(v):
            raise ValueError("stream names may hold only letters, digits, '-' and '_'")
        return v

    @field_validator("subject_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not all(_SUBJECT_TOKEN.match(t) for t in v.split(".")):
            raise ValueError(f"{v!r} is not a NATS subject prefix like edge.findings")
        return v

    @model_validator(mode="after")
    def _auth(self) -> BusConfig:
        if (self.user is None) != (self.password is None):
            raise ValueError("user and password go together")
        return self

    @model_validator(mode="after")
    def _tls_needs_tcp(self) -> BusConfig:
        if self.tls is not None and any(u.strip().startswith("ws://") for u in self.url.split(",")):
            raise ValueError("bus.tls is set but bus.url uses ws://, which nats-py never encrypts; use wss://")
        return self


class HttpConfig(_Strict):
    host: HostText = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 9108


class PoolKind(StrEnum):
    PROCESS = "process"
    THREAD = "thread"


class PipelineConfig(_Strict):
    # Decoding and resizing are CPU work that holds the GIL much of the time (pydicom is Python): in
    # processes they run beside the receiver's threads instead of taking turns with them.
    preprocess_workers: Annotated[int, Field(ge=1, le=256)] = 2
    preprocess_pool: PoolKind = PoolKind.PROCESS
    drain_timeout_seconds: Annotated[float, Field(ge=0)] = 30.0
    # A series whose quiet time has passed is complete; a route may override this.
    default_quiet_seconds: Annotated[float, Field(ge=0)] = 5.0
    # Back-pressure (issue 9): instances received and not yet inferred wait on the spool, not in memory. Above
    # this many the receiver answers C-STORE with 0xA700 (Out of Resources) and /readyz says why; it accepts
    # again once half of them have been inferred.
    max_pending_instances: Annotated[int, Field(ge=2, le=1_000_000)] = 2000
    # How much lower than the receiver preprocessing and inference run (Linux niceness, 0-19): where they compete
    # for few cores, a sender is answered first and the backlog waits on the spool (bounded by the above). Not for
    # the engines of models that an urgent route names.
    inference_niceness: Annotated[int, Field(ge=0, le=19)] = 10

    @field_validator("preprocess_pool", mode="before")
    @classmethod
    def _pool(cls, v: Any) -> Any:
        return _enum_value(PoolKind, v)


class ModelDeployment(_Strict):
    """How one model of the repository is run here (the card says what the model is)."""

    max_batch: Annotated[int, Field(ge=1, le=1024)] = 8
    max_queue_delay_ms: Annotated[float, Field(ge=0, le=60_000)] = 5.0
    # An engine call that has not returned after this long fails its batch with EngineTimeoutError (transient)
    # and the model is reported as having a problem until the call returns. The call's thread cannot be
    # stopped, so while it is out later batches fail at once instead of queueing behind it.
    infer_timeout_seconds: Annotated[float, Field(gt=0)] = DEFAULT_INFER_TIMEOUT_SECONDS
    # tensorrt | onnxruntime | auto (TensorRT when it and a GPU are there, else ONNX Runtime; logged).
    backend: str = "onnxruntime"
    intra_op_threads: Annotated[int, Field(ge=0, le=256)] = 0
    # TensorRT: the precision to build (unset: fp32), and whether start-up may build a missing plan.
    # Off by default: a build takes minutes, longer than a service manager waits for start-up;
    # `edge-agent build-engine MODEL` builds it beforehand.
    precision: str | None = None
    allow_build: bool = False
    workspace_bytes: Annotated[int, Field(ge=1 << 24, le=1 << 40)] = 2 << 30
    # INT8 on TensorRT 10: a folder of representative DICOM files, preprocessed like live traffic.
    calibration_dir: Path | None = None
    # Compare with ONNX Runtime on the CPU at start-up; a mismatch leaves the daemon not ready.
    verify_at_start: bool = False
    verify_max_abs_diff: Annotated[float | None, Field(gt=0)] = None
    # One of the card's operating_points (e.g. "triage", "high_specificity"); unset: the card's own thresholds.
    operating_point: str | None = None

    @field_validator("backend")
    @classmethod
    def _backend(cls, v: str) -> str:
        if v not in {"onnxruntime", "tensorrt", "tensorrt-rtx", "auto"}:
            raise ValueError(f"unknown backend {v!r}; one of: onnxruntime, tensorrt, tensorrt-rtx, auto")
        return v

    @field_validator("precision")
    @classmethod
    def _precision(cls, v: str | None) -> str | None:
        if v is not None and v not in {"fp32", "fp16", "int8"}:
            raise ValueError(f"unknown precision {v!r}; one of: fp32, fp16, int8")
        return v

    @field_validator("calibration_dir", mode="before")
    @classmethod
    def _calibration_dir(cls, v: Any, info: ValidationInfo) -> Any:
        path = _config_path(v, info)
        if isinstance(path, Path) and not path.is_dir():
            raise ValueError(f"{path}: no such folder")
        return path


class Priority(StrEnum):
    URGENT = "urgent"
    ROUTINE = "routine"


class SliceRange(_Strict):
    min: Annotated[int, Field(ge=1)] = 1
    max: Annotated[int | None, Field(ge=1)] = None

    @model_validator(mode="after")
    def _order(self) -> SliceRange:
        if self.max is not None and self.max < self.min:
            raise ValueError(f"max ({self.max}) is below min ({self.min})")
        return self


class RouteMatch(_Strict):
    modality: list[str] = Field(default_factory=list)
    body_part: list[str] = Field(default_factory=list)
    sop_class: list[str] = Field(default_factory=list)
    image_type: list[str] = Field(default_factory=list)  # every listed value must be in ImageType
    series_description: str | None = None  # a regular expression, searched case-insensitively
    slices: SliceRange = Field(default_factory=SliceRange)

    @field_validator("series_description")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from exc
        return v

    @field_validator("modality", "body_part", "image_type")
    @classmethod
    def _upper(cls, v: list[str]) -> list[str]:
        return [x.upper() for x in v]

    @field_validator("sop_class")
    @classmethod
    def _uid(cls, v: list[str]) -> list[str]:
        for x in v:
            if not re.match(r"^[0-9]+(\.[0-9]+)*$", x):
                raise ValueError(f"{x!r} is not a SOP class UID")
        return v


class Route(_Strict):
    name: str
    match: RouteMatch = Field(default_factory=RouteMatch)
    model: str
    priority: Priority = Priority.ROUTINE
    quiet_seconds: Annotated[float | None, Field(ge=0)] = None
    # For senders that send one series per association: the association's release (A-RELEASE, not an abort)
    # ends the series it carried, without waiting for the quiet time.
    complete_on_release: bool = False

    @field_validator("priority", mode="before")
    @classmethod
    def _priority(cls, v: Any) -> Any:
        return _enum_value(Priority, v)


class HeatmapConfig(_Strict):
    # Heat maps are written as PNGs under <state_dir>/heatmaps/, named by finding id, for viewers.
    enabled: StrictBool = True
    retain_days: Annotated[float, Field(gt=0)] = 30.0


class DriftConfig(_Strict):
    # Each model's inputs and scores against its card's drift_reference (edge_agent/drift.py, issue 10): the
    # index is computed over the last window_images model inputs, once min_images of them are in.
    enabled: StrictBool = True
    window_images: Annotated[int, Field(ge=20, le=100_000)] = 500
    min_images: Annotated[int, Field(ge=10)] = 200

    @model_validator(mode="after")
    def _min_within_window(self) -> DriftConfig:
        if self.min_images > self.window_images:
            raise ValueError(f"min_images ({self.min_images}) must not exceed window_images ({self.window_images})")
        return self


class JournalConfig(_Strict):
    # Housekeeping deletes the rows of released instances and series, and acknowledged findings' payloads,
    # once they are this old: the journal is an index of work in flight, not an archive.
    prune_after_days: Annotated[float, Field(gt=0)] = 7.0


class LoggingConfig(_Strict):
    level: str = "INFO"
    # text: one line for a person; json: one JSON object per line, for journald and log shippers (edge_agent/logs.py).
    format: LogFormat = LogFormat.TEXT

    @field_validator("format", mode="before")
    @classmethod
    def _format(cls, v: Any) -> Any:
        return _enum_value(LogFormat, v)

    @field_validator("level")
    @classmethod
    def _level(cls, v: str) -> str:
        if v.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError(f"{v!r} is not a log level (DEBUG, INFO, WARNING, ERROR, CRITICAL)")
        return v.upper()


class PrivacyConfig(_Strict):
    """Pseudonyms on the bus (issue 10): UIDs, accession numbers and AE titles replaced by keyed HMACs."""

    pseudonymise: StrictBool = False
    # The key: this file's bytes (readable by the service only; relative: to the config file), else the environment
    # variable EDGE_AGENT_PRIVACY_KEY. Never a key in the YAML; at least 32 bytes (openssl rand -hex 32).
    key_file: Path | None = None
    _pseudonymiser: privacy.Pseudonymiser | None = PrivateAttr(default=None)

    @field_validator("key_file", mode="before")
    @classmethod
    def _absolute(cls, v: Any, info: ValidationInfo) -> Any:
        return _config_path(v, info)

    @model_validator(mode="after")
    def _key(self, info: ValidationInfo) -> PrivacyConfig:
        if self.pseudonymise:
            context = info.context if isinstance(info.context, Mapping) else {}
            env = context.get("env", os.environ)
            try:
                self._pseudonymiser = privacy.Pseudonymiser(privacy.read_key(self.key_file, env))
            except privacy.PrivacyKeyError as exc:
                raise ValueError(str(exc)) from None
        return self

    @property
    def pseudonymiser(self) -> privacy.Pseudonymiser | None:
        """The keyed pseudonymiser when ``pseudonymise`` is on (its key was checked with the config), else None."""
        return self._pseudonymiser


class AgentConfig(_Strict):
    site: str
    state_dir: Path
    model_repository: Path = Field(default=Path("engines"), validate_default=True)
    dicom: DicomConfig = Field(default_factory=DicomConfig)
    spool: SpoolConfig = Field(default_factory=SpoolConfig)
    bus: BusConfig = Field(default_factory=BusConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    models: dict[str, ModelDeployment] = Field(default_factory=dict)
    routes: list[Route] = Field(default_factory=list)
    heatmaps: HeatmapConfig = Field(default_factory=HeatmapConfig)
    drift: DriftConfig = Field(default_factory=DriftConfig)
    journal: JournalConfig = Field(default_factory=JournalConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)

    @field_validator("site")
    @classmethod
    def _site(cls, v: str) -> str:
        if not _SUBJECT_TOKEN.match(v):
            raise ValueError(f"{v!r} must be one NATS subject token: letters, digits, '-' and '_'")
        return v

    @field_validator("state_dir", "model_repository", mode="before")
    @classmethod
    def _path(cls, v: Any, info: ValidationInfo) -> Any:
        return _config_path(v, info)

    @model_validator(mode="after")
    def _ports_apart(self) -> AgentConfig:
        dicom = {self.dicom.port} | ({self.dicom.tls.port} if self.dicom.tls is not None else set())
        if self.http.port in dicom:
            raise ValueError(f"http.port {self.http.port} is also a DICOM port (dicom.port / dicom.tls.port): "
                             "the second to bind would fail")
        return self

    def model_names(self) -> list[str]:
        """Every model a route names, in route order, without repeats."""
        return list(dict.fromkeys(r.model for r in self.routes))

    def deployment(self, model: str) -> ModelDeployment:
        return self.models.get(model, ModelDeployment())


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _message(err: Mapping[str, Any]) -> str:
    msg = str(err.get("msg", "invalid"))
    if err.get("type") == "extra_forbidden":
        return "unknown key"
    if err.get("type") == "missing":
        return "required key is missing"
    return msg.removeprefix("Value error, ")


def _did_you_mean(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _unknown_key_hints(problems: list[tuple[str, str]], raw: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Add a 'did you mean' to unknown keys, using the names the model at that path knows."""
    out = []
    for path, msg in problems:
        if msg == "unknown key":
            parent, _, key = path.rpartition(".")
            model = _model_at(parent)
            if model is not None:
                msg += _did_you_mean(re.sub(r"\[\d+\]$", "", key), list(model.model_fields))
        out.append((path, msg))
    return out


def _model_at(path: str) -> type[BaseModel] | None:
    model: type[BaseModel] = AgentConfig
    if not path:
        return model
    for part in path.split("."):
        name = re.sub(r"\[\d+\]$", "", part)
        field = model.model_fields.get(name)
        if field is None:
            return None
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        cand = [a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not cand:
            return None
        model = cand[0]
    return model


def apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """Environment variables override secrets (and only secrets) of the YAML."""
    out = dict(raw)
    for var, (section, key) in SECRET_ENV.items():
        if var in env:
            sec = out.get(section)
            sec = dict(sec) if isinstance(sec, Mapping) else {}
            sec[key] = env[var]
            out[section] = sec
    return out


def parse_config(
    raw: Any, source: str = "", env: Mapping[str, str] | None = None, base_dir: Path | None = None
) -> AgentConfig:
    """Validate an already-parsed YAML document. Raises ConfigError naming every bad field.

    Relative paths in it are relative to ``base_dir`` (the config file's folder), or to the current folder.
    """
    if not isinstance(raw, dict):
        raise ConfigError([("", "the configuration must be a YAML mapping")], source)
    raw = apply_env(raw, os.environ if env is None else env)
    try:
        # The environment reaches validators through the context (the privacy key may be EDGE_AGENT_PRIVACY_KEY).
        config = AgentConfig.model_validate(
            raw, context={"env": os.environ if env is None else env, "base_dir": base_dir}
        )
    except ValidationError as exc:
        problems = [(_loc(e["loc"]), _message(e)) for e in exc.errors()]
        raise ConfigError(_unknown_key_hints(problems, raw), source) from None
    return config


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key that appears twice in one mapping: PyYAML keeps the last silently, so a
    second ``dicom:`` block appended to change the port would drop the first's allowed AE titles and hosts."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                twice = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: the constructor below names it
                continue
            if twice:
                raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} appears twice in one mapping",
                                                        key_node.start_mark)
        return super().construct_mapping(node, deep)


def load_yaml(text: str) -> Any:
    """A YAML document, as ``yaml.safe_load`` reads it but with every key of a mapping unique (else a YAMLError)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no arbitrary objects


def read_config_file(path: Path) -> Any:
    """The YAML document in ``path`` (an empty file is an empty mapping). ConfigError if unreadable or not YAML."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([("", f"cannot read config: {exc.strerror}")], str(path)) from None
    try:
        raw = load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ConfigError([("", f"{where}not valid YAML: {getattr(exc, 'problem', exc)}")], str(path)) from None
    return raw if raw is not None else {}


def config_base_dir(path: Path) -> Path:
    """The folder relative paths in the config file ``path`` are relative to."""
    return path.resolve().parent


def raw_path(raw: Any, key: str, base_dir: Path) -> Path | None:
    """A top-level path key of a raw (perhaps invalid) document, resolved as validation would; None if unusable."""
    value = raw.get(key, AgentConfig.model_fields[key].default) if isinstance(raw, Mapping) else None
    try:
        path = resolve_config_path(value, base_dir)
    except ValueError:
        return None
    return path if isinstance(path, Path) else None


def load_config(path: Path | str, env: Mapping[str, str] | None = None) -> AgentConfig:
    """Read and validate a YAML config file. Relative paths in it are relative to the file."""
    path = Path(path)
    return parse_config(read_config_file(path), str(path), env, base_dir=config_base_dir(path))


def model_reference_problems(raw: Any, available: list[str]) -> list[tuple[str, str]]:
    """Routes and model deployments that name no model of the repository, and route names used twice.

    Works on the raw document too, so that these are reported beside schema errors, not after they are fixed:
    an entry that is not a mapping, or a name that is not a string, is the schema's to report and skipped here.
    """
    problems = []
    routes = raw.get("routes") if isinstance(raw, Mapping) else None
    routes = routes if isinstance(routes, list) else []
    seen: set[str] = set()
    for i, route in enumerate(routes):
        if not isinstance(route, Mapping):
            continue
        model = route.get("model")
        if isinstance(model, str) and model not in available:
            problems.append((f"routes[{i}].model", f"no model {model!r}" + _did_you_mean(model, available)))
        name = route.get("name")
        if isinstance(name, str):
            if name in seen:
                problems.append((f"routes[{i}].name", f"route name {name!r} is used twice"))
            seen.add(name)
    models = raw.get("models") if isinstance(raw, Mapping) else None
    for name in models if isinstance(models, Mapping) else {}:
        if isinstance(name, str) and name not in available:
            problems.append((f"models.{name}", f"no model {name!r}" + _did_you_mean(name, available)))
    return problems


def check_models(config: AgentConfig, available: list[str]) -> None:
    """Cross-check routes and model deployments against the models in the repository."""
    raw = {"routes": [{"name": r.name, "model": r.model} for r in config.routes], "models": dict(config.models)}
    problems = model_reference_problems(raw, available)
    if problems:
        raise ConfigError(problems)
