"""Blocking HTTP calls for the HTTP API tests (http.client: repeated headers, raw bodies, TLS)."""

from __future__ import annotations

import http.client
import json
import ssl
from typing import Any, NamedTuple


class Answer(NamedTuple):
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> dict[str, str]:
        """The ``{"error": {"code", "message"}}`` of an error answer."""
        value = self.json()
        assert set(value) == {"error"}, value
        return value["error"]


def call(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    *,
    token: str | tuple[str, ...] | None = None,
    headers: tuple[tuple[str, str], ...] = (),
    tls: ssl.SSLContext | None = None,
    host: str = "127.0.0.1",
    timeout: float = 60.0,
) -> Answer:
    """One request. ``body``: bytes as they are, anything else as JSON. ``token``: one
    ``Authorization: Bearer`` header, or one header per tuple entry (sent as given when it
    already names a scheme)."""
    conn: http.client.HTTPConnection
    if tls is not None:
        conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=tls)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        conn.putrequest(method, path)
        tokens = token if isinstance(token, tuple) else (token,) if token else ()
        for t in tokens:
            conn.putheader("Authorization", t if " " in t else f"Bearer {t}")
        sent = {k.lower() for k, _ in headers}
        for key, value in headers:
            conn.putheader(key, value)
        if data is not None:
            if "content-type" not in sent:
                conn.putheader("Content-Type", "application/json")
            conn.putheader("Content-Length", str(len(data)))
        conn.endheaders(data)
        r = conn.getresponse()
        return Answer(r.status, r.headers, r.read())
    finally:
        conn.close()
