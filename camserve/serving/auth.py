"""Bearer-token authentication for the gRPC server (and, optionally, ``/metrics``).

A call without exactly one ``authorization: Bearer <token>`` metadata entry matching the
configured token is answered UNAUTHENTICATED (the :class:`~camserve.errors.Unauthenticated`
kind) before its request is even parsed; the health service is exempt, since probes cannot
send headers. The scheme is case-insensitive (RFC 7235: ``bearer``, ``BEARER``), two
``authorization`` entries are refused (which one would count?), and the token is compared in
constant time.

>>> check_bearer(["bearer s3cret"], "s3cret") is None
True
>>> check_bearer(["Bearer s3cret", "Bearer other"], "s3cret")
"2 'authorization' headers: send exactly one, 'authorization: Bearer <token>'"
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from typing import Any

MISSING = "missing bearer token: send metadata 'authorization: Bearer <token>'"
INVALID = "invalid bearer token"


def check_bearer(values: Sequence[str], token: str) -> str | None:
    """Why the ``authorization`` values of one request do not carry ``token`` (None: they do):
    exactly one value, ``Bearer`` in any case, one or more spaces, then the token (compared in
    constant time)."""
    if not values:
        return MISSING
    if len(values) > 1:
        return f"{len(values)} 'authorization' headers: send exactly one, 'authorization: Bearer <token>'"
    scheme, _, credentials = str(values[0]).partition(" ")
    ok = hmac.compare_digest(credentials.lstrip(" ").encode(), token.encode())
    return None if ok and scheme.lower() == "bearer" else INVALID


def authorization_values(metadata: Any) -> list[str]:
    """Every ``authorization`` value of gRPC metadata (keys arrive in lower case)."""
    return [value for key, value in metadata or () if key == "authorization"]
