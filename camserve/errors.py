"""The one error hierarchy of camserve: :class:`CamserveError` and its kinds.

Every exception camserve raises on purpose derives from one kind below. A kind carries the
status it is answered with (``code`` for gRPC, ``http_status`` for HTTP, SPEC §6), so the
server maps errors by kind and never by guess: anything that is not a :class:`CamserveError`
is a bug and is answered INTERNAL (and logged). Messages say what was wrong and what is
allowed.

The kinds for bad input also derive from the matching built-in exception, so library users
can keep catching ``ValueError`` / ``LookupError``:

>>> issubclass(NotFound, LookupError), issubclass(InvalidArgument, ValueError)
(True, True)
>>> InvalidArgument("top_k must be >= 1").code, NotFound.http_status
('INVALID_ARGUMENT', 404)
"""

from __future__ import annotations


class CamserveError(Exception):
    """Base of every camserve error. ``code``: the gRPC status code name it maps to;
    ``http_status``: the HTTP status. A kind declares both in its class line."""

    code: str = "INTERNAL"
    http_status: int = 500

    def __init_subclass__(cls, code: str | None = None, http_status: int | None = None, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if code is not None:
            cls.code = code
        if http_status is not None:
            cls.http_status = http_status


class InvalidArgument(CamserveError, ValueError, code="INVALID_ARGUMENT", http_status=400):
    """A bad image or parameter sent by the caller."""


class NotFound(CamserveError, LookupError, code="NOT_FOUND", http_status=404):
    """An unknown model, version, layer or class."""


class ResourceExhausted(CamserveError, code="RESOURCE_EXHAUSTED", http_status=429):
    """A full queue, or a request or answer over a size limit."""


class DeadlineExceeded(CamserveError, code="DEADLINE_EXCEEDED", http_status=504):
    """The caller's deadline passed before the work was done."""


class Unavailable(CamserveError, code="UNAVAILABLE", http_status=503):
    """Not serving right now (loading, warming up, draining): retry, maybe elsewhere."""


class Unauthenticated(CamserveError, code="UNAUTHENTICATED", http_status=401):
    """A missing or wrong credential."""


#: Every kind; an error has exactly one.
KINDS: tuple[type[CamserveError], ...] = (
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    DeadlineExceeded,
    Unavailable,
    Unauthenticated,
)


def kind_of(exc: BaseException) -> type[CamserveError] | None:
    """The kind of a camserve error, or None for anything else (a bug: INTERNAL).

    >>> kind_of(NotFound("no model 'x'")).__name__, kind_of(KeyError("x"))
    ('NotFound', None)
    """
    for kind in KINDS:
        if isinstance(exc, kind):
            return kind
    return None
