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
    return fold_mapped(ipaddress.ip_address(text.strip()))


def fold_mapped(ip: IPAddress) -> IPAddress:
    """`::ffff:1.2.3.4` as `1.2.3.4`: the same host, whichever socket family saw it."""
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
        problem = never_a_caller(ip)
        if problem:
            raise InvalidIPRule(f"ipRestrictions: {item} {problem}")
        if not allow_private and not is_public(ip):
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


# RFC 6052's well-known NAT64 prefix: the last 32 bits are an IPv4 address.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
# RFC 4291's deprecated IPv4-compatible form `::a.b.c.d` (`::` and `::1` excepted).
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")


def embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one wraps (6to4, NAT64, IPv4-compatible, Teredo client).

    Python's `is_global` judges the wrapper, not what it carries: `2002:7f00:1::` (6to4 of
    127.0.0.1) and `64:ff9b::7f00:1` count as global, so an allowlist would take loopback in
    disguise as a public address. (IPv4-mapped `::ffff:` is folded by `parse_ip` already.)
    """
    if isinstance(ip, ipaddress.IPv4Address):
        return None
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64 or (ip in _IPV4_COMPATIBLE and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF)
    return None


def never_a_caller(ip: IPAddress) -> str | None:
    """Why `ip` can never be the source of a request (so an allowlist entry is a mistake)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
        return "has a zone id (%...): allowlists hold addresses only"
    inner = embedded_ipv4(ip)
    for each in (ip, inner):
        if each is not None and (each.is_multicast or each.is_unspecified):
            return "is a multicast or unspecified address, which never calls"
    return None


def is_public(ip: IPAddress) -> bool:
    """Global unicast, judged on the IPv4 address inside a wrapping IPv6 form if any."""
    inner = embedded_ipv4(ip)
    return ip.is_global and (inner is None or inner.is_global)


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
    return ip in _listed(restrictions if isinstance(restrictions, tuple) else tuple(restrictions))


@lru_cache(maxsize=4096)
def _listed(restrictions: tuple[str, ...]) -> frozenset[IPAddress]:
    # Checked on every send (twice), and parsing five addresses was 2.7% of the send
    # process under scripts/bench (py-spy); an allowlist changes rarely.
    return frozenset(parse_ip(item) for item in restrictions)
