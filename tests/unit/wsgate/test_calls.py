"""wsgate.calls: the wire format of calls of durable objects' methods, its limits, and
each error kind as one exception class, both ways."""

from __future__ import annotations

import pytest

from wsgate import calls, envelopes
from wsgate.errors import (
    CallCycle,
    CallError,
    CallFailed,
    CallTooLarge,
    CallUnavailable,
    InvalidCall,
    InvalidEnvelope,
    NoSuchMethod,
)
from wsgate.v1 import envelope_pb2 as pb
from wsgate.values import encode_value

CALL = pb.ObjectCall(object=calls.object_ref("Counter", "a"), method="add", call_id="c1")


def largest_blob(limit: int, encode: object) -> int:
    """The largest n whose blob of n bytes encodes (by ``encode``) within ``limit``."""
    size = limit
    while len(encode(b"y" * size)) > limit:  # type: ignore[operator]
        size -= 1
    return size


def test_arguments_round_trip() -> None:
    data = calls.encode_arguments((1, "two", b"3", [None, 4.5]), {"flag": True, "m": {"k": [1]}})
    assert calls.decode_arguments(data) == (
        [1, "two", b"3", [None, 4.5]],
        {"flag": True, "m": {"k": [1]}},
    )


def test_arguments_at_the_limit_and_over_it() -> None:
    size = largest_blob(calls.MAX_CALL_BYTES, lambda blob: encode_value([[blob], {}]))
    data = calls.encode_arguments([b"y" * size], {})
    assert len(data) == calls.MAX_CALL_BYTES
    assert calls.decode_arguments(data) == ([b"y" * size], {})
    with pytest.raises(CallTooLarge):
        calls.encode_arguments([b"y" * (size + 1)], {})
    over = encode_value([[b"y" * (size + 1)], {}])
    with pytest.raises(InvalidCall):
        calls.decode_arguments(over)  # a host refuses them too


def test_arguments_that_are_no_values_are_invalid() -> None:
    with pytest.raises(InvalidCall):
        calls.encode_arguments([object()], {})
    for garbage in (b"\xff\xff", encode_value([1, 2]), encode_value("x"), encode_value([[], []])):
        with pytest.raises(InvalidCall):
            calls.decode_arguments(garbage)


def test_a_result_at_the_limit_and_over_it() -> None:
    size = largest_blob(calls.MAX_CALL_BYTES, encode_value)
    result = calls.value_result(b"y" * size)
    assert len(result.value) == calls.MAX_CALL_BYTES
    assert calls.result_value(result, CALL) == b"y" * size
    over = calls.value_result(b"y" * (size + 1))
    assert over.error.kind == pb.CallError.TOO_LARGE
    with pytest.raises(CallTooLarge):
        calls.result_value(over, CALL)


def test_a_result_that_is_no_value_is_invalid() -> None:
    with pytest.raises(InvalidCall):
        calls.result_value(calls.value_result({1: "not a str key"}), CALL)


@pytest.mark.parametrize(
    "error",
    [
        NoSuchMethod("no add"),
        CallTooLarge("big"),
        CallCycle("a -> b -> a"),
        CallUnavailable("away"),
        InvalidCall("bad"),
    ],
)
def test_each_error_kind_round_trips_as_its_class(error: CallError) -> None:
    raised = calls.error_of(calls.error_result(error).error, CALL)
    assert type(raised) is type(error)
    assert str(raised) == str(error)
    assert (raised.namespace, raised.name, raised.method) == ("Counter", "a", "add")


def test_a_method_that_raised_is_callfailed_with_its_exception_type() -> None:
    result = calls.failed_result(KeyError("gone"))
    assert result.error.kind == pb.CallError.FAILED
    with pytest.raises(CallFailed) as raised:
        calls.result_value(result, CALL)
    assert raised.value.remote_type == "KeyError"
    assert "gone" in str(raised.value)


def test_an_unknown_kind_or_an_empty_answer_is_a_plain_callerror() -> None:
    with pytest.raises(CallError) as raised:
        calls.result_value(pb.CallResult(error=pb.CallError(kind=99, message="?")), CALL)
    assert type(raised.value) is CallError
    with pytest.raises(CallError):
        calls.result_value(pb.CallResult(), CALL)


def test_an_error_message_is_cut() -> None:
    result = calls.error_result(InvalidCall("x" * 5000))
    assert len(result.error.message) == calls.MAX_ERROR_CHARS


@pytest.mark.parametrize("name", ["add", "a", "get_then_put", "x" * calls.MAX_METHOD_CHARS])
def test_method_names_that_can_be_called(name: str) -> None:
    assert calls.check_method_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "_private", "__init__", "not an identifier", "a.b", "1st", "x" * 129, 5, None]
)
def test_method_names_that_cannot(name: object) -> None:
    with pytest.raises(InvalidCall):
        calls.check_method_name(name)


def test_in_chain_matches_namespace_and_name_both() -> None:
    chain = [calls.object_ref("A", "x"), calls.object_ref("B", "y")]
    assert calls.in_chain(chain, "B", "y")
    assert not calls.in_chain(chain, "A", "y")
    assert not calls.in_chain([], "A", "x")


# -- the envelope as a worker reads it -----------------------------------------------------


def test_a_worker_reads_a_call_within_its_limits() -> None:
    call = pb.ObjectCall()
    call.CopyFrom(CALL)
    call.chain.extend(calls.object_ref("R", str(i)) for i in range(calls.MAX_CALL_DEPTH))
    assert envelopes.read_object_call(call.SerializeToString()) == call


@pytest.mark.parametrize(
    "broken",
    [
        pb.ObjectCall(method="add", call_id="c"),  # no namespace
        pb.ObjectCall(object=calls.object_ref("N", "a"), method="add"),  # no call id
        pb.ObjectCall(object=calls.object_ref("N", "a"), method="add", call_id="c" * 129),
        pb.ObjectCall(object=calls.object_ref("N", "a"), call_id="c"),  # no method
        pb.ObjectCall(object=calls.object_ref("N", "a"), method="m" * 129, call_id="c"),
        pb.ObjectCall(
            object=calls.object_ref("N", "a"),
            method="add",
            call_id="c",
            chain=[calls.object_ref("R", str(i)) for i in range(calls.MAX_CALL_DEPTH + 1)],
        ),
    ],
)
def test_a_worker_refuses_a_broken_call(broken: pb.ObjectCall) -> None:
    with pytest.raises(InvalidEnvelope):
        envelopes.read_object_call(broken.SerializeToString())


# -- plain HTTP requests, as workers and gateways read them ---------------------------------


def test_a_worker_reads_an_http_request_within_its_limits() -> None:
    request = pb.HttpRequest(request_id="r" * 128, method="M" * 32, path="/" + "p" * 8191)
    assert envelopes.read_http_request(request.SerializeToString()) == request


@pytest.mark.parametrize(
    "broken",
    [
        pb.HttpRequest(method="GET", path="/"),  # no id
        pb.HttpRequest(request_id="r" * 129, method="GET", path="/"),
        pb.HttpRequest(request_id="r", path="/"),  # no method
        pb.HttpRequest(request_id="r", method="M" * 33, path="/"),
        pb.HttpRequest(request_id="r", method="GET", path="/" + "p" * 8192),
    ],
)
def test_a_worker_refuses_a_broken_http_request(broken: pb.HttpRequest) -> None:
    with pytest.raises(InvalidEnvelope):
        envelopes.read_http_request(broken.SerializeToString())


@pytest.mark.parametrize("status", [100, 599])
def test_a_gateway_reads_a_response_with_a_status_in_range(status: int) -> None:
    response = pb.HttpResponse(status=status, body=b"x")
    assert envelopes.read_http_response(response.SerializeToString()) == response


@pytest.mark.parametrize("status", [0, 99, 600])
def test_a_gateway_refuses_a_status_out_of_range(status: int) -> None:
    with pytest.raises(InvalidEnvelope):
        envelopes.read_http_response(pb.HttpResponse(status=status).SerializeToString())
