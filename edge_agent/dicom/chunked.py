"""A guard around pynetdicom's chunked C-STORE write: a disk that fills mid-transfer is 0xA700, not a hang.

With ``STORE_RECV_CHUNKED_DATASET`` pynetdicom writes each incoming dataset to a temp file from inside the
association's reactor thread. An ``OSError`` there (ENOSPC when the spool's file system fills during a large
transfer) ends that thread: the peer never gets a response and waits for its own time-out, and the partial
temp file stays, keeping the disk full (issue 8, disk faults). The guard catches the write error, removes the
partial file, reads the rest of the dataset's fragments without keeping them, and lets the C-STORE handler
answer it: ``take_write_error`` tells the handler that this dataset never reached the disk.
"""

from __future__ import annotations

import os
import threading
from contextlib import suppress
from typing import Any

from pynetdicom.dimse_messages import DIMSEMessage

_FAILED_ATTR = "_edge_agent_write_errno"
_GUARD_ATTR = "_edge_agent_guard"
_lock = threading.Lock()
_failed: dict[str, int] = {}  # temp-file path -> errno of the failed write


def _last_dataset_fragment(primitive: Any) -> bool:
    """True when the P-DATA holds the dataset's last fragment (PS3.8 E.2: bit 0 clear, bit 1 set)."""
    for _context_id, data in primitive.presentation_data_value_list:
        header = data[0]
        if not header & 1 and header & 2:
            return True
    return False


def install() -> None:
    """Wrap ``DIMSEMessage.decode_msg`` once per process."""
    original = DIMSEMessage.decode_msg
    if getattr(original, _GUARD_ATTR, False):
        return

    def decode_msg(self: DIMSEMessage, primitive: Any, assoc: Any = None) -> bool:
        if getattr(self, _FAILED_ATTR, None) is not None:
            return _last_dataset_fragment(primitive)  # the rest of a dataset that has nowhere to go
        try:
            return bool(original(self, primitive, assoc))
        except OSError as exc:
            file, path = self._data_set_file, self._data_set_path
            if file is None or path is None:
                raise
            with suppress(OSError):
                file.close()  # its flush fails the same way; the descriptor is closed all the same
            with suppress(OSError):
                os.unlink(str(path))
            code = exc.errno or 0
            setattr(self, _FAILED_ATTR, code)
            with _lock:
                _failed[str(path)] = code
            return _last_dataset_fragment(primitive)

    setattr(decode_msg, _GUARD_ATTR, True)
    DIMSEMessage.decode_msg = decode_msg  # type: ignore[method-assign]


def take_write_error(path: str) -> int | None:
    """The errno with which writing the dataset at ``path`` failed, or None; each failure is taken once."""
    with _lock:
        return _failed.pop(path, None)
