"""Wall-clock time as the state service stores it: integer milliseconds since the Unix
epoch (alarm times, idempotency and turn records, departed connections, migrations)."""

from __future__ import annotations

import time


def now_ms() -> int:
    """Wall-clock milliseconds since the Unix epoch (not monotonic: a clock step moves it)."""
    return time.time_ns() // 1_000_000
