"""Which hosts a calling AE title may connect from: IP addresses, networks and host names.

``dicom.calling_aet_hosts`` maps an AE title to entries such as ``10.1.2.7``, ``10.1.2.0/24``, ``fd00::/64``
or ``ct1.radiology.example``. Host names are resolved (every address getaddrinfo gives) by ``refresh()``,
at start and then every ``ttl_seconds``, never while an association is being checked: ``allows()`` only
looks up what the last refresh found, so it is cheap and safe from any thread. A name that does not resolve
is logged once as a warning and matches nothing until it does; it is not fatal.

IPv4-mapped IPv6 addresses (``::ffff:10.1.2.7``, what a dual-stack socket reports for an IPv4 peer) are
compared as the IPv4 address they carry.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import re
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_TTL_SECONDS = 60.0
# getaddrinfo cannot be cancelled; a refresh stops waiting for it after this long and keeps what it had.
DEFAULT_RESOLVE_TIMEOUT_SECONDS = 10.0

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
GetAddrInfo = Callable[..., list[tuple[Any, ...]]]

# RFC 1123 2.1 labels: letters, digits and hyphens, 1-63 characters, no hyphen at either end.
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
# getaddrinfo answers that say the name has no address (as opposed to a resolver that could not be asked).
_NO_SUCH_NAME = frozenset(
    getattr(socket, name) for name in ("EAI_NONAME", "EAI_NODATA", "EAI_ADDRFAMILY") if hasattr(socket, name)
)


def is_host_name(text: str) -> bool:
    """True if ``text`` is a syntactically valid DNS host name (RFC 1123; a trailing dot is allowed).

    A name whose last label is all digits is refused (RFC 3696 2): ``10.1.2.300`` is a mistyped address,
    not a name.
    """
    name = text[:-1] if text.endswith(".") else text
    if not name or len(name) > 253:
        return False
    labels = name.split(".")
    return all(_LABEL.match(label) for label in labels) and not labels[-1].isdigit()


@dataclass(frozen=True)
class HostEntry:
    """One parsed entry: exactly one of ``network`` (an address is a /32 or /128) and ``name`` is set."""

    text: str
    network: IPNetwork | None = None
    name: str | None = None


def parse_host_entry(text: str) -> HostEntry:
    """Parse an address, a network (``10.1.2.0/24``) or a host name. Raises ValueError for anything else.

    A network with host bits set (``10.1.2.5/24``) is refused rather than widened: the writer meant
    something, and it is not clear what.
    """
    entry = text.strip()
    if "/" in entry:
        try:
            network = ipaddress.ip_network(entry, strict=True)
        except ValueError as exc:
            raise ValueError(f"{text!r} is not a network like 10.1.2.0/24: {exc}") from None
        return HostEntry(text, network=_unmapped_network(network))
    try:
        address = _unmapped(ipaddress.ip_address(entry))
    except ValueError:
        pass
    else:
        return HostEntry(text, network=ipaddress.ip_network(address))
    if is_host_name(entry):
        return HostEntry(text, name=entry.rstrip(".").lower())
    raise ValueError(f"{text!r} is neither an IP address, a network (10.1.2.0/24) nor a host name")


def peer_address(peer_ip: str) -> IPAddress | None:
    """The peer's address as reported by a socket, IPv4-mapped IPv6 unwrapped; None if it is not one."""
    try:
        return _unmapped(ipaddress.ip_address(peer_ip.split("%", 1)[0]))
    except ValueError:
        return None


def _unmapped(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _unmapped_network(network: IPNetwork) -> IPNetwork:
    # ::ffff:10.1.2.0/120 is 10.1.2.0/24 in the notation peers are compared in.
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.ip_network(f"{mapped}/{network.prefixlen - 96}")
    return network


class HostMatcher:
    """Answers "may this AE title call from this address?" for ``dicom.calling_aet_hosts``.

    ``allowed`` maps AE titles to entries (see ``parse_host_entry``; invalid entries raise ValueError). An
    AE title not in it may call from any host. Call ``await refresh()`` once before serving, and keep
    ``run_refresh()`` running in a task its owner cancels at shutdown; or call ``refresh_blocking()`` from a
    thread of your own. ``allows()`` never resolves anything.
    """

    def __init__(
        self,
        allowed: Mapping[str, Sequence[str]],
        *,
        ttl_seconds: float = DEFAULT_TTL_SECONDS,
        resolve_timeout_seconds: float = DEFAULT_RESOLVE_TIMEOUT_SECONDS,
        getaddrinfo: GetAddrInfo = socket.getaddrinfo,
    ) -> None:
        self._entries = {aet: tuple(parse_host_entry(e) for e in entries) for aet, entries in allowed.items()}
        self.ttl_seconds = ttl_seconds
        self.resolve_timeout_seconds = resolve_timeout_seconds
        self._getaddrinfo = getaddrinfo
        self._names = sorted({e.name for entries in self._entries.values() for e in entries if e.name})
        # Replaced whole by each refresh, never changed in place: a reader in another thread sees the old
        # mapping or the new one.
        self._resolved: Mapping[str, frozenset[IPAddress]] = {}
        self._unresolved: set[str] = set()  # warned about; cleared when the name resolves again

    @property
    def names(self) -> list[str]:
        """The host names to resolve, lower case, sorted."""
        return list(self._names)

    def addresses(self, name: str) -> frozenset[IPAddress]:
        """What the last refresh found for ``name`` (empty if nothing)."""
        return self._resolved.get(name.rstrip(".").lower(), frozenset())

    def allows(self, calling_aet: str, peer_ip: str) -> bool:
        """True if ``calling_aet`` may call from ``peer_ip``: it has no host list, or an entry matches."""
        entries = self._entries.get(calling_aet)
        if entries is None:
            return True
        address = peer_address(peer_ip)
        if address is None:
            return False
        resolved = self._resolved
        for entry in entries:
            if entry.network is not None:
                if address in entry.network:
                    return True
            elif entry.name is not None and address in resolved.get(entry.name, ()):
                return True
        return False

    async def refresh(self) -> None:
        """Resolve every host name again, in the loop's default executor; the event loop is never blocked.

        A name whose lookup takes longer than ``resolve_timeout_seconds`` keeps its previous addresses.
        """
        if not self._names:
            return
        loop = asyncio.get_running_loop()
        lookups = {name: loop.run_in_executor(None, functools.partial(self._lookup, name)) for name in self._names}
        done, _ = await asyncio.wait(lookups.values(), timeout=self.resolve_timeout_seconds)
        results: dict[str, frozenset[IPAddress] | BaseException] = {}
        for name, future in lookups.items():
            if future in done:
                results[name] = future.exception() or future.result()
            else:
                future.cancel()  # stops waiting; the thread finishes its getaddrinfo on its own
                results[name] = TimeoutError(f"no answer within {self.resolve_timeout_seconds:g} s")
        self._apply(results)

    def refresh_blocking(self) -> None:
        """``refresh()`` for a thread that may block (one lookup after another)."""
        results: dict[str, frozenset[IPAddress] | BaseException] = {}
        for name in self._names:
            try:
                results[name] = self._lookup(name)
            except (OSError, UnicodeError) as exc:  # UnicodeError: a name IDNA cannot encode
                results[name] = exc
        self._apply(results)

    async def run_refresh(self) -> None:
        """Refresh every ``ttl_seconds`` until cancelled. Does nothing (but wait) when no entry is a name."""
        while True:
            await asyncio.sleep(self.ttl_seconds)
            await self.refresh()

    def _lookup(self, name: str) -> frozenset[IPAddress]:
        infos = self._getaddrinfo(name, None, type=socket.SOCK_STREAM)
        found: set[IPAddress] = set()
        for info in infos:
            address = peer_address(str(info[4][0]))
            if address is not None:
                found.add(address)
        return frozenset(found)

    def _apply(self, results: Mapping[str, frozenset[IPAddress] | BaseException]) -> None:
        resolved = dict(self._resolved)
        for name, result in results.items():
            if isinstance(result, BaseException):
                gone = isinstance(result, socket.gaierror) and result.errno in _NO_SUCH_NAME
                # A name that does not exist matches nothing. A resolver that could not be asked (a DNS
                # outage) does not lock modalities out: the last addresses found stay in use.
                if gone:
                    resolved.pop(name, None)
                if name not in self._unresolved:
                    self._unresolved.add(name)
                    logger.warning(
                        "calling_aet_hosts: host name %s does not resolve (%s); %s", name,
                        _describe(result), "it matches no peer" if name not in resolved
                        else "the addresses it had keep matching",
                    )
            elif not result:
                resolved.pop(name, None)
                if name not in self._unresolved:
                    self._unresolved.add(name)
                    logger.warning("calling_aet_hosts: host name %s has no address; it matches no peer", name)
            else:
                resolved[name] = result
                if name in self._unresolved:
                    self._unresolved.discard(name)
                    logger.info("calling_aet_hosts: host name %s resolves again", name)
        self._resolved = resolved


def _describe(exc: BaseException) -> str:
    if isinstance(exc, socket.gaierror) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
