"""Which addresses the worker may call (SPEC §2: AGENTLESS_EGRESS_DENY / AGENTLESS_EGRESS_ALLOW).

A denied name is refused before it is looked up; a denied address is refused after DNS, so a
name that resolves to 169.254.169.254 is as refused as the literal. aiohttp skips its resolver
for IP literals, which is why the invoker also calls `check_host` on every URL it connects to.
"""

from __future__ import annotations

import ipaddress
import socket

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

from worker.contract.errors import EgressRefused
from worker.contract.settings import EgressRule, Network

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class EgressPolicy:
    """The deny rule, with the allow rule carving exceptions out of it."""

    __slots__ = ("_allowed_hosts", "_allowed_networks", "_denied_hosts", "_denied_networks")

    def __init__(self, deny: EgressRule, allow: EgressRule) -> None:
        self._denied_networks = deny.networks
        self._denied_hosts = deny.hosts
        self._allowed_networks = allow.networks
        self._allowed_hosts = allow.hosts

    def denied_range(self, address: Address) -> Network | None:
        """The denied network holding `address`, or None if the worker may connect to it."""
        for network in self._allowed_networks:
            if address in network:
                return None
        for network in self._denied_networks:
            if address in network:
                return network
        return None

    def check_ip(self, ip: str | Address) -> None:
        """Raise EgressRefused if the worker may not connect to `ip`."""
        address = unmapped(ip)
        network = self.denied_range(address)
        if network is not None:
            raise EgressRefused(f"egress refused: {address} is in the denied range {network}")

    def host_allowed(self, host: str) -> bool:
        """Whether `host` is named in the allow rule, which exempts it from every deny rule."""
        return _normal(host) in self._allowed_hosts

    def check_host(self, host: str) -> None:
        """Raise EgressRefused for a denied host name, or a denied address written literally."""
        name = _normal(host)
        try:
            address = ipaddress.ip_address(name.removeprefix("[").removesuffix("]"))
        except ValueError:
            if name in self._denied_hosts and name not in self._allowed_hosts:
                raise EgressRefused(f"egress refused: {host} is a denied host") from None
        else:
            self.check_ip(address)


def unmapped(ip: str | Address) -> Address:
    """`ip`, with ::ffff:a.b.c.d read as a.b.c.d: the kernel routes it there, so rules must too."""
    address = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


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
        refused: tuple[Address, Network] | None = None
        for result in results:
            address = unmapped(result["host"])
            network = self._policy.denied_range(address)
            if network is None:
                kept.append(result)
            elif refused is None:
                refused = (address, network)
        if kept:
            return kept
        if refused is None:
            # getaddrinfo answered nothing at all; let aiohttp report it as a failed lookup.
            raise OSError(f"no addresses found for {host}")
        address, network = refused
        # Not an OSError, so aiohttp passes it through unwrapped and the invoker reports it as is.
        raise EgressRefused(
            f"egress refused: {host} resolves to {address}, which is in the denied range {network}"
        )

    async def close(self) -> None:
        await self._resolver.close()
