"""dicom.calling_aet_hosts: addresses, networks and host names, resolved off the event loop."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import threading
from typing import Any

import pytest

from edge_agent.config import parse_config
from edge_agent.dicom.hosts import HostMatcher, is_host_name, parse_host_entry, peer_address
from edge_agent.errors import ConfigError


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


class FakeResolver:
    """A getaddrinfo whose answers a test sets: a list of addresses, or a gaierror errno."""

    def __init__(self, answers: dict[str, list[str] | int]) -> None:
        self.answers = answers
        self.calls = 0
        self.called = threading.Event()

    def __call__(self, host: str, port: Any, **_: Any) -> list[tuple[Any, ...]]:
        self.calls += 1
        self.called.set()
        answer = self.answers[host]
        if isinstance(answer, int):
            raise socket.gaierror(answer, "resolver says no")
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, 0)) for a in answer]


@pytest.mark.parametrize(
    ("text", "valid"),
    [
        ("ct1", True),
        ("ct1.radiology.example", True),
        ("ct1.radiology.example.", True),
        ("a-b.example", True),
        ("-ct.example", False),
        ("ct-.example", False),
        ("ct_1.example", False),
        ("ct 1", False),
        ("", False),
        ("a" * 64 + ".example", False),
        ("10.1.2.300", False),  # a mistyped address, not a name
        ("ct1..example", False),
    ],
)
def test_host_name_syntax(text: str, valid: bool) -> None:
    assert is_host_name(text) is valid


def test_entries_are_addresses_networks_or_names() -> None:
    assert parse_host_entry("10.1.2.7").network == ipaddress.ip_network("10.1.2.7/32")
    assert parse_host_entry("10.1.2.0/24").network == ipaddress.ip_network("10.1.2.0/24")
    assert parse_host_entry("fd00::/64").network == ipaddress.ip_network("fd00::/64")
    assert parse_host_entry("::ffff:10.1.2.7").network == ipaddress.ip_network("10.1.2.7/32")
    assert parse_host_entry("::ffff:10.1.2.0/120").network == ipaddress.ip_network("10.1.2.0/24")
    assert parse_host_entry("CT1.Radiology.example.").name == "ct1.radiology.example"
    for bad in ("10.1.2.5/24", "10.1.2.0/33", "ct 1", "10.1.2.300", "*.example"):
        with pytest.raises(ValueError):
            parse_host_entry(bad)


def test_peer_addresses_unwrap_ipv4_mapped_ipv6() -> None:
    assert peer_address("::ffff:10.1.2.7") == ipaddress.ip_address("10.1.2.7")
    assert peer_address("fe80::1%eth0") == ipaddress.ip_address("fe80::1")
    assert peer_address("not-an-address") is None


def test_addresses_and_networks_match_without_resolving() -> None:
    resolver = FakeResolver({})
    matcher = HostMatcher({"CT": ["10.1.2.7", "10.9.0.0/16", "fd00::/64"]}, getaddrinfo=resolver)
    assert matcher.allows("CT", "10.1.2.7")
    assert matcher.allows("CT", "::ffff:10.1.2.7")  # what a dual-stack socket reports for an IPv4 peer
    assert matcher.allows("CT", "10.9.200.1")
    assert matcher.allows("CT", "fd00::42")
    assert not matcher.allows("CT", "10.1.2.8")
    assert not matcher.allows("CT", "fd01::1")
    assert not matcher.allows("CT", "garbage")
    assert matcher.allows("MR", "192.0.2.1")  # an AE title without a host list may call from anywhere
    assert matcher.names == []
    run(matcher.refresh())
    assert resolver.calls == 0


def test_localhost_resolves_for_real_and_matches_its_addresses() -> None:
    matcher = HostMatcher({"CT": ["localhost"]})
    assert not matcher.allows("CT", "127.0.0.1")  # nothing is resolved before the first refresh
    run(matcher.refresh())
    found = matcher.addresses("localhost")
    assert ipaddress.ip_address("127.0.0.1") in found
    assert matcher.allows("CT", "127.0.0.1")
    assert matcher.allows("CT", "::ffff:127.0.0.1")
    assert not matcher.allows("CT", "192.0.2.1")
    if ipaddress.ip_address("::1") in found:
        assert matcher.allows("CT", "::1")


def test_refresh_blocking_resolves_localhost_from_a_thread() -> None:
    matcher = HostMatcher({"CT": ["LocalHost."]})
    worker = threading.Thread(target=matcher.refresh_blocking)
    worker.start()
    worker.join(30)
    assert matcher.allows("CT", "127.0.0.1")


def test_a_name_that_does_not_resolve_is_logged_once_and_matches_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edge_agent.dicom.hosts")
    resolver = FakeResolver({"gone.example": socket.EAI_NONAME, "ct1.example": ["10.1.2.7"]})
    matcher = HostMatcher({"CT": ["gone.example", "ct1.example"]}, getaddrinfo=resolver)

    async def main() -> None:
        await matcher.refresh()
        await matcher.refresh()

    run(main())
    assert matcher.allows("CT", "10.1.2.7")
    assert matcher.addresses("gone.example") == frozenset()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "gone.example does not resolve" in warnings[0]
    assert "matches no peer" in warnings[0]

    # It appears in DNS later: it matches, and that is said once too.
    resolver.answers["gone.example"] = ["10.1.2.8"]
    run(matcher.refresh())
    assert matcher.allows("CT", "10.1.2.8")
    assert any("resolves again" in r.getMessage() for r in caplog.records)


def test_a_resolver_outage_keeps_the_addresses_found_before_and_a_removed_name_loses_them() -> None:
    resolver = FakeResolver({"ct1.example": ["10.1.2.7"]})
    matcher = HostMatcher({"CT": ["ct1.example"]}, getaddrinfo=resolver)
    run(matcher.refresh())
    assert matcher.allows("CT", "10.1.2.7")
    resolver.answers["ct1.example"] = socket.EAI_AGAIN  # the DNS server did not answer
    run(matcher.refresh())
    assert matcher.allows("CT", "10.1.2.7")
    resolver.answers["ct1.example"] = socket.EAI_NONAME  # the name is gone
    run(matcher.refresh())
    assert not matcher.allows("CT", "10.1.2.7")


def test_a_renumbered_host_matches_its_new_address_only() -> None:
    resolver = FakeResolver({"ct1.example": ["10.1.2.7", "fd00::7"]})
    matcher = HostMatcher({"CT": ["ct1.example"]}, getaddrinfo=resolver)
    run(matcher.refresh())
    assert matcher.allows("CT", "fd00::7") and matcher.allows("CT", "10.1.2.7")
    resolver.answers["ct1.example"] = ["10.1.2.9"]
    run(matcher.refresh())
    assert matcher.allows("CT", "10.1.2.9")
    assert not matcher.allows("CT", "10.1.2.7") and not matcher.allows("CT", "fd00::7")


def test_a_lookup_that_hangs_does_not_hold_the_refresh() -> None:
    release = threading.Event()

    def hanging(host: str, port: Any, **_: Any) -> list[tuple[Any, ...]]:
        release.wait(30)
        raise socket.gaierror(socket.EAI_AGAIN, "late")

    matcher = HostMatcher({"CT": ["slow.example"]}, resolve_timeout_seconds=0.05, getaddrinfo=hanging)

    async def main() -> None:
        ticks = 0

        async def ticking() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        ticker = asyncio.create_task(ticking())
        try:
            await matcher.refresh()
        finally:
            ticker.cancel()
            release.set()
        assert ticks > 1  # the loop kept running while the lookup hung

    run(main())
    assert not matcher.allows("CT", "10.1.2.7")


def test_run_refresh_resolves_again_every_ttl() -> None:
    resolver = FakeResolver({"ct1.example": ["10.1.2.7"]})
    matcher = HostMatcher({"CT": ["ct1.example"]}, ttl_seconds=0.01, getaddrinfo=resolver)

    async def main() -> None:
        await matcher.refresh()
        resolver.answers["ct1.example"] = ["10.1.2.9"]
        resolver.called.clear()
        task = asyncio.create_task(matcher.run_refresh())
        try:
            while not matcher.allows("CT", "10.1.2.9"):
                await asyncio.get_running_loop().run_in_executor(None, resolver.called.wait, 5)
                await asyncio.sleep(0)  # let the refresh that made the call apply its answer
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    run(main())
    assert resolver.calls >= 2


def test_config_refuses_an_entry_that_is_not_an_address_network_or_name() -> None:
    raw = {"site": "a", "state_dir": "/s", "dicom": {"calling_aet_hosts": {
        "CT": ["10.1.2.7", "10.1.2.0/24", "ct1.radiology.example", "localhost", "ct 1"],
        "MR": ["10.1.2.5/24"],
    }}}
    with pytest.raises(ConfigError) as info:
        parse_config(raw, env={})
    problems = dict(info.value.problems)
    assert set(problems) == {"dicom.calling_aet_hosts.CT[4]", "dicom.calling_aet_hosts.MR[0]"}
    assert "neither an IP address, a network (10.1.2.0/24) nor a host name" in problems["dicom.calling_aet_hosts.CT[4]"]
    assert "host bits set" in problems["dicom.calling_aet_hosts.MR[0]"]

    raw["dicom"]["calling_aet_hosts"] = {"CT": ["10.1.2.0/24", "ct1.radiology.example"]}
    config = parse_config(raw, env={})
    assert config.dicom.calling_aet_hosts == {"CT": ["10.1.2.0/24", "ct1.radiology.example"]}
    HostMatcher(config.dicom.calling_aet_hosts)  # what the config accepts, the matcher accepts
