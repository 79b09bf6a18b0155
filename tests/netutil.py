"""Network helpers for tests."""

from __future__ import annotations

import socket
import threading

# Every port free_port has handed out in this process. Two calls in a row could otherwise return the same
# number (the first probe's port is free again once its socket closes, and the kernel may pick it again):
# a nats-server given one number for its client and monitor ports then fails with "address already in use".
_handed_out: set[int] = set()
_handing = threading.Lock()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it), never one handed out before here."""
    with _handing:
        while True:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((host, 0))
                port = int(s.getsockname()[1])
            if port not in _handed_out:
                _handed_out.add(port)
                return port
