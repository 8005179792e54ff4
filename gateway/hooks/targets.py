"""Where a callback may connect: the addresses a URL that a customer set is allowed to reach.

A callback URL is written by whoever holds an API user or an account, and the gateway calls
it from inside the operator's network: pointed at `127.0.0.1`, `169.254.169.254` or an
intranet host, it would make the gateway a proxy into places no customer should reach, and
pointed at the gateway's own send URL, turn one SMS into a loop that empties the account.
So the rule is judged on the address actually connected to, after name resolution (the
text of a URL says little: `127.1`, `2130706433`, `0x7f000001` and a DNS name resolving to
loopback are all loopback), and:

- by default only global unicast addresses are allowed (an IPv4 address wrapped in IPv6,
  6to4 or NAT64, is judged by what it wraps);
- `callbacks.allow_private_targets` allows every unicast address (intranet deployments and
  the tests), `callbacks.allowed_target_networks` allows some networks only;
- multicast and unspecified addresses (`0.0.0.0` reaches the local host) are refused always;
- the gateway's own listeners are refused always (see `HttpClient`'s check on the socket).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from gateway import iprules
from gateway.iprules import IPAddress, IPNetwork


@dataclass(frozen=True, slots=True)
class TargetPolicy:
    allow_private: bool = False
    allowed_networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_settings(cls, allow_private: bool, networks: Sequence[str]) -> TargetPolicy:
        return cls(allow_private, iprules.parse_networks(networks))

    def problem(self, ip: IPAddress) -> str | None:
        """Why a callback may not connect to `ip`, or None. Never quotes the URL."""
        ip = iprules.fold_mapped(ip)
        inner = iprules.embedded_ipv4(ip)
        for each in (ip, inner):
            if each is not None and (each.is_multicast or each.is_unspecified):
                return f"{ip} is a multicast or unspecified address"
        if self.allow_private or iprules.is_public(ip):
            return None
        judged = inner or ip
        if any(judged.version == net.version and judged in net
               for net in self.allowed_networks):
            return None
        return (f"{ip} is not a public address (callbacks.allow_private_targets or "
                "callbacks.allowed_target_networks allow it)")


def literal_address(host: str) -> IPAddress | None:
    """The address a URL's host names without asking DNS, or None for a name to resolve.

    As the resolver reads it: `127.1`, `2130706433` and `0x7f000001` are IPv4 in the forms
    inet_aton takes, a zone id (`fe80::1%lo`) is dropped, and `localhost` (with its
    subdomains, RFC 6761) is loopback whatever the hosts file says.
    """
    host = host.strip("[]").partition("%")[0]
    name = host.lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return ipaddress.IPv4Address("127.0.0.1")
    try:
        return iprules.fold_mapped(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except (OSError, ValueError):
        return None
