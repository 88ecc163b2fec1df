"""The client's gRPC channels: the service config (round-robin over the replicas, gRPC's
retry policy for UNAVAILABLE), channel arguments and credentials.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import grpc

from camserve.errors import InvalidArgument

__all__ = ["MAX_ATTEMPTS", "MIN_BACKOFF", "RETRYABLE", "SERVICE", "channel_args", "credentials", "service_config"]

#: The gRPC service whose calls are retried (every method of it; not the health service).
SERVICE = "camserve.v1.CamService"
#: Status codes retried, on the next replica, within the call's deadline.
RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)
#: gRPC's own limit on attempts per call (the first one included): larger values are cut to it.
MAX_ATTEMPTS = 5
#: Shortest first retry delay, seconds. With delays of a millisecond or two, grpcio 1.85 now and
#: then never starts the retry and the call waits for its deadline (forever without one): a race
#: around gRPC's retry timer, https://github.com/grpc/grpc/issues/41036. 10 ms avoids it.
MIN_BACKOFF = 0.01


def _duration(seconds: float) -> str:
    """Seconds as a protobuf JSON Duration ("0.05s"), to the microsecond."""
    return f"{seconds:.6f}".rstrip("0").rstrip(".") + "s"


def service_config(retries: int = 4, backoff: float = 0.05) -> dict[str, Any]:
    """The gRPC service config of the client's channels.

    ``round_robin`` over every address the target resolves to, and gRPC's retry policy for
    every method of :data:`SERVICE`: a call answered UNAVAILABLE is tried again, by gRPC, up to
    ``retries`` more times (``maxAttempts = retries + 1``, cut to gRPC's limit of
    :data:`MAX_ATTEMPTS` = 5 attempts, so at most 4 retries), each on the replica round-robin
    picks next, all within the call's deadline. Retry ``n`` (1, 2, ...) waits about
    ``backoff * 2 ** (n - 1)`` seconds (gRPC adds +-20 % jitter); ``backoff`` below
    :data:`MIN_BACKOFF` (10 ms) counts as 10 ms. Other status codes are never retried.
    ``retries=0``: no policy (and the channel is made with retries off).

    >>> service_config(retries=2, backoff=0.05)["methodConfig"][0]["retryPolicy"]
    {'maxAttempts': 3, 'initialBackoff': '0.05s', 'maxBackoff': '0.1s', 'backoffMultiplier': 2, 'retryableStatusCodes': ['UNAVAILABLE']}
    >>> service_config(retries=9)["methodConfig"][0]["retryPolicy"]["maxAttempts"]
    5
    >>> "methodConfig" in service_config(retries=0)
    False
    """
    if retries < 0:
        raise InvalidArgument(f"retries must be >= 0, got {retries}")
    if backoff < 0:
        raise InvalidArgument(f"backoff must be >= 0 seconds, got {backoff}")
    config: dict[str, Any] = {"loadBalancingConfig": [{"round_robin": {}}]}
    backoff = max(backoff, MIN_BACKOFF)
    attempts = min(retries + 1, MAX_ATTEMPTS)
    if attempts >= 2:
        config["methodConfig"] = [
            {
                "name": [{"service": SERVICE}],
                "retryPolicy": {
                    "maxAttempts": attempts,
                    "initialBackoff": _duration(backoff),
                    "maxBackoff": _duration(backoff * 2 ** (attempts - 2)),
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": [code.name for code in RETRYABLE],
                },
            }
        ]
    return config


def channel_args(
    max_message_mb: float, retries: int, backoff: float, options: Sequence[tuple[str, Any]]
) -> list[tuple[str, Any]]:
    """gRPC channel arguments: message size limits both ways, :func:`service_config`, retries
    on or off, then ``options``."""
    size = int(max_message_mb * 1024 * 1024)
    return [
        ("grpc.max_receive_message_length", size),
        ("grpc.max_send_message_length", size),
        ("grpc.service_config", json.dumps(service_config(retries, backoff))),
        ("grpc.enable_retries", 1 if retries > 0 else 0),
        # gRPC retries a call only while it still holds what was sent (256 KiB by default);
        # requests up to the message size limit stay retryable.
        ("grpc.per_rpc_retry_buffer_size", size),
        *options,
    ]


def credentials(tls: bool, root_certificates: bytes | None) -> grpc.ChannelCredentials | None:
    """TLS credentials (PEM ``root_certificates``, or the system's roots), or None for plain text."""
    if not tls and root_certificates is None:
        return None
    return grpc.ssl_channel_credentials(root_certificates=root_certificates)
