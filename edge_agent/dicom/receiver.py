"""The DICOM receiver: a pynetdicom Storage SCP that lands instances in the spool and the journal.

pynetdicom runs each association in its own thread; the handlers here run in those threads. They
are total: every outcome is a named status (status.py) and a metric, never a raised exception.
A Success is answered only once the instance is fsynced in the spool and its journal row is
committed (PS3.4 Annex B.2.3: after Success the sender may delete its copy).

pynetdicom streams each received dataset into a temp file in ``tempfile.gettempdir()``. Point that
at ``Spool.tmp_dir`` (TMPDIR, or ``tempfile.tempdir`` before start) and storing is a rename on the
same file system; elsewhere it is a copy, and /tmp may be RAM.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    MRImageStorage,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    MultiFrameSingleBitSecondaryCaptureImageStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    SecondaryCaptureImageStorage,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from edge_agent.config import DicomConfig
from edge_agent.dicom import chunked, status
from edge_agent.dicom.header import check_sop_class, read_meta
from edge_agent.dicom.spool import Spool
from edge_agent.errors import EdgeAgentError
from edge_agent.journal import InstanceMeta, Journal, Recorded
from edge_agent.metrics import Metrics

logger = logging.getLogger(__name__)

STORAGE_SOP_CLASSES: tuple[UID, ...] = (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    CTImageStorage,
    EnhancedCTImageStorage,
    MRImageStorage,
    EnhancedMRImageStorage,
    SecondaryCaptureImageStorage,
    MultiFrameSingleBitSecondaryCaptureImageStorage,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
)

# Every syntax our decoders (pydicom + pylibjpeg) read. Instances are stored as received, so
# accepting a compressed syntax costs nothing here and spares the modality a transcode.
TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)

# A-ASSOCIATE-RJ (PS3.8 9.3.4): rejected-permanent, service-user, calling AE title not recognised.
_REJECT_CALLING_AET = (0x01, 0x01, 0x03)
# rejected-transient, service-provider (presentation), temporary congestion: we are shutting down.
_REJECT_STOPPING = (0x02, 0x03, 0x01)
# socketserver's default poll of 0.5 s would delay every stop() by up to that much.
_SERVE_POLL_SECONDS = 0.05

OnStored = Callable[[InstanceMeta, Recorded], None]


def _configure_pynetdicom() -> None:
    # Stream each dataset to a temp file instead of holding it in memory: a CR is ~10 MB, and up to
    # max_associations of them arrive at once. The file is a Part 10 file (preamble, File Meta with
    # the negotiated transfer syntax, the dataset bytes as received), ready for the spool.
    _config.STORE_RECV_CHUNKED_DATASET = True
    chunked.install()
    # pynetdicom's standard PDU/DIMSE log handlers print AE titles and UIDs; we log our own lines.
    _config.LOG_HANDLER_LEVEL = "none"


def _same_host(peer: str, allowed: list[str]) -> bool:
    try:
        addr = ipaddress.ip_address(peer)
    except ValueError:
        return peer in allowed
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    for host in allowed:
        try:
            if ipaddress.ip_address(host) == addr:
                return True
        except ValueError:
            if host == peer:
                return True
    return False


class Receiver:
    """The Storage SCP. ``start()`` binds and serves in background threads; ``stop()`` drains."""

    def __init__(self, config: DicomConfig, spool: Spool, journal: Journal, metrics: Metrics,
                 on_stored: OnStored) -> None:
        self._config = config
        self._spool = spool
        self._journal = journal
        self._metrics = metrics
        self._on_stored = on_stored
        self._ae: AE | None = None
        self._server: ThreadedAssociationServer | None = None
        self._thread: threading.Thread | None = None
        self._accepting = False
        self._stopping = threading.Lock()

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        """Bind config.host:config.port and serve. Raises EdgeAgentError if the port cannot be bound."""
        if self._server is not None:
            raise EdgeAgentError("the DICOM receiver is already running")
        _configure_pynetdicom()
        cfg = self._config
        ae = AE(ae_title=cfg.ae_title)
        ae.maximum_associations = cfg.max_associations
        ae.maximum_pdu_size = cfg.max_pdu_bytes
        ae.acse_timeout = cfg.acse_timeout_seconds
        ae.dimse_timeout = cfg.dimse_timeout_seconds
        ae.network_timeout = cfg.network_timeout_seconds
        ae.add_supported_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian])
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
        handlers: list[evt.EventHandlerType] = [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        try:
            server = ae.make_server((cfg.host, cfg.port), evt_handlers=handlers,
                                    server_class=ThreadedAssociationServer)
        except OSError as exc:
            raise EdgeAgentError(
                f"cannot listen for DICOM on {cfg.host}:{cfg.port}: {exc.strerror or exc} "
                "(is another DICOM service using the port? see dicom.host / dicom.port)"
            ) from exc
        # What ae.start_server(block=False) does, with a shorter poll. The AE must know the server:
        # its maximum_associations check counts the associations of ae._servers.
        ae._servers.append(server)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": _SERVE_POLL_SECONDS},
                                  name="dicom-acceptor", daemon=True)
        thread.start()
        self._ae, self._server, self._thread = ae, server, thread
        self._accepting = True
        logger.info("DICOM receiver listening on %s:%d as %s", cfg.host, self.port, cfg.ae_title)

    @property
    def port(self) -> int:
        """The bound TCP port."""
        if self._server is None:
            raise EdgeAgentError("the DICOM receiver is not running")
        return int(self._server.server_address[1])

    @property
    def accepting(self) -> bool:
        return self._server is not None and self._accepting

    def active_associations(self) -> int:
        return len(self._server.active_associations) if self._server is not None else 0

    def stop(self, timeout_seconds: float) -> None:
        """Stop accepting, let running associations finish for up to ``timeout_seconds``, then abort the rest."""
        # A second caller (a second signal, the owner's finally) waits for the first, then finds nothing to do.
        with self._stopping:
            server, self._accepting = self._server, False
            if server is None:
                return
            # Close the listening socket first: a new peer gets "connection refused" and tries later.
            # One that got in just before is refused in _on_requested (self._accepting is False).
            server.shutdown()
            if self._thread is not None:
                self._thread.join()
            deadline = time.monotonic() + timeout_seconds
            running: list[Association] = list(server.active_associations)
            for assoc in running:
                assoc.join(max(0.0, deadline - time.monotonic()))
            left = [a for a in running if a.is_alive()]
            for assoc in left:
                assoc.abort()
            self._server = self._thread = self._ae = None
            logger.info("DICOM receiver stopped: %d associations finished, %d aborted",
                        len(running) - len(left), len(left))

    # -- association handlers (association threads) ----------------------------------------------

    def _on_conn_open(self, event: Event) -> None:
        # Nagle plus delayed ACKs hold each small C-STORE-RSP for up to 40 ms.
        sock = event.assoc.dul.socket
        raw = sock.socket if sock is not None else None
        if raw is not None:
            try:
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError as exc:
                logger.debug("cannot set TCP_NODELAY: %s", exc.strerror)

    def _reject(self, event: Event, reason: tuple[int, int, int], outcome: str, message: str) -> None:
        self._metrics.associations.labels(outcome=outcome).inc()
        # Peer-supplied AE titles and addresses stay out of the log (they identify sites and people).
        logger.warning("association rejected: %s", message)
        event.assoc.acse.send_reject(*reason)
        event.assoc.kill()

    def _on_requested(self, event: Event) -> None:
        try:
            if not self._accepting:
                self._reject(event, _REJECT_STOPPING, "rejected_busy", "the receiver is stopping")
                return
            cfg = self._config
            request = event.assoc.requestor.primitive
            # requestor.ae_title is only filled in after this event; the A-ASSOCIATE-RQ has it now.
            calling = str(request.calling_ae_title).strip() if request is not None else ""
            if cfg.allowed_calling_aets and calling not in cfg.allowed_calling_aets:
                self._reject(event, _REJECT_CALLING_AET, "rejected_calling_aet", "calling AE not allowed")
                return
            hosts = cfg.calling_aet_hosts.get(calling)
            if hosts is not None and not _same_host(str(event.assoc.requestor.address), hosts):
                self._reject(event, _REJECT_CALLING_AET, "rejected_host", "calling AE not allowed from this host")
                return
        except Exception as exc:
            logger.error("association request check failed (%s); aborting", type(exc).__name__)
            event.assoc.abort()  # counted by _on_aborted

    def _on_accepted(self, event: Event) -> None:
        self._metrics.associations.labels(outcome="accepted").inc()

    def _on_rejected(self, event: Event) -> None:
        # Our own rejections (_reject) do not pass through here: pynetdicom fires EVT_REJECTED only
        # for its own, which with our settings is the maximum_associations limit.
        self._metrics.associations.labels(outcome="rejected_busy").inc()
        logger.warning("association rejected: %d associations already active", self._config.max_associations)

    def _on_aborted(self, event: Event) -> None:
        self._metrics.associations.labels(outcome="aborted").inc()
        logger.info("association aborted")

    def _on_echo(self, event: Event) -> int:
        return status.SUCCESS

    def _on_store(self, event: Event) -> int:
        """C-STORE: spool, journal, hand over, then Success. Never raises."""
        started = time.perf_counter()
        name: str | None = None
        committed = False
        try:
            src = Path(event.dataset_path)
            write_errno = chunked.take_write_error(str(src))
            if write_errno is not None:
                # The dataset never reached the disk (chunked.py): refuse it, the sender keeps it and retries.
                logger.warning("instance refused: receiving it failed (%s)", os.strerror(write_errno))
                full = write_errno in (errno.ENOSPC, errno.EDQUOT)
                return self._count(status.SPOOL_FULL if full else status.RECEIVE_FAILED)
            size_bytes = src.stat().st_size
            self._metrics.spool_free_bytes.set(self._spool.free_bytes())
            # The instance must fit above the watermark (if it already lies on the spool's file
            # system it is counted twice: erring towards refusing is the safe side).
            if not self._spool.has_room(size_bytes):
                logger.warning("instance refused: spool free space below the %d byte watermark",
                               self._spool.min_free_bytes)
                return self._count(status.SPOOL_FULL)
            assoc = event.assoc
            request = assoc.requestor.primitive
            called = str(request.called_ae_title) if request is not None else ""
            meta = read_meta(src, assoc.requestor.ae_title, called)
            check_sop_class(meta, str(event.request.AffectedSOPClassUID))
            name, size_bytes = self._spool.store(src)
            recorded = self._journal.record_instance(meta, name, size_bytes)
            committed = True
            if recorded.identical:
                # The same content as the instance held (a lost C-STORE-RSP, a PACS re-send): acknowledged, and
                # nothing changes (issue 8, defect 2). The new copy is not referenced; the sweep takes it if this fails.
                self._discard(name)
                logger.debug("identical re-send of a held instance; nothing changed")
                return self._count(status.STORED_DUPLICATE)
            if recorded.replaced_spool_name is not None:
                try:
                    self._spool.remove(recorded.replaced_spool_name)
                except OSError as exc:
                    # Harmless: the orphan sweep at the next start removes it.
                    logger.warning("cannot remove a replaced spool file: %s", exc.strerror)
            self._on_stored(meta, recorded)
            self._metrics.received_bytes.inc(size_bytes)
            self._metrics.stage_seconds.labels(stage="receive").observe(time.perf_counter() - started)
            logger.debug("stored instance as %s (%d bytes)", name, size_bytes)
            return self._count(status.STORED_REPLACED if recorded.replaced_spool_name else status.STORED)
        except Exception as exc:
            answer = status.answer_for(exc)
            if name is not None and not committed:
                self._discard(name)
            if committed:
                # The instance is durable and journalled; only the hand-over failed. A failure
                # status makes the sender retry, and the retry replaces this same row.
                logger.error("instance stored but not handed over (%s); answering 0x%04X",
                             type(exc).__name__, answer.status)
            else:
                logger.warning("instance refused with 0x%04X: %s", answer.status, _describe(exc))
            return self._count(answer)

    def _count(self, answer: status.Answer) -> int:
        self._metrics.instances.labels(outcome=answer.outcome).inc()
        return answer.status

    def _discard(self, name: str) -> None:
        try:
            self._spool.remove(name)
        except OSError as exc:
            logger.error("cannot remove an unjournalled spool file: %s", exc.strerror)


def _describe(exc: BaseException) -> str:
    """Our own errors carry messages written without patient data; others are named by type only."""
    if isinstance(exc, EdgeAgentError):
        return f"{type(exc).__name__}: {exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{type(exc).__name__}: {exc.strerror}"
    return type(exc).__name__
