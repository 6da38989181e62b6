"""gRPC status codes and the exception carried over ttrpc."""

from __future__ import annotations

import enum

from carapace.errors import (
    AlreadyExists,
    CarapaceError,
    InvalidArgument,
    NotFound,
    StateError,
)
from carapace.protocols import status_pb2


class Code(enum.IntEnum):
    """The canonical gRPC status codes (google.rpc.Code)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class TtrpcError(Exception):
    """A call failed with a non-OK status, either reported by the peer or locally."""

    code: Code
    message: str

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(code, message)
        self.code = Code(code)
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    def __repr__(self) -> str:
        return f"TtrpcError({self.code.name}, {self.message!r})"

    def to_status(self) -> status_pb2.Status:
        """The google.rpc.Status this error is sent as."""
        return status_pb2.Status(code=int(self.code), message=self.message)

    @classmethod
    def from_status(cls, status: status_pb2.Status) -> TtrpcError:
        """Build the error for a non-OK status; unknown codes map to UNKNOWN."""
        try:
            code = Code(status.code)
        except ValueError:
            return cls(Code.UNKNOWN, f"status code {status.code}: {status.message}")
        return cls(code, status.message)


#: carapace's errors and the status each is answered with over ttrpc (the shim's and
#: the agent's guards both use it, so a kind of failure has one code everywhere).
CARAPACE_CODES: tuple[tuple[type[CarapaceError], Code], ...] = (
    (NotFound, Code.NOT_FOUND),
    (AlreadyExists, Code.ALREADY_EXISTS),
    (InvalidArgument, Code.INVALID_ARGUMENT),
    (StateError, Code.FAILED_PRECONDITION),
)


def to_ttrpc_error(e: CarapaceError) -> TtrpcError:
    """The TtrpcError that answers a request failed with ``e``."""
    for cls, code in CARAPACE_CODES:
        if isinstance(e, cls):
            return TtrpcError(code, str(e))
    return TtrpcError(Code.UNKNOWN, f"{type(e).__name__}: {e}")
