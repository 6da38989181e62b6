"""Log lines about something a peer can repeat at will, at most one per interval.

A peer that is not trusted (the guest, for the host) must not be able to write the
host's log: a line per bad frame or forged event is a flood. ``RateLimitedLog`` logs
the first occurrence, then at most one line per ``interval`` seconds saying how many
were not logged since. Stdlib only (the guest ships it too).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

#: Seconds between two lines about the same repeated thing.
DEFAULT_INTERVAL = 10.0


class RateLimitedLog:
    """One kind of repeated event, logged at most once per ``interval`` seconds."""

    def __init__(
        self,
        logger: logging.Logger,
        level: int = logging.WARNING,
        interval: float = DEFAULT_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.level = level
        self.interval = interval
        self.clock = clock
        #: Every occurrence, logged or not.
        self.count = 0
        self._suppressed = 0
        self._last: float | None = None

    def __call__(self, msg: str, *args: object) -> bool:
        """Count one occurrence; log it if the last line is ``interval`` old. Returns
        whether a line was written."""
        self.count += 1
        now = self.clock()
        if self._last is not None and now - self._last < self.interval:
            self._suppressed += 1
            return False
        if self._suppressed:
            msg += " (and %d more like it in the last %.0fs, not logged)"
            args = (*args, self._suppressed, now - self._last if self._last else 0.0)
        self._suppressed = 0
        self._last = now
        self.logger.log(self.level, msg, *args)
        return True


def shorten(text: str | bytes, limit: int = 80) -> str:
    """``text`` (a peer's, of any length) as a short repr for a log line or an error."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} in all)"
