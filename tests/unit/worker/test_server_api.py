"""The server API's settings and its JSON mapping of values and messages, without I/O
(the calls themselves: tests/integration/test_server_api.py)."""

from __future__ import annotations

import pytest

from wsgate.config import MIN_API_KEY_CHARS, WorkerConfig
from wsgate.errors import ConfigError, WsgateError
from wsgate.worker.server_api import ApiError, ServerApi
from wsgate.worker.server_api_http import _jsonable, _payload


def test_keys_at_the_length_limit_and_under_it() -> None:
    at_limit = "k" * MIN_API_KEY_CHARS
    config = WorkerConfig(api_keys=f" {at_limit} ,{at_limit}x,")
    assert config.api_key_list == (at_limit, at_limit + "x")
    with pytest.raises(ConfigError, match="at least 16"):
        WorkerConfig(api_keys="k" * (MIN_API_KEY_CHARS - 1))


@pytest.mark.parametrize("port", [-1, 0, 65535])
def test_the_port_is_off_any_or_one(port: int) -> None:
    assert WorkerConfig(api_port=port).api_port == port


@pytest.mark.parametrize("port", [-2, 65536])
def test_a_port_out_of_range_is_refused(port: int) -> None:
    with pytest.raises(ConfigError):
        WorkerConfig(api_port=port)


def test_a_certificate_needs_its_key() -> None:
    with pytest.raises(ConfigError, match="together"):
        WorkerConfig(api_tls_cert="/etc/hostname")


def test_values_as_json_bytes_in_base64_at_any_depth() -> None:
    assert _jsonable({"a": [b"\x00\x01", 1, None], "b": "x"}) == {
        "a": [{"base64": "AAE="}, 1, None],
        "b": "x",
    }


def test_a_message_is_text_or_base64() -> None:
    assert _payload({"text": "hi"}) == "hi"
    assert _payload({"base64": "AAEC"}) == b"\x00\x01\x02"
    for bad in ({}, {"text": 5}, {"base64": "not base64!"}, {"binary": "x"}):
        with pytest.raises(ApiError) as raised:
            _payload(bad)
        assert raised.value.status == 400


def test_an_api_no_token_could_pass_is_refused_at_start() -> None:
    no_keys = WorkerConfig(api_port=0)
    with pytest.raises(WsgateError, match="WSGATE_API_KEYS"):
        ServerApi(no_keys, nc=None, state=None, calls=None, classes={}, jwt=None)  # type: ignore[arg-type]


def test_tokens_are_checked_before_anything_else() -> None:
    config = WorkerConfig(api_port=0, api_keys="k" * 16)
    api = ServerApi(config, nc=None, state=None, calls=None, classes={}, jwt=None)  # type: ignore[arg-type]
    api.authenticate("Bearer " + "k" * 16)
    api.authenticate("bearer  " + "k" * 16 + " ")  # the scheme's case, spaces around
    for header in ("", "Bearer", "Bearer ", "Basic " + "k" * 16, "Bearer " + "k" * 15, "k" * 16):
        with pytest.raises(ApiError) as refused:
            api.authenticate(header)
        assert (refused.value.status, refused.value.kind) == (401, "Unauthorized")
