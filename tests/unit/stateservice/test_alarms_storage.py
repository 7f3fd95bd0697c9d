"""The alarms table on both databases (the ``backend`` fixture): set/get/delete, the
schedule order, finishing a firing, retries with backoff, giving up, and surviving a
reopen. Also the pure parts of the worker's side: time conversions and registering alarm
handlers."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone

import pytest

from tests.backends import Backend
from wsgate.config import StateConfig
from wsgate.errors import ConfigError
from wsgate.stateservice.alarms import (
    EarliestAlarms,
    FinishAlarm,
    PutAlarm,
    ReadAlarm,
    RemoveAlarm,
    RetryAlarm,
    RetryOutcome,
    RetryPolicy,
    new_firing_id,
)
from wsgate.stateservice.storage import ObjectId, PostgresStorage, Storage
from wsgate.worker.alarms_client import AlarmInfo, from_epoch_ms, to_epoch_ms
from wsgate.worker.app import App

OBJ = ObjectId("room", "lobby")
POLICY = RetryPolicy(first_ms=1000, max_ms=8000, max_retries=3)


@pytest.fixture
async def storage(backend: Backend) -> AsyncIterator[Storage]:
    async with backend.storage() as storage:
        yield storage


async def test_set_get_replace_delete(storage: Storage) -> None:
    assert await storage.run(ReadAlarm(OBJ)) is None
    await storage.run(PutAlarm(OBJ, 1_000, "f1"))
    alarm = await storage.run(ReadAlarm(OBJ))
    assert alarm is not None
    assert (alarm.scheduled_ms, alarm.at_ms, alarm.retry_count, alarm.firing_id) == (
        1_000,
        1_000,
        0,
        "f1",
    )
    await storage.run(PutAlarm(OBJ, 2_000, "f2"))  # one alarm per object: replaced
    alarm = await storage.run(ReadAlarm(OBJ))
    assert alarm is not None
    assert (alarm.scheduled_ms, alarm.firing_id) == (2_000, "f2")
    assert await storage.run(RemoveAlarm(OBJ)) is True
    assert await storage.run(ReadAlarm(OBJ)) is None
    assert await storage.run(RemoveAlarm(OBJ)) is False


async def test_objects_have_their_own_alarms(storage: Storage) -> None:
    await storage.run(PutAlarm(OBJ, 1, "a"))
    await storage.run(PutAlarm(ObjectId("room", "other"), 2, "b"))
    await storage.run(PutAlarm(ObjectId("counter", "lobby"), 3, "c"))
    await storage.run(RemoveAlarm(OBJ))
    assert [a.firing_id for a in await storage.run(EarliestAlarms(10))] == ["b", "c"]


async def test_earliest_alarms_come_first_and_are_limited(storage: Storage) -> None:
    for i, at in enumerate([50, 10, 40, 20, 30]):
        await storage.run(PutAlarm(ObjectId("ns", f"o{i}"), at, f"f{i}"))
    earliest = await storage.run(EarliestAlarms(3))
    assert [a.at_ms for a in earliest] == [10, 20, 30]
    assert [a.name for a in earliest] == ["o1", "o3", "o4"]


def test_backoff_doubles_up_to_the_cap() -> None:
    assert [POLICY.delay_ms(step) for step in range(6)] == [1000, 2000, 4000, 8000, 8000, 8000]
    assert POLICY.delay_ms(10_000) == 8000  # no overflow, no huge integers


def test_policy_from_config() -> None:
    config = StateConfig(alarm_first_backoff_s=0.25, alarm_max_backoff_s=3, alarm_max_retries=2)
    assert RetryPolicy.from_config(config) == RetryPolicy(first_ms=250, max_ms=3000, max_retries=2)
    default = RetryPolicy.from_config(StateConfig())
    assert default.max_retries == 6  # Cloudflare's number


@pytest.mark.parametrize(
    "settings",
    [
        {"alarm_timeout_s": 0},
        {"alarm_first_backoff_s": 0},
        {"alarm_first_backoff_s": 5, "alarm_max_backoff_s": 1},
        {"alarm_max_retries": -1},
    ],
)
def test_bad_alarm_settings_are_refused(settings: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        StateConfig(**settings)  # type: ignore[arg-type]


async def test_a_failed_firing_is_retried_with_backoff_then_given_up(
    storage: Storage,
) -> None:
    await storage.run(PutAlarm(OBJ, 100, "f"))
    now = 10_000
    for expected_retry, expected_delay in [(1, 1000), (2, 2000), (3, 4000)]:
        retried = await storage.run(RetryAlarm(OBJ, "f", now, counted=True, policy=POLICY))
        assert retried.outcome is RetryOutcome.RESCHEDULED
        assert (retried.retry_count, retried.at_ms) == (expected_retry, now + expected_delay)
        alarm = await storage.run(ReadAlarm(OBJ))
        assert alarm is not None
        # The firing keeps its id and the time it was set for; only the next try moves.
        assert (alarm.firing_id, alarm.scheduled_ms, alarm.at_ms) == ("f", 100, retried.at_ms)
        assert alarm.retry_count == expected_retry
    gave_up = await storage.run(RetryAlarm(OBJ, "f", now, counted=True, policy=POLICY))
    assert (gave_up.outcome, gave_up.retry_count) == (RetryOutcome.GAVE_UP, 3)
    assert await storage.run(ReadAlarm(OBJ)) is None


async def test_undelivered_tries_back_off_but_never_give_up(storage: Storage) -> None:
    await storage.run(PutAlarm(OBJ, 100, "f"))
    delays = []
    for _ in range(POLICY.max_retries + 5):
        retried = await storage.run(RetryAlarm(OBJ, "f", 0, counted=False, policy=POLICY))
        assert retried.outcome is RetryOutcome.RESCHEDULED
        assert retried.retry_count == 0
        delays.append(retried.at_ms)
    assert delays[:5] == [1000, 2000, 4000, 8000, 8000]
    # Once a worker answers and fails, it counts from there; the backoff stays grown.
    retried = await storage.run(RetryAlarm(OBJ, "f", 0, counted=True, policy=POLICY))
    assert (retried.retry_count, retried.at_ms) == (1, 8000)


async def test_a_new_alarm_set_during_a_firing_is_kept(storage: Storage) -> None:
    await storage.run(PutAlarm(OBJ, 100, "first"))
    await storage.run(PutAlarm(OBJ, 100, "second"))  # same time, yet a new firing
    assert await storage.run(FinishAlarm(OBJ, "first")) is False
    retried = await storage.run(RetryAlarm(OBJ, "first", 0, counted=True, policy=POLICY))
    assert retried.outcome is RetryOutcome.REPLACED
    alarm = await storage.run(ReadAlarm(OBJ))
    assert alarm is not None
    assert (alarm.firing_id, alarm.at_ms, alarm.retry_count) == ("second", 100, 0)
    assert await storage.run(FinishAlarm(OBJ, "second")) is True
    assert await storage.run(ReadAlarm(OBJ)) is None


async def test_a_deleted_alarm_is_not_retried(storage: Storage) -> None:
    await storage.run(PutAlarm(OBJ, 100, "f"))
    await storage.run(RemoveAlarm(OBJ))
    retried = await storage.run(RetryAlarm(OBJ, "f", 0, counted=True, policy=POLICY))
    assert retried.outcome is RetryOutcome.REPLACED
    assert await storage.run(ReadAlarm(OBJ)) is None


async def test_setting_again_resets_the_retries(storage: Storage) -> None:
    await storage.run(PutAlarm(OBJ, 100, "f"))
    await storage.run(RetryAlarm(OBJ, "f", 0, counted=True, policy=POLICY))
    await storage.run(PutAlarm(OBJ, 500, "g"))
    alarm = await storage.run(ReadAlarm(OBJ))
    assert alarm is not None
    assert (alarm.at_ms, alarm.retry_count, alarm.backoff_step) == (500, 0, 0)


async def test_alarms_survive_reopening(backend: Backend) -> None:
    async with backend.storage() as storage:
        await storage.run(PutAlarm(OBJ, 100, "f"))
        await storage.run(RetryAlarm(OBJ, "f", 0, counted=True, policy=POLICY))
    async with backend.storage() as storage:
        alarm = await storage.run(ReadAlarm(OBJ))
    assert alarm is not None
    assert (alarm.firing_id, alarm.retry_count, alarm.at_ms) == ("f", 1, 1000)


def test_firing_ids_are_fresh_tokens() -> None:
    ids = {new_firing_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(i.isalnum() and len(i) == 32 for i in ids)


# -- the worker's time conversions ---------------------------------------------------------


def test_times_convert_to_epoch_milliseconds() -> None:
    when = datetime(2030, 1, 2, 3, 4, 5, 678_000, tzinfo=UTC)
    ms = to_epoch_ms(when)
    assert ms == 1_893_553_445_678
    assert from_epoch_ms(ms) == when
    assert to_epoch_ms(when.astimezone(timezone(timedelta(hours=5)))) == ms
    assert to_epoch_ms(1_893_553_445.678) == ms
    assert to_epoch_ms(0) == 0
    assert to_epoch_ms(-1.5) == -1500


@pytest.mark.parametrize(
    ("when", "error"),
    [
        (datetime(2030, 1, 1), ValueError),  # naive: which time zone?
        (math.nan, ValueError),
        (math.inf, ValueError),
        (1e300, ValueError),
        (True, TypeError),
        ("2030-01-01", TypeError),
    ],
)
def test_bad_times_are_refused(when: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        to_epoch_ms(when)  # type: ignore[arg-type]


# -- registering alarm handlers --------------------------------------------------------------


def test_alarm_handlers_are_registered_per_namespace() -> None:
    app = App()

    @app.on_alarm("room")
    async def ring(alarm: AlarmInfo) -> None:
        """Nothing."""

    assert dict(app.alarm_handlers) == {"room": ring}
    with pytest.raises(ValueError, match="already has an alarm handler"):
        app.on_alarm("room")
    with pytest.raises(ValueError, match="needs a namespace"):
        app.on_alarm("")
    with pytest.raises(TypeError):
        app.alarm_handlers["other"] = ring  # type: ignore[index]


# PostgreSQL only: a database that collates text by language, not bytes.
async def test_the_schedule_is_in_byte_order_on_a_language_collated_database(
    language_collated_dsn: str,
) -> None:
    """Alarms due at the same time come in (namespace, name) byte order, and paging from a
    cursor goes on from it, also where the database's own collation is a language's."""
    objs = [ObjectId(ns, name) for ns in ("b", "B", "a-b", "ab", "a_c") for name in ("x", "X-")]
    expected = sorted((obj.namespace, obj.name) for obj in objs)  # ASCII: byte order
    async with PostgresStorage(language_collated_dsn, migrate=True) as storage:
        for i, obj in enumerate(objs):
            await storage.run(PutAlarm(obj, 100, f"f{i}"))
        first = await storage.run(EarliestAlarms(len(objs)))
        assert [(a.namespace, a.name) for a in first] == expected
        paged: list[tuple[str, str]] = []
        after: tuple[int, str, str] | None = None
        while page := await storage.run(EarliestAlarms(3, after)):
            paged += [(a.namespace, a.name) for a in page]
            after = (page[-1].at_ms, page[-1].namespace, page[-1].name)
        assert paged == expected
