"""camserve's HTTP API, served by the serving process beside gRPC (same event loop, same data
plane): :mod:`~camserve.http.app` (the application and the interface route modules plug into),
:mod:`~camserve.http.middleware` (metrics, headers, errors, limits, auth) and
:mod:`~camserve.http.server` (binding, TLS, start and stop).

Why aiohttp: it already runs in the process (``/metrics``), it is asyncio-native, so it runs
on the gRPC server's event loop and awaits the same data plane: no second server, loop or thread.
"""
