"""The server API's settings and its JSON mapping of values and messages, without I/O
(the calls themselves: tests/integration/test_server_api.py)."""

from __future__ import annotations

import pytest

from wsgate.config import MIN_API_KEY_CHARS, WorkerConfig
from wsgate.errors import ConfigError
from wsgate.worker.server_api import ApiError
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
