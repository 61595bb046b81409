"""The egress policy: pure decisions, and the resolver that applies them after DNS."""

from __future__ import annotations

import socket
from collections.abc import Sequence

import pytest

from worker.contract.errors import EgressRefused
from worker.contract.settings import BUILTIN_EGRESS_DENY, EgressRule
from worker.egress import EgressPolicy, EgressResolver


def policy(deny: Sequence[str], allow: Sequence[str] = ()) -> EgressPolicy:
    return EgressPolicy(EgressRule.parse(list(deny)), EgressRule.parse(list(allow)))


BUILTIN = policy(BUILTIN_EGRESS_DENY)


@pytest.mark.parametrize(
    ("ip", "refusal"),
    [
        ("169.254.169.254", "169.254.169.254 is in the denied range 169.254.0.0/16"),
        ("::ffff:169.254.169.254", "169.254.169.254 is in the denied range 169.254.0.0/16"),
        ("::ffff:a9fe:a9fe", "169.254.169.254 is in the denied range 169.254.0.0/16"),
        ("fe80::1", "fe80::1 is in the denied range fe80::/10"),
        ("fd00:ec2::254", "fd00:ec2::254 is in the denied range fd00:ec2::254/128"),
        ("168.63.129.16", "168.63.129.16 is in the denied range 168.63.129.16/32"),
        ("100.100.100.200", "100.100.100.200 is in the denied range 100.100.100.200/32"),
        ("127.0.0.1", None),
        ("10.0.0.1", None),
        ("::1", None),
        ("fd00:ec2::253", None),
        ("169.255.0.1", None),
    ],
)
def test_builtin_rule_denies_metadata_addresses(ip: str, refusal: str | None) -> None:
    if refusal is None:
        BUILTIN.check_ip(ip)
    else:
        with pytest.raises(EgressRefused) as caught:
            BUILTIN.check_ip(ip)
        assert str(caught.value) == f"egress refused: {refusal}"


@pytest.mark.parametrize(
    ("deny", "allow", "host", "refusal"),
    [
        (BUILTIN_EGRESS_DENY, [], "metadata.google.internal", "metadata.google.internal is"),
        (BUILTIN_EGRESS_DENY, [], "METADATA.Google.Internal.", "METADATA.Google.Internal. is"),
        (BUILTIN_EGRESS_DENY, [], "www.metadata.google.internal", None),
        (BUILTIN_EGRESS_DENY, [], "example.com", None),
        (BUILTIN_EGRESS_DENY, [], "169.254.169.254", "169.254.169.254 is in the denied range"),
        (BUILTIN_EGRESS_DENY, [], "::ffff:169.254.169.254", "169.254.169.254 is in"),
        (BUILTIN_EGRESS_DENY, [], "[fe80::1]", "fe80::1 is in the denied range fe80::/10"),
        (BUILTIN_EGRESS_DENY, ["metadata.google.internal"], "metadata.google.internal", None),
        (["127.0.0.0/8"], [], "127.0.0.2", "127.0.0.2 is in the denied range 127.0.0.0/8"),
        (["127.0.0.0/8"], ["127.0.0.1/32"], "127.0.0.1", None),
        (["127.0.0.0/8"], ["127.0.0.1/32"], "127.0.0.2", "127.0.0.2 is in the denied range"),
        (["internal.example"], [], "Internal.Example.", "Internal.Example. is a denied host"),
        (["0.0.0.0/0", "::/0"], ["10.1.0.0/16"], "10.1.2.3", None),
        (["0.0.0.0/0", "::/0"], ["10.1.0.0/16"], "::ffff:10.1.2.3", None),
        (["0.0.0.0/0"], [], "::1", None),
    ],
)
def test_check_host(deny: list[str], allow: list[str], host: str, refusal: str | None) -> None:
    rules = policy(deny, allow)
    if refusal is None:
        rules.check_host(host)
    else:
        with pytest.raises(EgressRefused, match=r"^egress refused: ") as caught:
            rules.check_host(host)
        assert str(caught.value).startswith(f"egress refused: {refusal}")


METADATA_RANGE = "which is in the denied range 169.254.0.0/16"


@pytest.mark.parametrize(
    ("host", "refusal"),
    [
        # IPv4 spelled as inet_aton reads it (and getaddrinfo, before any DNS).
        ("2852039166", f"2852039166 is 169.254.169.254, {METADATA_RANGE}"),
        ("0251.0376.0251.0376", f"0251.0376.0251.0376 is 169.254.169.254, {METADATA_RANGE}"),
        ("0xa9fea9fe", f"0xa9fea9fe is 169.254.169.254, {METADATA_RANGE}"),
        ("0xA9.0xFE.0xA9.0xFE", f"0xA9.0xFE.0xA9.0xFE is 169.254.169.254, {METADATA_RANGE}"),
        ("169.254.43518", f"169.254.43518 is 169.254.169.254, {METADATA_RANGE}"),
        ("169.16689662", f"169.16689662 is 169.254.169.254, {METADATA_RANGE}"),
        ("169.0xfe.0251.254", f"169.0xfe.0251.254 is 169.254.169.254, {METADATA_RANGE}"),
        ("0000251.254.169.254", f"0000251.254.169.254 is 169.254.169.254, {METADATA_RANGE}"),
        ("2852039166.", f"2852039166. is 169.254.169.254, {METADATA_RANGE}"),
        # IPv6 forms that lead to 169.254.169.254.
        ("[::ffff:a9fe:a9fe]", "169.254.169.254 is in the denied range 169.254.0.0/16"),
        (
            "[::169.254.169.254]",
            f"::a9fe:a9fe reaches 169.254.169.254 through IPv4-compatible addressing, "
            f"{METADATA_RANGE}",
        ),
        (
            "[::ffff:0:a9fe:a9fe]",
            f"::ffff:0:a9fe:a9fe reaches 169.254.169.254 through SIIT translation, "
            f"{METADATA_RANGE}",
        ),
        (
            "[64:ff9b::169.254.169.254]",
            f"64:ff9b::a9fe:a9fe reaches 169.254.169.254 through NAT64, {METADATA_RANGE}",
        ),
        # A local-use NAT64 prefix's length is its network's choice: every RFC 6052 reading.
        (
            "[64:ff9b:1:a9fe:a9:fe00::]",
            f"64:ff9b:1:a9fe:a9:fe00:: reaches 169.254.169.254 through NAT64, {METADATA_RANGE}",
        ),
        (
            "[64:ff9b:1:a9:fe:a9fe::]",
            f"64:ff9b:1:a9:fe:a9fe:: reaches 169.254.169.254 through NAT64, {METADATA_RANGE}",
        ),
        (
            "[64:ff9b:1:0:a9:fea9:fe00:0]",
            f"64:ff9b:1:0:a9:fea9:fe00:0 reaches 169.254.169.254 through NAT64, {METADATA_RANGE}",
        ),
        (
            "[64:ff9b:1::a9fe:a9fe]",
            f"64:ff9b:1::a9fe:a9fe reaches 169.254.169.254 through NAT64, {METADATA_RANGE}",
        ),
        (
            "[2002:a9fe:a9fe::1]",
            f"2002:a9fe:a9fe::1 reaches 169.254.169.254 through 6to4, {METADATA_RANGE}",
        ),
        # Teredo: the client is the last 32 bits inverted; the server is bits 32 to 63.
        (
            "[2001:0:4136:e378:8000:63bf:5601:5601]",
            "2001:0:4136:e378:8000:63bf:5601:5601 reaches 169.254.169.254 through Teredo, "
            f"{METADATA_RANGE}",
        ),
        (
            "[2001:0:a9fe:a9fe::ffff:ffff]",
            "2001:0:a9fe:a9fe::ffff:ffff reaches 169.254.169.254 through Teredo (its server), "
            f"{METADATA_RANGE}",
        ),
        # Hosts that aiohttp would connect to unresolved, but that are no address.
        ("1.1.1.1.1", "1.1.1.1.1 looks like an IP address but is not one"),
        ("4294967296", "4294967296 looks like an IP address but is not one"),
        ("09.1.1.1", "09.1.1.1 looks like an IP address but is not one"),
        # The same forms of an address no rule denies, and names that only look numeric.
        ("134744072", None),
        ("0x8.0x8.0x8.0x8", None),
        ("[64:ff9b::8.8.8.8]", None),
        ("[2002:808:808::1]", None),
        ("[2001:0:4136:e378:8000:63bf:f7f7:f7f7]", None),
        ("[::1]", None),
        ("[::]", None),
        ("[2001:db8::1]", None),
        ("cafe", None),
        ("0xcafe", None),
        ("deadbeef.example", None),
    ],
)
def test_every_spelling_of_the_metadata_address_is_refused(host: str, refusal: str | None) -> None:
    if refusal is None:
        BUILTIN.check_host(host)
    else:
        with pytest.raises(EgressRefused) as caught:
            BUILTIN.check_host(host)
        assert str(caught.value).startswith(f"egress refused: {refusal}")


@pytest.mark.parametrize(
    ("deny", "allow", "ip", "refused"),
    [
        # An IPv6 address that leads to IPv4 is judged by both families' rules.
        (["64:ff9b::/96"], [], "64:ff9b::808:808", True),
        (["0.0.0.0/0", "::/0"], ["10.1.0.0/16"], "64:ff9b::a01:203", True),
        (["10.0.0.0/8"], [], "64:ff9b::a01:203", True),
        (["10.0.0.0/8"], ["10.1.0.0/16"], "64:ff9b::a01:203", False),
        (["10.0.0.0/8"], ["64:ff9b::/96"], "64:ff9b::a01:203", True),
        # :: and ::1 are not IPv4-compatible forms of 0.0.0.0 and 0.0.0.1.
        (["0.0.0.0/8"], [], "::1", False),
        (["0.0.0.0/8"], [], "::", False),
        (["0.0.0.0/8"], [], "::2", True),
    ],
)
def test_embedded_ipv4_and_the_ipv6_address_are_both_judged(
    deny: list[str], allow: list[str], ip: str, refused: bool
) -> None:
    assert (policy(deny, allow).denial(ip) is not None) == refused


async def test_resolver_refuses_a_name_whose_addresses_are_all_denied() -> None:
    resolver = EgressResolver(policy(["127.0.0.0/8", "::1/128"]))
    with pytest.raises(EgressRefused) as caught:
        await resolver.resolve("localhost", 80, socket.AF_UNSPEC)
    assert str(caught.value) in (
        "egress refused: localhost resolves to 127.0.0.1, which is in the denied range 127.0.0.0/8",
        "egress refused: localhost resolves to ::1, which is in the denied range ::1/128",
    )


async def test_resolver_keeps_only_allowed_addresses() -> None:
    resolver = EgressResolver(policy(["::1/128"]))
    results = await resolver.resolve("localhost", 80, socket.AF_UNSPEC)
    assert {result["host"] for result in results} == {"127.0.0.1"}


async def test_resolver_lets_an_allowed_name_through_a_denied_range() -> None:
    resolver = EgressResolver(policy(["127.0.0.0/8", "::1/128"], ["localhost"]))
    results = await resolver.resolve("localhost", 80, socket.AF_INET)
    assert [result["host"] for result in results] == ["127.0.0.1"]


async def test_resolver_refuses_a_denied_name_before_looking_it_up() -> None:
    resolver = EgressResolver(policy(["localhost"]))
    with pytest.raises(EgressRefused) as caught:
        await resolver.resolve("localhost", 80, socket.AF_INET)
    assert str(caught.value) == "egress refused: localhost is a denied host"


async def test_resolver_reads_a_numeric_host_before_looking_it_up() -> None:
    resolver = EgressResolver(policy(["127.0.0.0/8"]))
    with pytest.raises(EgressRefused) as caught:
        await resolver.resolve("0x7f.1", 80, socket.AF_INET)
    assert str(caught.value) == (
        "egress refused: 0x7f.1 is 127.0.0.1, which is in the denied range 127.0.0.0/8"
    )
