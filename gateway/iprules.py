"""IP rules: who the caller is (trusted proxies) and whether an API user lets it in."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from functools import lru_cache

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_RESTRICTIONS = 5


class InvalidIPRule(ValueError):
    pass


# Every request parses its peer and its user's allowlist; the same few strings come back.
@lru_cache(maxsize=16_384)
def parse_ip(text: str) -> IPAddress:
    """Parse an address, folding IPv4-mapped IPv6 (`::ffff:1.2.3.4`) to IPv4.

    A dual-stack listener reports IPv4 peers in mapped form; folding them keeps an allowlist
    entry `1.2.3.4` matching whichever socket family accepted the connection.
    """
    ip = ipaddress.ip_address(text.strip())
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def parse_networks(items: Iterable[str]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(item.strip(), strict=False) for item in items)


def validate_restrictions(items: Sequence[str], *, allow_private: bool) -> tuple[str, ...]:
    """Check an allowlist as the API user's `ipRestrictions`; return it normalised."""
    cleaned = [item.strip() for item in items if item.strip()]
    # The limit is on distinct addresses (the same one written twice, or as `::ffff:a.b.c.d`
    # and `a.b.c.d`, is stored once); a list far too long is refused before parsing it.
    if len(cleaned) > 10 * MAX_RESTRICTIONS:
        raise InvalidIPRule(
            f"ipRestrictions: at most {MAX_RESTRICTIONS} addresses, got {len(cleaned)}"
        )
    result: list[str] = []
    for item in cleaned:
        try:
            ip = parse_ip(item)
        except ValueError as exc:
            raise InvalidIPRule(f"ipRestrictions: {item!r} is not an IP address") from exc
        if not allow_private and not ip.is_global:
            raise InvalidIPRule(
                f"ipRestrictions: {item} is not a public address "
                "(set server.allow_private_ips to allow it)"
            )
        if str(ip) not in result:
            result.append(str(ip))
    if len(result) > MAX_RESTRICTIONS:
        raise InvalidIPRule(
            f"ipRestrictions: at most {MAX_RESTRICTIONS} addresses, got {len(result)}"
        )
    return tuple(result)


def client_ip(peer: str | None, forwarded_for: str | None,
              trusted_proxies: Sequence[IPNetwork]) -> IPAddress | None:
    """The caller's address: the TCP peer, or, behind trusted proxies, X-Forwarded-For.

    Walk X-Forwarded-For from the right and take the first hop that is not itself a trusted
    proxy: entries further left were written by the client and can be forged.
    """
    if not peer:
        return None
    try:
        ip = parse_ip(peer)
    except ValueError:
        return None
    if not forwarded_for or not _trusted(ip, trusted_proxies):
        return ip
    for hop in reversed(forwarded_for.split(",")):
        try:
            hop_ip = parse_ip(hop)
        except ValueError:
            # A garbled hop means we cannot trust anything to its left.
            return ip
        if not _trusted(hop_ip, trusted_proxies):
            return hop_ip
        ip = hop_ip
    return ip


def _trusted(ip: IPAddress, trusted_proxies: Sequence[IPNetwork]) -> bool:
    return any(ip.version == net.version and ip in net for net in trusted_proxies)


def allowed(ip: IPAddress | None, restrictions: Sequence[str]) -> bool:
    """An empty allowlist lets any address in; otherwise the caller must be listed."""
    if not restrictions:
        return True
    if ip is None:
        return False
    return any(ip == parse_ip(item) for item in restrictions)
