"""sd_notify(3) without libsystemd: READY, STATUS, STOPPING and WATCHDOG over $NOTIFY_SOCKET.

The protocol is one datagram of newline-separated ``KEY=VALUE`` lines to the AF_UNIX socket named
by $NOTIFY_SOCKET; a name starting with '@' is in the abstract namespace. Without $NOTIFY_SOCKET
(run by hand, in a container) every call is a no-op, so callers need no ``if systemd`` branches.

Heartbeats must come from the event loop's own tick, never a thread (STYLE.md 6): this class only
sends; deciding *when* to send WATCHDOG=1 belongs to the agent.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

logger = logging.getLogger(__name__)


class Notifier:
    """Sends service-manager notifications; does nothing when not started by systemd."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self._env = env
        name = env.get("NOTIFY_SOCKET", "")
        self._address: str | bytes | None
        if not name:
            self._address = None
        elif name.startswith("@"):
            # Abstract namespace: a leading NUL byte instead of '@' (sd_notify(3), unix(7)).
            self._address = b"\0" + name[1:].encode()
        elif name.startswith("/"):
            self._address = name
        else:
            logger.warning("NOTIFY_SOCKET is neither an absolute path nor '@abstract'; notifications disabled")
            self._address = None
        self._sock: socket.socket | None = None
        self._failed = False

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def ready(self, status: str = "") -> bool:
        """Tell systemd start-up is done (Type=notify units count as started only now)."""
        return self._send("READY=1" + (f"\nSTATUS={_one_line(status)}" if status else ""))

    def status(self, text: str) -> bool:
        """Set the free-form status line shown by ``systemctl status``."""
        return self._send(f"STATUS={_one_line(text)}")

    def stopping(self, status: str = "") -> bool:
        """Tell systemd a graceful shutdown has begun."""
        return self._send("STOPPING=1" + (f"\nSTATUS={_one_line(status)}" if status else ""))

    def watchdog(self) -> bool:
        """Keep-alive ping; send only while the daemon's health checks pass. A no-op unless WatchdogSec= is set."""
        if self.watchdog_interval_seconds() is None:
            return False
        return self._send("WATCHDOG=1")

    def watchdog_interval_seconds(self) -> float | None:
        """The watchdog timeout systemd enforces (WatchdogSec=), or None when there is none for us.

        Ping at half this interval or more often, as sd_watchdog_enabled(3) advises.
        """
        usec = self._env.get("WATCHDOG_USEC", "")
        try:
            value = int(usec)
        except ValueError:
            return None
        if value <= 0:
            return None
        pid = self._env.get("WATCHDOG_PID", "")
        if pid:
            # The variables are inherited by children; only the process systemd meant should ping.
            try:
                if int(pid) != os.getpid():
                    return None
            except ValueError:
                return None
        return value / 1_000_000

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _send(self, message: str) -> bool:
        if self._address is None:
            return False
        try:
            if self._sock is None:
                # Non-blocking: the caller is the event loop, which must never wait on a full socket buffer
                # (a reader that stopped reading); a dropped datagram is a missed ping, not a wedged daemon.
                self._sock = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
                )
            self._sock.sendto(message.encode(), self._address)
        except OSError as exc:
            # Never fatal: a missed READY makes systemd time the start out, which is the right signal.
            # Warn once, not on every watchdog tick.
            if not self._failed:
                logger.warning("sd_notify to NOTIFY_SOCKET failed: %s", exc.strerror or exc)
            self._failed = True
            return False
        self._failed = False
        return True


def _one_line(text: str) -> str:
    # A newline would start a new KEY=VALUE assignment in the datagram.
    return " ".join(text.split())
