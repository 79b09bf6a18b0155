"""What pydicom logs or warns quotes element values: a Series Instance UID that breaks the UI rules (a component with
a leading zero, common from real modalities) comes back as "Invalid value for VR UI: '<the UID>'". Its text is
withheld wherever the daemon logs: its own process, receiver processes and preprocessing workers (real receiver,
real pynetdicom SCU, real worker processes; stderr read at the file descriptor)."""

from __future__ import annotations

import asyncio
import io
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRBigEndian
from pynetdicom import AE

from edge_agent.dicom.pixels import decode_frames
from edge_agent.logs import WithheldText, withhold_library_text
from edge_agent.workers import WorkerPool
from tests.dicomfiles import MR_SMALL_BIG_ENDIAN, running_receiver

# Not a conformant UID (a component starts with 0), as some modalities write them.
ODD_UID = "1.2.826.0.1.3680043.8.498.0123456789"


@pytest.fixture
def daemon_log() -> Iterator[io.StringIO]:
    """The root logger's handler as ``logs.setup_logging`` makes it, with Python's warnings captured."""
    out = io.StringIO()
    handler = withhold_library_text(logging.StreamHandler(out))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    try:
        yield out
    finally:
        logging.captureWarnings(False)
        root.removeHandler(handler)
        root.setLevel(level)


def odd_uid_file(tmp_path: Path) -> Path:
    """A Big Endian MR (its header is read with pydicom, not the receiver's own scanner) with ``ODD_UID``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the UID as it is set and written
        ds = pydicom.dcmread(MR_SMALL_BIG_ENDIAN)
        ds.SeriesInstanceUID = ODD_UID
        path = tmp_path / "odd-uid.dcm"
        ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("processes", [1, 2])
def test_a_received_instance_s_uid_never_reaches_the_log(tmp_path: Path, processes: int, daemon_log: io.StringIO,
                                                         capfd: pytest.CaptureFixture[str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(odd_uid_file(tmp_path))
    with running_receiver(tmp_path, receiver_processes=processes) as rx:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(ds.SOPClassUID, ExplicitVRBigEndian)
        assoc = ae.associate("127.0.0.1", rx.receiver.port, ae_title="EDGE_AGENT")
        assert assoc.is_established
        status = assoc.send_c_store(ds)
        assoc.release()
        assert status.Status == 0x0000  # stored: the warning is about form, not a reason to refuse
        assert rx.stored.wait_for(1)
    said = daemon_log.getvalue() + "".join(capfd.readouterr())
    assert ODD_UID not in said
    assert "pydicom logged a warning message; its text is withheld" in said  # it did warn, and it is said so


def test_a_worker_decoding_it_keeps_the_uid_out_of_its_stderr(tmp_path: Path,
                                                             capfd: pytest.CaptureFixture[str]) -> None:
    path = odd_uid_file(tmp_path)

    async def main() -> tuple[int, str]:
        pool = WorkerPool(1, processes=True)
        try:
            return len(await pool.run(decode_frames, path)), await pool.run(series_uid, path)
        finally:
            pool.shutdown()

    assert asyncio.run(main()) == (1, ODD_UID)
    err = capfd.readouterr().err
    assert ODD_UID not in err
    # pydicom both logged and warned in the worker, and both were withheld.
    assert "pydicom logged a warning message; its text is withheld" in err
    assert "pydicom warned (UserWarning); its text is withheld" in err


def series_uid(path: Path) -> str:
    """pydicom's own reading of a value, in a worker: it logs and warns about a UID that breaks the rules."""
    return str(pydicom.dcmread(path).SeriesInstanceUID)


def test_other_libraries_and_edge_agent_s_own_lines_pass_as_they_are() -> None:
    keep = WithheldText()
    own = logging.LogRecord("edge_agent.pipeline", logging.WARNING, __file__, 1, "series %d deferred", (3,), None)
    onnx = logging.LogRecord("py.warnings", logging.WARNING, __file__, 1,
                             "/venv/onnxruntime/capi/x.py:12: UserWarning: provider not found\n", None, None)
    pyd = logging.LogRecord("py.warnings", logging.WARNING, __file__, 1,
                            f"/venv/pydicom/valuerep.py:440: UserWarning: Invalid value for VR UI: '{ODD_UID}'\n",
                            None, None)
    for record in (own, onnx, pyd):
        assert keep.filter(record)
    assert own.getMessage() == "series 3 deferred"
    assert onnx.getMessage().endswith("provider not found\n")
    assert pyd.getMessage() == "pydicom warned (UserWarning); its text is withheld (it may quote DICOM element values)"
