"""Secret response headers: what is kept of them (pure), and what a poll may take from them."""

from __future__ import annotations

import pytest

from worker.contract.redaction import redact_challenges, redact_headers
from worker.contract.response_macros import UnresolvedMacro, resolve


def test_secret_response_headers_are_redacted_whole() -> None:
    answered = {
        "set-cookie": "session=s3cr3t; Path=/; HttpOnly, theme=dark",
        "authorization": "Bearer s3cr3t",
        "proxy-authorization": "Basic czNjcjN0",
        "cookie": "session=s3cr3t",
        "x-api-key": "s3cr3t",
        "x-auth-token": "s3cr3t",
        "authtoken": "s3cr3t",
        "authentication-info": 'rspauth="s3cr3t", nextnonce="n"',
        "proxy-authentication-info": 'rspauth="s3cr3t"',
        "x-ci-token": "s3cr3t",
        "content-type": "application/json",
        "location": "/jobs/1",
        "x-request-id": "r-1",
    }
    assert redact_headers(answered, {"x-ci-token"}) == {
        "set-cookie": "***",
        "authorization": "***",
        "proxy-authorization": "***",
        "cookie": "***",
        "x-api-key": "***",
        "x-auth-token": "***",
        "authtoken": "***",
        "authentication-info": "***",
        "proxy-authentication-info": "***",
        "x-ci-token": "***",
        "content-type": "application/json",
        "location": "/jobs/1",
        "x-request-id": "r-1",
    }
    # The task's own secret names count only for that task.
    assert redact_headers({"x-ci-token": "s3cr3t"}) == {"x-ci-token": "s3cr3t"}


def test_challenges_keep_what_they_say_and_lose_what_they_carry() -> None:
    assert redact_headers(
        {
            "www-authenticate": 'Bearer realm="api", error="invalid_token"',
            "proxy-authenticate": 'Digest realm="proxy", nonce="abc", qop="auth"',
        }
    ) == {
        "www-authenticate": 'Bearer realm="api", error="invalid_token"',
        "proxy-authenticate": 'Digest realm="proxy", nonce="***", qop="auth"',
    }


@pytest.mark.parametrize(
    ("challenge", "kept"),
    [
        ("Basic", "Basic"),
        ('Basic realm="ci", charset="UTF-8"', 'Basic realm="ci", charset="UTF-8"'),
        (
            'Bearer realm="api", scope="read write", error="invalid_token", '
            'error_description="The access token expired"',
            'Bearer realm="api", scope="read write", error="invalid_token", '
            'error_description="The access token expired"',
        ),
        # Security tokens (token68) of Negotiate and NTLM, and of any scheme.
        ("Negotiate oYGzMIGwoAMKAQChCwYJKoZIgvcSAQICooGb==", "Negotiate ***"),
        ("NTLM TlRMTVNTUAACAAAADAAMADAAAAA=", "NTLM ***"),
        ("Bearer eyJhbGciOi.eyJzdWIiOi.c2lnbmF0dXJl", "Bearer ***"),
        ('Negotiate abc=, Basic realm="x"', 'Negotiate ***, Basic realm="x"'),
        # Digest's nonce and opaque, and any parameter not known to be harmless.
        (
            'Digest realm="a@b", qop="auth, auth-int", algorithm=SHA-256, nonce="7ypf/xlj9", '
            'opaque="FQhe/qaU"',
            'Digest realm="a@b", qop="auth, auth-int", algorithm=SHA-256, nonce="***", '
            'opaque="***"',
        ),
        (
            'Newauth realm="apps", type=1, title="Login to \\"apps\\"", Basic realm="simple"',
            'Newauth realm="apps", type="***", title="***", Basic realm="simple"',
        ),
        ('Bearer  realm = "x" ,scope=a', 'Bearer  realm = "x" ,scope=a'),
        ('Bearer realm="x", Negotiate, NTLM', 'Bearer realm="x", Negotiate, NTLM'),
        ("", ""),
        # What cannot be read is redacted whole.
        ("Negotiate s3cr3t1 s3cr3t2", "***"),
        ('Bearer realm="x"key=s3cr3t', "***"),
        ('Bearer realm="x" key=s3cr3t', "***"),
        ('Bearer realm="unterminated', "***"),
        ("Bearer {s3cr3t}", "***"),
    ],
)
def test_challenge(challenge: str, kept: str) -> None:
    assert redact_challenges(challenge) == kept


def test_a_poll_cannot_be_handed_a_redacted_header() -> None:
    headers = redact_headers({"set-cookie": "session=s3cr3t", "location": "/jobs/1"})
    assert resolve("$(response.headers.Location)", 202, headers, None) == "/jobs/1"
    with pytest.raises(UnresolvedMacro) as caught:
        resolve("$(response.headers.Set-Cookie)", 202, headers, None)
    assert str(caught.value) == (
        "$(response.headers.Set-Cookie): the start response's Set-Cookie header is secret, and is "
        "not passed on; give the poll request its own credentials, or a service connection"
    )
