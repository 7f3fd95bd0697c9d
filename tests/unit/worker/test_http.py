"""The request handler's types (worker/http.py), without I/O."""

from __future__ import annotations

import pytest

from wsgate import HttpRequest, InvalidResponse, Response
from wsgate.v1 import envelope_pb2 as pb
from wsgate.worker.http import as_connect_request, expected_websocket, plain_response

ENVELOPE = pb.HttpRequest(
    request_id="r1",
    method="POST",
    path="/room/lobby",
    query="a=1&a=2&b=x%20y",
    headers=[pb.Header(name="X-Test", value="one"), pb.Header(name="x-test", value="two")],
    body=b'{"n": 1}',
    remote_address="127.0.0.1:5000",
)


def test_a_request_from_its_envelope() -> None:
    request = HttpRequest.from_envelope(ENVELOPE, {"room": "lobby"}, {"sub": "ada"})
    assert (request.method, request.path, dict(request.params)) == (
        "POST",
        "/room/lobby",
        {"room": "lobby"},
    )
    assert request.query.getall("a") == ["1", "2"]
    assert request.query["b"] == "x y"
    assert request.headers.getall("X-TEST") == ["one", "two"]  # case-insensitive, all kept
    assert request.json() == {"n": 1}
    assert request.text() == '{"n": 1}'
    assert request.claims == {"sub": "ada"}
    assert HttpRequest.from_envelope(ENVELOPE, {}).claims == {}


def test_an_authenticator_reads_a_request_as_a_connect() -> None:
    connect = as_connect_request(ENVELOPE, {"room": "lobby"})
    assert (
        connect.path,
        connect.query["b"],
        connect.headers["x-test"],
        connect.remote_address,
    ) == (
        "/room/lobby",
        "x y",
        "one",
        "127.0.0.1:5000",
    )
    assert connect.subprotocols == ()


def test_a_str_body_is_utf8_text_unless_a_content_type_is_given() -> None:
    answer = Response(201, "héllo", {"X-A": "1"}).to_envelope()
    assert (answer.status, answer.body) == (201, "héllo".encode())
    assert [(h.name, h.value) for h in answer.headers] == [
        ("X-A", "1"),
        ("Content-Type", "text/plain; charset=utf-8"),
    ]
    typed = Response(200, "<p>", {"content-type": "text/html"}).to_envelope()
    assert [(h.name, h.value) for h in typed.headers] == [("content-type", "text/html")]
    assert Response(200, b"\x00").to_envelope().headers == []


def test_json_responses() -> None:
    answer = Response.json({"a": [1]}, status=202, headers={"X-B": "2"})
    assert (answer.status, answer.body) == (202, '{"a": [1]}')
    assert answer.headers == {"Content-Type": "application/json", "X-B": "2"}


@pytest.mark.parametrize("status", [99, 600, 0, "200"])
def test_a_status_out_of_range_is_refused(status: object) -> None:
    with pytest.raises(InvalidResponse):
        Response(status)  # type: ignore[arg-type]


def test_a_body_that_is_neither_str_nor_bytes_is_refused() -> None:
    with pytest.raises(InvalidResponse):
        Response(200, {"not": "a body"})  # type: ignore[arg-type]


@pytest.mark.parametrize("status", [100, 599])
def test_statuses_at_the_ends_of_the_range(status: int) -> None:
    assert Response(status).to_envelope().status == status


def test_what_wsgate_answers_itself() -> None:
    assert expected_websocket().status == 400
    assert expected_websocket().body == b"Expected websocket"
    refusal = plain_response(503, "busy", {"Retry-After": "1"})
    assert (refusal.status, refusal.body, refusal.headers[0].name) == (503, b"busy", "Retry-After")
