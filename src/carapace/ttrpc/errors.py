"""gRPC status codes and the exception carried over ttrpc."""

from __future__ import annotations

import enum

from carapace.errors import (
    AlreadyExists,
    CarapaceError,
    CommandFailed,
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


#: The ErrorInfo domain of carapace's reasons.
DOMAIN = "carapace"


class TtrpcError(Exception):
    """A call failed with a non-OK status, either reported by the peer or locally."""

    code: Code
    message: str
    #: A machine-readable reason (google.rpc.ErrorInfo's), or "": what the receiver
    #: may act on without reading the message.
    reason: str

    def __init__(self, code: Code, message: str, reason: str = "") -> None:
        super().__init__(code, message)
        self.code = Code(code)
        self.message = message
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    def __repr__(self) -> str:
        reason = f", reason={self.reason!r}" if self.reason else ""
        return f"TtrpcError({self.code.name}, {self.message!r}{reason})"

    def to_status(self) -> status_pb2.Status:
        """The google.rpc.Status this error is sent as (the reason as an ErrorInfo)."""
        status = status_pb2.Status(code=int(self.code), message=self.message)
        if self.reason:
            status.details.add().Pack(status_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN))
        return status

    @classmethod
    def from_status(cls, status: status_pb2.Status) -> TtrpcError:
        """Build the error for a non-OK status; unknown codes map to UNKNOWN. The
        reason is the first ErrorInfo's of carapace's domain among the details."""
        reason = ""
        for detail in status.details:
            info = status_pb2.ErrorInfo()
            if detail.Unpack(info) and info.domain == DOMAIN:
                reason = info.reason
                break
        try:
            code = Code(status.code)
        except ValueError:
            return cls(Code.UNKNOWN, f"status code {status.code}: {status.message}", reason)
        return cls(code, status.message, reason)


#: carapace's errors and the status each is answered with over ttrpc (the shim's and
#: the agent's guards both use it, so a kind of failure has one code everywhere).
CARAPACE_CODES: tuple[tuple[type[CarapaceError], Code], ...] = (
    (NotFound, Code.NOT_FOUND),
    (AlreadyExists, Code.ALREADY_EXISTS),
    (InvalidArgument, Code.INVALID_ARGUMENT),
    (StateError, Code.FAILED_PRECONDITION),
)


def to_ttrpc_error(e: CarapaceError) -> TtrpcError:
    """The TtrpcError that answers a request failed with ``e`` (a command that could
    not be started keeps its reason, so a client can tell 127 from 126)."""
    for cls, code in CARAPACE_CODES:
        if isinstance(e, cls):
            return TtrpcError(code, str(e))
    reason = e.reason if isinstance(e, CommandFailed) else ""
    return TtrpcError(Code.UNKNOWN, f"{type(e).__name__}: {e}", reason)
