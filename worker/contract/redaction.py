"""Secret values in an endpoint's response headers (SPEC §4): redacted as soon as the response is
read, so that no stored record, event, API answer, output or criterion ever holds them.

Whole values are redacted for the names in SECRET_HEADERS (Set-Cookie, an echoed Authorization,
…), Authentication-Info and Proxy-Authentication-Info (the server's half of an exchange), and
whatever header the task itself treats as secret (its service connection's own header name).

A WWW-Authenticate or Proxy-Authenticate challenge keeps what says how to authenticate and why a
credential was refused (the scheme, realm, scope, error, …), which is what someone reading a 401
needs; what is part of the exchange itself is redacted: a token68 (Negotiate's and NTLM's security
tokens), nonce, opaque and any parameter not known to be harmless. A challenge that cannot be read
is redacted whole.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import Final

from worker.contract.requests import REDACTED, SECRET_HEADERS

RESPONSE_SECRET_HEADERS: Final = SECRET_HEADERS | {
    "authentication-info",
    "proxy-authentication-info",
}
CHALLENGE_HEADERS: Final = frozenset({"www-authenticate", "proxy-authenticate"})
# Challenge parameters that describe the challenge, never a credential (RFC 9110 §11, RFC 7616,
# RFC 6750 §3). Any other is redacted.
PLAIN_PARAMETERS: Final = frozenset(
    {
        "realm",
        "scope",
        "error",
        "error_description",
        "error_uri",
        "charset",
        "algorithm",
        "qop",
        "stale",
        "userhash",
        "domain",
    }
)

# RFC 9110's token, the form of scheme and parameter names.
_WORD: Final = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_QUOTED: Final = r'"(?:[^"\\]|\\.)*"'
_PARAMETER: Final = re.compile(rf"({_WORD})[ \t]*=[ \t]*({_QUOTED}|{_WORD})")
_SCHEME: Final = re.compile(rf"({_WORD})(?:[ \t]+([A-Za-z0-9._~+/-]+=*)(?=[ \t]*(?:,|$)))?")


def redact_headers(headers: dict[str, str], secret: Collection[str] = ()) -> dict[str, str]:
    """`headers` (lower-case names), their secret values redacted in place (a response's headers
    are redacted once, as they are read: no copy is made on a path every task takes); `headers`
    is returned. `secret` names (lower case) the headers the task treats as secret besides the
    usual ones."""
    for name, value in headers.items():
        if name in RESPONSE_SECRET_HEADERS or name in secret:
            headers[name] = REDACTED
        elif name in CHALLENGE_HEADERS:
            headers[name] = redact_challenges(value)
    return headers


def redact_challenges(value: str) -> str:
    """A WWW-Authenticate value (one or more challenges) without the credentials it carries; the
    rest as it was written."""
    kept: list[str] = []
    done = 0  # how much of `value` is in `kept`
    at = _skip(value, 0)
    bare_scheme = False  # the last item was a scheme with nothing after it yet
    while at < len(value):
        parameter = _PARAMETER.match(value, at)
        if parameter is not None:
            if parameter[1].lower() not in PLAIN_PARAMETERS:
                kept += (value[done : parameter.start(2)], f'"{REDACTED}"')
                done = parameter.end()
            end, bare_scheme = parameter.end(), False
        else:
            scheme = _SCHEME.match(value, at)
            if scheme is None:
                return REDACTED
            if scheme[2] is not None:
                kept += (value[done : scheme.start(2)], REDACTED)
                done = scheme.end()
            end, bare_scheme = scheme.end(), scheme[2] is None
        at = _skip(value, end)
        # Only a scheme's first parameter follows without a comma: anything else is not a
        # challenge this can read.
        if (
            at < len(value)
            and "," not in value[end:at]
            and (not bare_scheme or _PARAMETER.match(value, at) is None)
        ):
            return REDACTED
    kept.append(value[done:])
    return "".join(kept)


def _skip(value: str, at: int) -> int:
    """Past the spaces and commas at `at`."""
    while at < len(value) and value[at] in " \t,":
        at += 1
    return at
