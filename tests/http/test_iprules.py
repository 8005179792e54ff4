"""Who may call: allowlists (IPv4, IPv6), trusted proxies, forged X-Forwarded-For."""

from __future__ import annotations

from typing import Any

import pytest

from gateway import iprules
from gateway.service import ValidationError
from tests.conftest import ACCOUNT, LOGIN, Harness

TRUSTED = iprules.parse_networks(["10.0.0.0/8", "::1"])


@pytest.mark.parametrize(("peer", "xff", "expected"), [
    ("203.0.113.9", None, "203.0.113.9"),
    ("203.0.113.9", "1.2.3.4", "203.0.113.9"),            # untrusted peer: header ignored
    ("10.1.1.1", "1.2.3.4", "1.2.3.4"),
    ("10.1.1.1", "6.6.6.6, 1.2.3.4", "1.2.3.4"),           # left-most can be forged
    ("10.1.1.1", "1.2.3.4, 10.2.2.2", "1.2.3.4"),          # skip trusted hops
    ("10.1.1.1", "10.9.9.9, 10.2.2.2", "10.9.9.9"),        # all trusted: the left-most
    ("10.1.1.1", "garbage, 1.2.3.4", "1.2.3.4"),
    ("10.1.1.1", "1.2.3.4, garbage", "10.1.1.1"),
    ("::ffff:203.0.113.9", None, "203.0.113.9"),
    ("::1", "2001:db8::7", "2001:db8::7"),
])
def test_client_ip(peer: str, xff: str | None, expected: str) -> None:
    assert str(iprules.client_ip(peer, xff, TRUSTED)) == expected


def test_allowed() -> None:
    ip = iprules.parse_ip("2001:db8::1")
    assert iprules.allowed(ip, [])
    assert iprules.allowed(ip, ["2001:DB8:0::1"])
    assert not iprules.allowed(ip, ["2001:db8::2"])
    assert not iprules.allowed(None, ["1.2.3.4"])
    # As stored (a tuple, its parsed set kept) and as a list; v4 caller, mapped entry.
    listed = ("198.51.100.7", "::ffff:203.0.113.9", "2001:db8::1")
    for restrictions in (listed, list(listed)):
        assert iprules.allowed(iprules.parse_ip("203.0.113.9"), restrictions)
        assert iprules.allowed(iprules.parse_ip("::ffff:198.51.100.7"), restrictions)
        assert not iprules.allowed(iprules.parse_ip("198.51.100.8"), restrictions)


@pytest.mark.parametrize("item", [
    "224.0.0.1", "ff02::1", "0.0.0.0", "::",               # multicast, unspecified
    "fe80::1%eth0", "2001:41d0:8:e8ad::7%1",                # zone ids
    "2002:e000:1::",                                        # 6to4 of a multicast address
])
def test_restrictions_refuse_what_never_calls(item: str) -> None:
    for allow_private in (False, True):
        with pytest.raises(iprules.InvalidIPRule, match=r"never calls|zone id"):
            iprules.validate_restrictions([item], allow_private=allow_private)


@pytest.mark.parametrize("item", [
    "::127.0.0.1", "::7f00:1",                              # IPv4-compatible loopback
    "64:ff9b::127.0.0.1", "64:ff9b::a00:1",                 # NAT64 of loopback, of 10/8
    "2002:7f00:1::", "2002:c0a8:1::1",                       # 6to4 of 127.0.0.1, 192.168.0.1
    "2001:0:4136:e378:8000:63bf:80ff:fffe",                 # Teredo, client 127.0.0.1
    "2001:db8::7", "203.0.113.7",                           # documentation ranges
])
def test_restrictions_judge_the_address_inside(item: str) -> None:
    with pytest.raises(iprules.InvalidIPRule, match="not a public address"):
        iprules.validate_restrictions([item], allow_private=False)
    assert iprules.validate_restrictions([item], allow_private=True)


def test_restrictions_keep_wrapped_public_addresses() -> None:
    wrapped = ["64:ff9b::808:808", "2002:808:808::1", "145.239.0.7", "2001:41d0:8:e8ad::7"]
    assert iprules.validate_restrictions(wrapped, allow_private=False) == tuple(wrapped)


def test_validate_restrictions() -> None:
    assert iprules.validate_restrictions(["8.8.8.8", " 2001:4860:4860::8888 "],
                                         allow_private=False) == \
        ("8.8.8.8", "2001:4860:4860::8888")
    with pytest.raises(iprules.InvalidIPRule, match="at most 5"):
        iprules.validate_restrictions([f"8.8.8.{i}" for i in range(6)], allow_private=False)
    # Distinct addresses count: the same one written six ways is one.
    assert iprules.validate_restrictions(["8.8.8.8"] * 5 + ["::ffff:8.8.8.8"],
                                         allow_private=False) == ("8.8.8.8",)
    with pytest.raises(iprules.InvalidIPRule, match="at most 5 addresses, got 51"):
        iprules.validate_restrictions(["8.8.8.8"] * 51, allow_private=False)
    for private in ("10.0.0.1", "192.168.1.1", "127.0.0.1", "::1", "fd00::1"):
        with pytest.raises(iprules.InvalidIPRule, match="not a public address"):
            iprules.validate_restrictions([private], allow_private=False)
        assert iprules.validate_restrictions([private], allow_private=True)
    with pytest.raises(iprules.InvalidIPRule, match="not an IP address"):
        iprules.validate_restrictions(["1.2.3.0/24"], allow_private=True)


async def test_private_ips_refused_unless_configured(make_harness: Any, config: Any) -> None:
    config = config.replace({"server.allow_private_ips": False})
    h: Harness = await make_harness(cfg=config)
    with pytest.raises(ValidationError, match="not a public address"):
        await h.manage.update_user(ACCOUNT, LOGIN, ip_restrictions=["192.168.0.10"])


async def test_allowlist_over_ipv4(harness: Harness) -> None:
    await harness.manage.update_user(ACCOUNT, LOGIN, ip_restrictions=["8.8.8.8"])
    assert await harness.send() == \
        (200, "KO\n401 The IP address 127.0.0.1 is not allowed for this user")
    await harness.manage.update_user(ACCOUNT, LOGIN, ip_restrictions=["8.8.8.8", "127.0.0.1"])
    assert (await harness.send())[1].startswith("OK")
    await harness.manage.update_user(ACCOUNT, LOGIN, ip_restrictions=[])
    assert (await harness.send())[1].startswith("OK")


async def test_allowlist_over_ipv6(make_harness: Any) -> None:
    h: Harness = await make_harness(server_kwargs={"host": "::1"})
    await h.manage.update_user(ACCOUNT, LOGIN, ip_restrictions=["127.0.0.1"])
    assert (await h.send())[1] == "KO\n401 The IP address ::1 is not allowed for this user"
    await h.manage.update_user(ACCOUNT, LOGIN, ip_restrictions=["::1"])
    assert (await h.send())[1].startswith("OK")


async def test_trusted_proxy_forwards_the_client(make_harness: Any, config: Any) -> None:
    config = config.replace({"server.trusted_proxies": ["127.0.0.1"]})
    h: Harness = await make_harness(cfg=config)
    await h.manage.update_user(ACCOUNT, LOGIN, ip_restrictions=["203.0.113.7"])
    h.client.session.headers["X-Forwarded-For"] = "6.6.6.6, 203.0.113.7"
    assert (await h.send())[1].startswith("OK")
    h.client.session.headers["X-Forwarded-For"] = "203.0.113.7, 6.6.6.6"
    assert (await h.send())[1] == "KO\n401 The IP address 6.6.6.6 is not allowed for this user"


async def test_spoofed_forwarded_for_from_untrusted_peer_is_ignored(harness: Harness) -> None:
    await harness.manage.update_user(ACCOUNT, LOGIN, ip_restrictions=["203.0.113.7"])
    harness.client.session.headers["X-Forwarded-For"] = "203.0.113.7"
    assert (await harness.send())[1] == \
        "KO\n401 The IP address 127.0.0.1 is not allowed for this user"
