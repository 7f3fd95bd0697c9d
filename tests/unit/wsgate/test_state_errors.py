"""The mapping between refusals, ErrorInfo and exceptions, without a server."""

from __future__ import annotations

import pytest

from wsgate.errors import (
    AttachmentTooLarge,
    InvalidObjectId,
    InvalidRequest,
    InvalidValue,
    KeyTooLarge,
    LimitExceeded,
    NotOwner,
    ObjectActive,
    StateError,
    TagTooLarge,
    TooManyKeys,
    TooManyTags,
    ValueTooLarge,
)
from wsgate.state_errors import (
    ERROR_INFO_KEY,
    REFUSAL_TYPES,
    REFUSALS,
    Reason,
    Refusal,
    error_info,
    exception_from_error_info,
    not_owner_metadata,
    object_active_metadata,
)
from wsgate.v1 import state_pb2 as pb


def test_every_refusal_has_one_reason() -> None:
    assert all(issubclass(refusal, REFUSAL_TYPES) for refusal in REFUSALS)
    # Every reason is a refusal of bad input, but OBJECT_ACTIVE and NOT_OWNER
    # (FAILED_PRECONDITION).
    assert sorted(REFUSALS.values()) == sorted(
        set(Reason) - {Reason.OBJECT_ACTIVE, Reason.NOT_OWNER}
    )


def test_an_object_active_refusal_names_the_holder() -> None:
    ((key, value),) = object_active_metadata("worker-abcdefgh")
    assert key == ERROR_INFO_KEY
    exc = exception_from_error_info(pb.ErrorInfo.FromString(value), "object is active")
    assert type(exc) is ObjectActive
    assert exc.holder == "worker-abcdefgh"
    assert str(exc) == "object is active"


def test_a_not_owner_refusal_names_the_owner_and_its_address() -> None:
    ((key, value),) = not_owner_metadata("state-abc", "10.0.0.7:7070")
    assert key == ERROR_INFO_KEY
    exc = exception_from_error_info(pb.ErrorInfo.FromString(value), "not mine")
    assert type(exc) is NotOwner
    assert (exc.owner, exc.address) == ("state-abc", "10.0.0.7:7070")
    assert str(exc) == "not mine"


@pytest.mark.parametrize(
    "exc",
    [
        KeyTooLarge(2049, 2048, "k" * 2049),
        ValueTooLarge(131073, 131072, "key"),
        InvalidValue("value is not a Value"),
        InvalidObjectId("object 'x' has an empty namespace"),
        InvalidRequest("a write names no operation"),
        TooManyKeys(129, 128, "first"),
        TooManyTags(11, 10, "t"),
        TagTooLarge(257, 256, "t" * 257),
        AttachmentTooLarge(16385, 16384),
    ],
)
def test_a_refusal_survives_the_trip_through_error_info(exc: Refusal) -> None:
    info = pb.ErrorInfo.FromString(error_info(exc).SerializeToString())
    back = exception_from_error_info(info, str(exc))
    assert type(back) is type(exc)
    assert str(back) == str(exc)
    if isinstance(exc, LimitExceeded):
        assert isinstance(back, LimitExceeded)
        assert (back.size, back.limit) == (exc.size, exc.limit)
        assert back.key == exc.key[:64]


def test_an_unknown_reason_is_a_plain_state_error_with_the_details() -> None:
    exc = exception_from_error_info(pb.ErrorInfo(reason="FROM_THE_FUTURE"), "why it failed")
    assert type(exc) is StateError
    assert "FROM_THE_FUTURE" in str(exc)
    assert "why it failed" in str(exc)
