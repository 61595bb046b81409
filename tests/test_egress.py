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
