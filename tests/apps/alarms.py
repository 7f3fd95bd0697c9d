"""An app for the alarm tests: each namespace's handler shows one behaviour.

Every successful run appends to the object's ``firings`` list: when it was scheduled for,
when it ran (wall clock, ms), its retry count, firing id and worker pid.

- ``record``: records, nothing else.
- ``flaky``: an object named ``fail-<n>`` fails its first ``n`` tries (each noted in
  ``attempts``), then records.
- ``chain``: records what ``get()`` says during the run; on its first run it sets the next
  alarm 300 ms ahead (noted as ``next_ms``).
- ``late``: handled only by ``late_app``, which the test starts when it wants a worker.
"""

from __future__ import annotations

import os
import time
from typing import Any

from wsgate import AlarmInfo, App
from wsgate.worker.gate import current_gate

app = App()
late_app = App()


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _entry(alarm: AlarmInfo, **extra: Any) -> dict[str, Any]:
    return {
        "scheduled_ms": alarm.scheduled_ms,
        "fired_ms": _now_ms(),
        "retry_count": alarm.retry_count,
        "firing_id": alarm.firing_id,
        "pid": os.getpid(),
        **extra,
    }


async def _record(alarm: AlarmInfo, **extra: Any) -> list[dict[str, Any]]:
    entry = _entry(alarm, **extra)  # the time it ran, before any call
    firings: list[dict[str, Any]] = await alarm.storage.get("firings", [])
    firings.append(entry)
    await alarm.storage.put("firings", firings)
    return firings


@app.on_alarm("record")
async def record(alarm: AlarmInfo) -> None:
    await _record(alarm)


@app.on_alarm("flaky")
async def flaky(alarm: AlarmInfo) -> None:
    failures = int(alarm.name.rsplit("-", 1)[1])
    if alarm.retry_count < failures:
        entry = _entry(alarm)
        # Noted outside the output gate, without an idempotency key: the retries of one
        # firing replay its keys from the first on, so a keyed note of a later try would be
        # recognised as the first one's and not applied.
        token = current_gate.set(None)
        try:
            attempts = await alarm.storage.get("attempts", [])
            await alarm.storage.put("attempts", [*attempts, entry])
        finally:
            current_gate.reset(token)
        raise RuntimeError(f"failing as asked ({alarm.retry_count + 1} of {failures})")
    await _record(alarm)


@app.on_alarm("chain")
async def chain(alarm: AlarmInfo) -> None:
    during = await alarm.alarm.get_ms()
    firings = await _record(alarm, alarm_during=during)
    if len(firings) == 1:
        next_ms = _now_ms() + 300
        await alarm.alarm.set(next_ms / 1000)
        await alarm.storage.put("next_ms", next_ms)


@late_app.on_alarm("late")
async def late(alarm: AlarmInfo) -> None:
    await _record(alarm)
