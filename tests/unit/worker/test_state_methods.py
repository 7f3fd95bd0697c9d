"""The typed RPC table (worker/state_methods.py) is the proto's, method for method: every
RPC of every service in state.proto has exactly one entry, with the request and response
messages and the streaming the proto declares."""

from __future__ import annotations

import pytest

from wsgate.v1 import state_pb2
from wsgate.worker import state_methods as methods
from wsgate.worker.state_methods import Stream, Unary

PROTO_METHODS = {
    f"/{service.full_name}/{method.name}": method
    for service in state_pb2.DESCRIPTOR.services_by_name.values()
    for method in service.methods
}


def test_every_rpc_of_the_proto_has_one_entry() -> None:
    paths = [rpc.path for rpc in methods.ALL]
    assert len(paths) == len(set(paths))
    assert sorted(paths) == sorted(PROTO_METHODS)


@pytest.mark.parametrize("rpc", methods.ALL, ids=lambda rpc: rpc.path)
def test_an_entry_has_the_messages_and_streaming_of_its_rpc(rpc: methods.Rpc) -> None:
    assert isinstance(rpc, Unary | Stream)
    declared = PROTO_METHODS[rpc.path]
    assert rpc.request.DESCRIPTOR.full_name == declared.input_type.full_name
    assert rpc.response.DESCRIPTOR.full_name == declared.output_type.full_name
    if isinstance(rpc, Unary):
        assert not declared.client_streaming
        assert not declared.server_streaming
    else:
        assert declared.server_streaming
        assert declared.client_streaming == rpc.bidirectional
