"""The HTTP application's middlewares and route interface on a stub data plane (no model, no
TensorFlow): error bodies by kind, route-specific error shapes, public handlers, the CSP on
HTML, request ids on 500s, the body limit, and the http_port setting."""

from __future__ import annotations

import asyncio
import re
import types
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from camserve import errors
from camserve.http.app import (
    CONTENT_SECURITY_POLICY,
    HttpContext,
    deadline_of,
    error_body,
    make_app,
    public,
    read_json,
)
from camserve.serving.config import ServerConfig, add_arguments, from_args

TOKEN = "t0k"


def _app(max_message_mb: float = 0.01, cors: tuple[str, ...] = ()) -> tuple[web.Application, CollectorRegistry]:
    cfg = ServerConfig.load(env={}, overrides={"max_message_mb": max_message_mb, "http_cors_origins": list(cors)})
    registry = CollectorRegistry()
    ctx = HttpContext(dataplane=types.SimpleNamespace(config=cfg), servicer=None, registry=registry, token=TOKEN)  # type: ignore[arg-type]
    app = make_app(ctx, route_modules=())

    async def raises(request: web.Request) -> web.Response:
        kind = getattr(errors, request.match_info["kind"])
        raise kind(f"{kind.__name__} happened; allowed: nothing")

    @error_body(lambda code, message: {"error": message})
    async def oip_style(request: web.Request) -> web.Response:
        raise errors.NotFound("no model 'x'")

    @public
    async def page(request: web.Request) -> web.Response:
        return web.Response(text="<!doctype html><p>hi</p>", content_type="text/html")

    async def bug(request: web.Request) -> web.Response:
        return {}["missing"]

    async def echo(request: web.Request) -> web.Response:
        return web.json_response({"got": await read_json(request), "deadline": deadline_of(request) is not None})

    app.router.add_get("/raise/{kind}", raises)
    app.router.add_get("/oip", oip_style)
    app.router.add_get("/", page)
    app.router.add_get("/bug", bug)
    app.router.add_post("/echo", echo)
    return app, registry


def _run(check: Any, cors: tuple[str, ...] = ()) -> None:
    async def main() -> None:
        app, registry = _app(cors=cors)
        async with TestClient(TestServer(app)) as client:
            await check(client, registry)

    asyncio.run(main())


AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.mark.parametrize("kind", [k.__name__ for k in errors.KINDS])
def test_every_error_kind_gets_its_http_status_and_json_body(kind: str) -> None:
    async def check(client: TestClient, _: Any) -> None:
        r = await client.get(f"/raise/{kind}", headers=AUTH)
        cls = getattr(errors, kind)
        assert r.status == cls.http_status and r.content_type == "application/json"
        assert await r.json() == {"error": {"code": cls.code, "message": f"{kind} happened; allowed: nothing"}}

    _run(check)


def test_route_error_shapes_public_pages_csp_and_request_ids() -> None:
    async def check(client: TestClient, registry: CollectorRegistry) -> None:
        r = await client.get("/oip", headers=AUTH)
        assert r.status == 404 and await r.json() == {"error": "no model 'x'"}
        r = await client.get("/oip")  # the route's shape for auth errors too
        assert r.status == 401 and (await r.json())["error"].startswith("missing bearer token")
        page = await client.get("/")  # public: no token
        assert page.status == 200 and page.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
        assert "script-src 'self'" in CONTENT_SECURITY_POLICY and "unsafe-inline" not in CONTENT_SECURITY_POLICY
        assert page.headers["X-Frame-Options"] == "DENY" and "Access-Control-Allow-Origin" not in page.headers
        r = await client.get("/raise/NotFound", headers=AUTH)
        assert "Content-Security-Policy" not in r.headers  # JSON answers need none
        r = await client.get("/raise/NotFound", headers={**AUTH, "X-Request-Id": "abc-99"})
        assert r.headers["X-Request-Id"] == "abc-99"  # the id the failure is logged under
        r = await client.get("/raise/NotFound", headers={**AUTH, "X-Request-Id": "x" * 65})
        assert re.fullmatch(r"[0-9a-f]{12}", r.headers["X-Request-Id"])  # not a sane id (gRPC's rule): a new one
        r = await client.get("/bug", headers={**AUTH, "X-Request-Id": "abc-123"})
        assert r.status == 500 and r.headers["X-Request-Id"] == "abc-123"
        assert await r.json() == {
            "error": {
                "code": "INTERNAL",
                "message": "internal error (KeyError); the server log has the details (request id abc-123)",
            }
        }
        sample = registry.get_sample_value(
            "camserve_http_requests_total", {"method": "GET", "route": "/bug", "status": "500"}
        )
        assert sample == 1.0

    _run(check)


def test_unknown_routes_and_wrong_methods_take_the_error_path_with_request_ids() -> None:
    async def check(client: TestClient, registry: CollectorRegistry) -> None:
        # No token needed to learn that a route does not exist (as gRPC's UNIMPLEMENTED).
        r = await client.get("/nowhere/x", headers={"X-Request-Id": "nf-1"})
        assert r.status == 404 and r.headers["X-Request-Id"] == "nf-1" and r.content_type == "application/json"
        # The paths this app registered in _app(): /raise/{kind}, /oip, /, /bug, /echo.
        expected = ["/", "/bug", "/echo", "/oip", "/raise"]
        assert await r.json() == {
            "error": {
                "code": "NOT_FOUND",
                "message": f"no route GET /nowhere/x; paths start with {expected} (see the README's HTTP API section)",
            }
        }
        r = await client.get("/echo", headers=AUTH)  # /echo takes POST only
        assert r.status == 405 and r.headers["Allow"] == "POST"
        assert re.fullmatch(r"[0-9a-f]{12}", r.headers["X-Request-Id"])  # none sent: a new one
        assert await r.json() == {
            "error": {"code": "UNIMPLEMENTED", "message": "GET is not allowed here; allowed: POST"}
        }
        r = await client.post("/echo", data=b"1" * (int(0.01 * 2**20) + 1), headers={**AUTH, "X-Request-Id": "big"})
        assert r.status == 413 and r.headers["X-Request-Id"] == "big"
        sample = registry.get_sample_value(
            "camserve_http_requests_total", {"method": "GET", "route": "unmatched", "status": "404"}
        )
        assert sample == 1.0

    _run(check)


def test_body_limit_json_errors_and_the_timeout_header() -> None:
    async def check(client: TestClient, _: Any) -> None:
        limit = int(0.01 * 2**20)
        r = await client.post("/echo", data=b"1" * (limit + 1), headers=AUTH)
        assert r.status == 413 and (await r.json())["error"]["code"] == "RESOURCE_EXHAUSTED"

        async def chunks():  # no Content-Length: cut off while reading
            for _ in range(4):
                yield b" " * limit

        r = await client.post("/echo", data=chunks(), headers=AUTH)
        assert r.status == 413 and "is longer, more than the" in (await r.json())["error"]["message"]
        r = await client.post("/echo", data=b"[1, 2]", headers={**AUTH, "Connect-Timeout-Ms": "250"})
        assert await r.json() == {"got": [1, 2], "deadline": True}
        r = await client.post("/echo", data=b"[1]", headers={**AUTH, "Connect-Timeout-Ms": "-5"})
        assert r.status == 400 and "positive number of milliseconds" in (await r.json())["error"]["message"]

    _run(check)


def test_http_port_is_a_flag_an_environment_variable_and_a_toml_key(tmp_path) -> None:
    import argparse

    assert ServerConfig().http_port == 8080
    assert {ServerConfig().port, ServerConfig().metrics_port, ServerConfig().http_port} == {8500, 8501, 8080}
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert from_args(parser.parse_args(["--http-port", "-1"]), env={}).http_port == -1
    assert ServerConfig.load(env={"CAMSERVE_HTTP_PORT": "0"}).http_port == 0
    toml = tmp_path / "serve.toml"
    toml.write_text("[serve]\nhttp_port = 9090\n")
    assert ServerConfig.load(toml, env={}).http_port == 9090
    with pytest.raises(errors.InvalidArgument, match=r"http_port=70000"):
        ServerConfig.load(env={}, overrides={"http_port": 70000})


PAGE = "https://viewer.example:8443"
PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}


def test_cors_is_off_by_default() -> None:
    async def check(client: TestClient, _: Any) -> None:
        r = await client.post("/echo", data=b"[1]", headers={**AUTH, "Origin": PAGE})
        assert r.status == 200 and not [k for k in r.headers if k.lower().startswith("access-control-")]
        r = await client.options("/echo", headers={"Origin": PAGE, **PREFLIGHT})
        assert r.status == 405 and not [k for k in r.headers if k.lower().startswith("access-control-")]

    _run(check)


def test_cors_for_allowed_origins_only() -> None:
    async def check(client: TestClient, _: Any) -> None:
        # A preflight from an allowed page: answered without the token (browsers send none).
        r = await client.options("/echo", headers={"Origin": PAGE, **PREFLIGHT})
        assert r.status == 204 and r.headers["Access-Control-Allow-Origin"] == PAGE and r.headers["Vary"] == "Origin"
        assert [m.strip() for m in r.headers["Access-Control-Allow-Methods"].split(",")] == ["GET", "POST"]
        sent = {h.strip().lower() for h in r.headers["Access-Control-Allow-Headers"].split(",")}
        assert {"authorization", "content-type", "connect-timeout-ms", "inference-header-content-length"} <= sent
        assert int(r.headers["Access-Control-Max-Age"]) > 0
        # Its requests: answers and errors (401 without the token, 404) carry the origin.
        r = await client.post("/echo", data=b"[1]", headers={**AUTH, "Origin": PAGE})
        assert r.status == 200 and await r.json() == {"got": [1], "deadline": False}
        assert r.headers["Access-Control-Allow-Origin"] == PAGE and r.headers["Vary"] == "Origin"
        assert "X-Request-Id" in r.headers["Access-Control-Expose-Headers"]
        r = await client.post("/echo", data=b"[1]", headers={"Origin": PAGE})
        assert r.status == 401 and r.headers["Access-Control-Allow-Origin"] == PAGE
        r = await client.get("/raise/NotFound", headers={**AUTH, "Origin": PAGE})
        assert r.status == 404 and r.headers["Access-Control-Allow-Origin"] == PAGE
        # Another origin (another port or scheme is another origin): no CORS headers, no preflight.
        for other in ("https://evil.example", "https://viewer.example", "http://viewer.example:8443"):
            r = await client.post("/echo", data=b"[1]", headers={**AUTH, "Origin": other})
            assert r.status == 200 and not [k for k in r.headers if k.lower().startswith("access-control-")]
            r = await client.options("/echo", headers={"Origin": other, **PREFLIGHT})
            assert r.status == 405 and "Access-Control-Allow-Origin" not in r.headers

    _run(check, cors=(PAGE, "http://localhost:3000"))


def test_cors_wildcard_allows_any_origin() -> None:
    async def check(client: TestClient, _: Any) -> None:
        r = await client.get("/raise/NotFound", headers={**AUTH, "Origin": "https://any.example"})
        assert r.headers["Access-Control-Allow-Origin"] == "https://any.example" and r.headers["Vary"] == "Origin"
        r = await client.get("/raise/NotFound", headers=AUTH)  # no Origin: not a cross-origin call
        assert "Access-Control-Allow-Origin" not in r.headers

    _run(check, cors=("*",))


def test_http_cors_origins_is_a_flag_an_environment_variable_and_a_toml_key(tmp_path) -> None:
    import argparse

    assert ServerConfig().http_cors_origins == []
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--http-cors-origins", "https://a.example,http://localhost:3000"])
    assert from_args(args, env={}).http_cors_origins == ["https://a.example", "http://localhost:3000"]
    assert ServerConfig.load(env={"CAMSERVE_HTTP_CORS_ORIGINS": "*"}).http_cors_origins == ["*"]
    toml = tmp_path / "serve.toml"
    toml.write_text('[serve]\nhttp_cors_origins = ["https://b.example:8443"]\n')
    assert ServerConfig.load(toml, env={}).http_cors_origins == ["https://b.example:8443"]
    for bad in ("https://a.example/", "a.example", "https://a.example/viewer"):
        with pytest.raises(errors.InvalidArgument, match=r"http_cors_origins: .* is not an origin"):
            ServerConfig.load(env={}, overrides={"http_cors_origins": [bad]})
