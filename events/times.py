"""Times of the log as people write them: the audit CLI and the history API read the same."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# The times a log entry can carry: its id counts milliseconds from 1970, and Python's dates end
# with the year 9999.
_LATEST_MS = (datetime.max.replace(tzinfo=UTC) - _EPOCH) // timedelta(milliseconds=1)


def parse_time(text: str, now: float | None = None) -> int:
    """Milliseconds since the epoch from an ISO 8601 time (UTC unless it says otherwise) or a
    duration back from now (``90s``, ``15m``, ``6h``, ``7d``). Raises ValueError, saying why, for
    anything else, and for a time before 1970 or after 9999, where no log entry can be."""
    relative = _RELATIVE.match(text.strip())
    try:
        if relative:
            seconds = float(relative[1]) * _UNIT_S[relative[2]]  # 400 digits: inf, and int() overflows
            found = int(((time.time() if now is None else now) - seconds) * 1000)
        else:
            moment = datetime.fromisoformat(text)
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
            found = (moment - _EPOCH) // timedelta(milliseconds=1)
    except ValueError:
        raise ValueError(f"not a time: {_shown(text)} (use ISO 8601, or a duration such as 15m, 6h, 7d)") from None
    except OverflowError:  # a duration back past any date
        found = -1
    if not 0 <= found <= _LATEST_MS:
        raise ValueError(f"{_shown(text)} is out of range: give a time between 1970-01-01 and 9999-12-31")
    return found


def _shown(text: str) -> str:
    """The text as an error message quotes it: a long one cut short."""
    return repr(text if len(text) <= 40 else f"{text[:40]}…")
