"""The rows the journal reads and writes, as typed records (no I/O)."""

from __future__ import annotations

from dataclasses import dataclass, field

from edge_agent.series import Arrival, SeriesState


@dataclass(frozen=True)
class Recorded:
    series_id: int
    instance_id: int
    revision: int
    new_series: bool
    replaced_spool_name: str | None  # a re-sent instance with new content replaces its earlier file: delete it
    reopened: bool  # the series had been closed and is open again under a new revision
    spool_name: str
    arrival: Arrival = Arrival.NEW
    # Seconds from the C-STORE's command to the instance durable on disk (the receive stage); set by the receiver.
    receive_seconds: float | None = None

    @property
    def identical(self) -> bool:
        """A re-send of the content already held: nothing changed, and ``spool_name`` is not referenced."""
        return self.arrival is Arrival.IDENTICAL


@dataclass(frozen=True)
class SeriesRow:
    id: int
    series_uid: str
    study_uid: str
    accession: str
    modality: str
    body_part: str
    sop_class_uid: str
    image_type: str
    series_description: str
    manufacturer: str
    calling_aet: str
    called_aet: str
    expected_count: int | None
    revision: int
    first_received: float
    last_received: float
    state: SeriesState
    route: str | None
    model: str | None
    note: str | None
    attempts: int = 0
    retry_at: float | None = None
    instance_count: int = 0  # instances held (not released)
    received_count: int = 0  # every instance the series has had, released or held


@dataclass(frozen=True)
class InstanceRow:
    id: int
    series_id: int
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    instance_number: int | None
    spool_name: str
    size_bytes: int
    received_at: float
    expected_count: int | None = None
    acquisition_number: int | None = None


@dataclass(frozen=True)
class Closing:
    """A series closed in one transaction: its row after the change and the instances it holds."""

    series: SeriesRow
    instances: list[InstanceRow]
    routed: bool


@dataclass
class Counts:
    by_series_state: dict[str, int] = field(default_factory=dict)
    outbox_pending: int = 0
    outbox_rejected: int = 0
    spool_bytes: int = 0
    spool_files: int = 0
