"""Where models come from: discovery only. Loading belongs to `multiserve.lifecycle`."""

from __future__ import annotations

import re

_TIMINGS = re.compile(
    r" in [0-9.]+\s*[µmn]?s(, after \d+ retries, max_retries: ?\d+, retry_timeout: ?\S+)?\s*"
)
_CAUSE = re.compile(r'message: "([^"]+)"')


class RepositoryUnavailable(OSError):
    """The repository's root cannot be listed: an outage, not an empty repository."""


def describe(exc: BaseException) -> str:
    """An exception as one readable line. Object-store errors carry the request, its timings
    and a multi-line dump of the client's state: keep what failed and the innermost cause
    (such as "Connection refused"); the full text belongs in the debug log."""
    text = str(exc)
    head, _, dump = text.partition("\n\nDebug source:")
    lines = head.strip().splitlines()
    line = _TIMINGS.sub(" ", lines[0]).strip() if lines else ""
    causes = _CAUSE.findall(dump)
    if causes and causes[-1] not in line:
        line = f"{line} ({causes[-1]})"
    return f"{type(exc).__name__}: {line}"[:400]
