"""What a handler sends, serialized by hand (worker/messages.py), is protobuf's own
``Message`` envelope, and what protobuf refuses is refused the same way."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wsgate.v1 import envelope_pb2 as pb
from wsgate.worker.errors import InvalidMessage
from wsgate.worker.messages import encoded_message, message_envelope

#: Every kind a handler may send, with sizes over one varint byte (and over two).
_sendables = st.one_of(
    st.text(max_size=300),
    st.binary(max_size=20_000),
    st.binary(max_size=300).map(bytearray),
    st.binary(max_size=300).map(memoryview),
)


@given(_sendables)
def test_an_encoded_message_is_the_serialized_envelope(message: str | bytes) -> None:
    encoded = encoded_message(message, "send()")
    assert encoded == message_envelope(message, "send()").SerializeToString()
    assert pb.Message.FromString(encoded) == message_envelope(message, "send()")


def test_subclasses_of_str_and_bytes_are_text_and_binary() -> None:
    class Text(str):
        pass

    class Binary(bytes):
        pass

    assert encoded_message(Text("hi"), "send()") == pb.Message(text="hi").SerializeToString()
    assert encoded_message(Binary(b"hi"), "send()") == pb.Message(binary=b"hi").SerializeToString()


def test_a_buffer_that_changes_after_the_send_does_not_change_what_was_sent() -> None:
    buffer = bytearray(b"before")
    encoded = encoded_message(buffer, "send()")
    buffer[:] = b"after!"
    assert pb.Message.FromString(encoded).binary == b"before"


def test_what_the_envelope_refuses_is_refused_alike() -> None:
    with pytest.raises(InvalidMessage, match=r"send\(\) takes str"):
        encoded_message(42, "send()")  # type: ignore[arg-type]
    with pytest.raises(UnicodeEncodeError):
        message_envelope("\ud800", "send()")
    with pytest.raises(UnicodeEncodeError):
        encoded_message("\ud800", "send()")
