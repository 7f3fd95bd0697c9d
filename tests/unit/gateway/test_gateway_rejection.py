"""The HTTP response of an app's rejection: the app's status, body and headers, except the
headers that frame the response, which are the gateway's."""

from __future__ import annotations

from wsgate.gateway.server import FRAMING_HEADERS, _reject_response
from wsgate.v1 import envelope_pb2 as pb


def test_the_apps_status_body_and_headers_are_kept() -> None:
    response = _reject_response(
        pb.Reject(
            status=401,
            body=b"no",
            headers=[
                pb.Header(name="WWW-Authenticate", value="Bearer"),
                pb.Header(name="X-A", value="1"),
            ],
        )
    )
    assert response.status == 401
    assert response.body == b"no"
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert response.headers["X-A"] == "1"
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"


def test_framing_headers_from_the_app_are_dropped() -> None:
    # A Content-Length shorter than the body would leave the rest of the body to be read
    # as the next response on the connection: a desynchronised client or proxy.
    framing = [pb.Header(name=name.title(), value="1") for name in sorted(FRAMING_HEADERS)]
    response = _reject_response(pb.Reject(status=400, body=b"abcdef", headers=framing))
    assert not {name.lower() for name in response.headers} & FRAMING_HEADERS
    assert response.body == b"abcdef"
