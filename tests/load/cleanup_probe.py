"""A process that starts containers and then fails, or waits to be signalled: what
tests/load/test_containers.py runs to show that no container outlives a load session.

``python -m tests.load.cleanup_probe raise|wait``: opens a :class:`ContainerSession`, starts
two NATS containers, prints ``ready <session id>`` and then raises (``raise``) or waits for
a signal (``wait``).
"""

from __future__ import annotations

import signal
import sys
import threading

from tests.load.containers import ContainerSession
from tests.load.images import NATS_IMAGE


def main(mode: str) -> None:
    # Ctrl-C raises KeyboardInterrupt, as in a run started from a terminal, even when this
    # process was started with SIGINT ignored (by a shell's background job, `cmd &`, and so
    # by everything under it): Python then leaves SIGINT ignored, and the probe would never
    # see the interrupt the test sends.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with ContainerSession() as session:
        for _ in range(2):
            # A client port of 0: the server picks one; nothing else listens.
            session.container(NATS_IMAGE).with_command(["-a", "127.0.0.1", "-p", "0"]).start()
        print(f"ready {session.id}", flush=True)
        if mode == "raise":
            raise RuntimeError("the load run failed")
        threading.Event().wait()  # until a signal interrupts it


if __name__ == "__main__":
    main(sys.argv[1])
