"""The one exception hierarchy of carapace.

Every message says what was wrong, the value seen and what would be accepted, so a
user can act on it from a terminal or from ``kubectl describe pod``.
"""

from __future__ import annotations


class CarapaceError(Exception):
    """Base of every error carapace reports to a user."""

    #: Exit status the CLI uses for this error (runc and docker use 125 for their own failures).
    exit_code = 125


class InvalidArgument(CarapaceError):
    """A value given by the user (flag, annotation, spec field, config key) is not accepted."""


class NotFound(CarapaceError):
    """A sandbox, container, process or file that was named does not exist."""


class AlreadyExists(CarapaceError):
    """Something with that name exists already."""


class HostError(CarapaceError):
    """The host lacks something carapace needs (a package, a device, a permission)."""


class ImageError(CarapaceError):
    """The guest image cannot be built or is unusable."""


class HypervisorError(CarapaceError):
    """The VM failed to start, boot or answer."""


class AgentError(CarapaceError):
    """The guest agent refused or failed a request."""


class CommandFailed(AgentError):
    """The container's command could not be started; ``reason`` is how the guest tells
    which (over ttrpc, in the status's ErrorInfo), ``exit_code`` is docker's and a
    shell's status for it."""

    reason = ""


class CommandNotFound(CommandFailed):
    """The container's command does not exist (not in $PATH, no such file)."""

    exit_code = 127
    reason = "EXEC_NOT_FOUND"


class CommandNotExecutable(CommandFailed):
    """The container's command exists but cannot be executed (no permission, a
    directory)."""

    exit_code = 126
    reason = "EXEC_PERMISSION_DENIED"


#: The command failures by the reason the guest gives.
COMMAND_FAILURES: dict[str, type[CommandFailed]] = {
    cls.reason: cls for cls in (CommandNotFound, CommandNotExecutable)
}


def agent_error(message: str, reason: str = "") -> AgentError:
    """The error for a failure the agent (or a service relaying it) reported: a
    CommandFailed subclass when ``reason`` names one, else an AgentError."""
    return COMMAND_FAILURES.get(reason, AgentError)(message)


class StateError(CarapaceError):
    """An operation is not valid in the sandbox's or container's current state."""


#: The most characters of a value an error message quotes.
SHOWN_LIMIT = 64


def shown(value: object, limit: int = SHOWN_LIMIT) -> str:
    """``repr(value)`` for an error message, cut to ``limit`` characters: a hostile
    value (a 1 MiB annotation, a 10**5000 integer, a deeply nested list) must not make
    the message huge or raise while it is built."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # an int past Python's digit limit, deep nesting
        return f"<a {type(value).__name__} too large to show>"
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"
