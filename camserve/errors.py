"""Error kinds shared by the library, the server and the client.

The server maps them onto gRPC status codes (SPEC §6): :class:`InvalidArgument` to
INVALID_ARGUMENT, :class:`NotFound` to NOT_FOUND. Messages say what was wrong and what
is allowed.

>>> issubclass(NotFound, LookupError), issubclass(InvalidArgument, ValueError)
(True, True)
"""


class InvalidArgument(ValueError):
    """A bad image or parameter sent by the caller."""


class NotFound(LookupError):
    """An unknown model, version, layer or class."""
