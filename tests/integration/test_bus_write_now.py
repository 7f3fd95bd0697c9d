"""wsgate.bus.write_now against the installed nats-py and a real nats-server: what a
publish buffered goes to the socket at once, in order, and is delivered; where it cannot
(no such buffer, not connected), it does nothing and the flusher writes as before."""

from __future__ import annotations

from nats.aio.client import Client as NatsClient

from wsgate.bus import write_now


async def test_what_was_published_is_written_at_once_and_arrives_in_order(
    nats_url: str,
) -> None:
    publisher, reader = NatsClient(), NatsClient()
    await publisher.connect(nats_url)
    await reader.connect(nats_url)
    try:
        sub = await reader.subscribe("write.now")
        await reader.flush()
        for n in range(3):
            await publisher.publish("write.now", b"%d" % n)
        # No await between the publishes and this: nats-py's flusher has not run.
        assert publisher._pending_data_size > 0
        assert write_now(publisher)
        assert (publisher._pending, publisher._pending_data_size) == ([], 0)
        assert not write_now(publisher)  # nothing left to write
        got = [(await sub.next_msg(timeout=20)).data for _ in range(3)]
        assert got == [b"0", b"1", b"2"]
    finally:
        await publisher.close()
        await reader.close()


async def test_it_does_nothing_where_it_cannot(nats_url: str) -> None:
    nc = NatsClient()
    await nc.connect(nats_url)
    await nc.close()
    assert not write_now(nc)  # closed
    assert not write_now(object())  # not nats-py's client: a test's bus
