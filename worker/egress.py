"""Which addresses the worker may call (SPEC §2: AGENTLESS_EGRESS_DENY / AGENTLESS_EGRESS_ALLOW).

A denied name is refused before it is looked up; a denied address is refused after DNS, so a
name that resolves to 169.254.169.254 is as refused as the literal. aiohttp skips its resolver
for hosts that look like IP literals, which is why the invoker also calls `check_host` on every
URL it connects to, and why that check reads a literal as liberally as the C library would.

An IPv6 address can lead to an IPv4 one: the kernel routes IPv4-mapped addresses over IPv4, and
NAT64 gateways, 6to4 relays and Teredo carry the others there. Such an address is refused when
its IPv6 form is denied, and also when any IPv4 address it may reach is (see `embedded`).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import Final

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

from worker.contract.errors import EgressRefused
from worker.contract.settings import EgressRule, Network

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

_IPV4_MAX: Final = 0xFFFF_FFFF
_NAT64: Final = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL: Final = ipaddress.IPv6Network("64:ff9b:1::/48")
# RFC 6052 prefix lengths a local-use NAT64 prefix inside 64:ff9b:1::/48 may have.
_NAT64_LOCAL_LENGTHS: Final = (48, 56, 64, 96)
_SIIT: Final = ipaddress.IPv6Network("::ffff:0:0:0/96")
# What inet_aton reads as IPv4: one to four parts, each decimal, octal (0…) or hexadecimal (0x…).
_NUMERIC: Final = re.compile(r"[0-9a-fx]+(?:\.[0-9a-fx]+){0,3}")


@dataclass(frozen=True, slots=True)
class Denial:
    """Why an address may not be called: `address` (the address itself, or an IPv4 address that
    `via` reaches by `way`) is in the denied `network`."""

    address: Address
    network: Network
    via: ipaddress.IPv6Address | None = None
    way: str = ""

    def sentence(self) -> str:
        if self.via is None:
            return f"{self.address} is in the denied range {self.network}"
        return (
            f"{self.via} reaches {self.address} through {self.way}, "
            f"which is in the denied range {self.network}"
        )

    def clause(self) -> str:
        """The denial as the object of a verb ("… resolves to {clause}")."""
        if self.via is None:
            return f"{self.address}, which is in the denied range {self.network}"
        return (
            f"{self.via}, which reaches {self.address} through {self.way}, "
            f"in the denied range {self.network}"
        )


class EgressPolicy:
    """The deny rule, with the allow rule carving exceptions out of it."""

    __slots__ = ("_allowed_hosts", "_allowed_networks", "_denied_hosts", "_denied_networks")

    def __init__(self, deny: EgressRule, allow: EgressRule) -> None:
        self._denied_networks = deny.networks
        self._denied_hosts = deny.hosts
        self._allowed_networks = allow.networks
        self._allowed_hosts = allow.hosts

    def denied_range(self, address: Address) -> Network | None:
        """The denied network holding `address`, or None if the rules let it through. This reads
        `address` alone; `denial` also follows what it leads to."""
        for network in self._allowed_networks:
            if address in network:
                return None
        for network in self._denied_networks:
            if address in network:
                return network
        return None

    def denial(self, ip: str | Address) -> Denial | None:
        """Why the worker may not connect to `ip`, or None if it may."""
        address = unmapped(ip)
        network = self.denied_range(address)
        if network is not None:
            return Denial(address, network)
        if isinstance(address, ipaddress.IPv6Address):
            for reached, way in embedded(address):
                network = self.denied_range(reached)
                if network is not None:
                    return Denial(reached, network, address, way)
        return None

    def check_ip(self, ip: str | Address) -> None:
        """Raise EgressRefused if the worker may not connect to `ip`."""
        denial = self.denial(ip)
        if denial is not None:
            raise EgressRefused(f"egress refused: {denial.sentence()}")

    def host_allowed(self, host: str) -> bool:
        """Whether `host` is named in the allow rule, which exempts it from every deny rule."""
        return _normal(host) in self._allowed_hosts

    def check_host(self, host: str) -> None:
        """Raise EgressRefused for a denied host name, or a denied address written literally in
        any spelling the C library reads (2852039166, 0xa9fea9fe, 0251.0376.0251.0376, …)."""
        name = _normal(host)
        literal = name.removeprefix("[").removesuffix("]")
        address = ip_literal(literal)
        if address is None:
            if _looks_like_ip(literal):
                # aiohttp would hand it to the system unresolved, past the resolver's check.
                raise EgressRefused(
                    f"egress refused: {host} looks like an IP address but is not one, so where "
                    "it leads cannot be checked"
                )
            if name in self._denied_hosts and name not in self._allowed_hosts:
                raise EgressRefused(f"egress refused: {host} is a denied host")
            return
        denial = self.denial(address)
        if denial is None:
            return
        if isinstance(address, ipaddress.IPv4Address) and literal != str(address):
            raise EgressRefused(f"egress refused: {host} is {denial.clause()}")
        raise EgressRefused(f"egress refused: {denial.sentence()}")


def unmapped(ip: str | Address) -> Address:
    """`ip`, with ::ffff:a.b.c.d read as a.b.c.d: the kernel routes it there, so rules must too."""
    address = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def embedded(address: ipaddress.IPv6Address) -> list[tuple[ipaddress.IPv4Address, str]]:
    """The IPv4 addresses that traffic to `address` may be carried to, each with the way it goes:
    IPv4-compatible (::a.b.c.d, but not :: or ::1), SIIT (::ffff:0:a.b.c.d), NAT64's well-known
    prefix (64:ff9b::/96, the last 32 bits), a local-use NAT64 prefix (64:ff9b:1::/48, whose
    length only its network knows: each RFC 6052 reading, /48, /56, /64 and /96), 6to4
    (2002:a.b.c.d::/48) and Teredo (both its server and its client, since packets go to each).
    IPv4-mapped addresses are not here: `unmapped` reads them as the IPv4 address itself."""
    value = int(address)
    found: list[tuple[ipaddress.IPv4Address, str]] = []
    if value >> 32 == 0 and value > 1:
        found.append((ipaddress.IPv4Address(value), "IPv4-compatible addressing"))
    elif address in _SIIT:
        found.append((ipaddress.IPv4Address(value & _IPV4_MAX), "SIIT translation"))
    elif address in _NAT64:
        found.append((ipaddress.IPv4Address(value & _IPV4_MAX), "NAT64"))
    elif address in _NAT64_LOCAL:
        readings = dict.fromkeys(_rfc6052(value, length) for length in _NAT64_LOCAL_LENGTHS)
        found.extend((reached, "NAT64") for reached in readings)
    elif address.sixtofour is not None:
        found.append((address.sixtofour, "6to4"))
    elif address.teredo is not None:
        server, client = address.teredo
        found.append((client, "Teredo"))
        found.append((server, "Teredo (its server)"))
    return found


def _rfc6052(value: int, prefix_length: int) -> ipaddress.IPv4Address:
    """The IPv4 address embedded after a NAT64 prefix of `prefix_length` bits (RFC 6052 §2.2):
    the 32 bits that follow the prefix, skipping bits 64 to 71, which are always zero."""
    without_u = (value >> 64 << 56) | (value & (1 << 56) - 1)
    start = prefix_length if prefix_length <= 64 else prefix_length - 8
    return ipaddress.IPv4Address(without_u >> (120 - start - 32) & _IPV4_MAX)


def ip_literal(text: str) -> Address | None:
    """The address `text` (a lower-case host, brackets removed) spells, or None if it is a name.
    IPv4 is read as inet_aton reads it, as getaddrinfo does before any DNS: 169.254.43518,
    2852039166, 0xa9fea9fe and 0251.0376.0251.0376 are all 169.254.169.254."""
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    if not _NUMERIC.fullmatch(text):
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(text))
    except OSError:
        return None


def _looks_like_ip(text: str) -> bool:
    """What aiohttp connects to without asking the resolver: a host with a colon, or of digits
    and dots."""
    return ":" in text or text.replace(".", "").isdigit()


def _normal(host: str) -> str:
    return host.lower().rstrip(".")


class EgressResolver(AbstractResolver):
    """aiohttp's threaded resolver, minus the addresses the egress policy denies."""

    def __init__(self, policy: EgressPolicy) -> None:
        self._policy = policy
        self._resolver = ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self._policy.check_host(host)
        results = await self._resolver.resolve(host, port, family)
        if self._policy.host_allowed(host):
            return results
        kept: list[ResolveResult] = []
        refused: Denial | None = None
        for result in results:
            denial = self._policy.denial(result["host"])
            if denial is None:
                kept.append(result)
            elif refused is None:
                refused = denial
        if kept:
            return kept
        if refused is None:
            # getaddrinfo answered nothing at all; let aiohttp report it as a failed lookup.
            raise OSError(f"no addresses found for {host}")
        # Not an OSError, so aiohttp passes it through unwrapped and the invoker reports it as is.
        raise EgressRefused(f"egress refused: {host} resolves to {refused.clause()}")

    async def close(self) -> None:
        await self._resolver.close()
