"""Readiness notification over an inherited file descriptor (as s6's notification-fd).

A parent that wants to know when a role is serving passes it the write end of a pipe
(``--ready-fd N``). Once listening, the role writes one JSON line describing where it is
(``{"role": "gateway", "url": ...}``) and closes the descriptor. The parent reads until
end of file: a line means ready, end of file with no line means the child died first.
No polling and no fixed sleeps; ports chosen by the kernel (port 0) are reported exactly.
"""

from __future__ import annotations

import json
import os
from typing import Any


def notify_ready(fd: int | None, info: dict[str, Any]) -> None:
    """Write ``info`` as one JSON line to ``fd`` and close it. No-op when ``fd`` is None."""
    if fd is None:
        return
    data = (json.dumps(info, separators=(",", ":")) + "\n").encode()
    try:
        while data:
            written = os.write(fd, data)
            data = data[written:]
    finally:
        os.close(fd)


def parse_ready(line: bytes) -> dict[str, Any]:
    """Decode what :func:`notify_ready` wrote; raises ValueError if it is not that."""
    info = json.loads(line.decode())
    if not isinstance(info, dict):
        raise ValueError(f"readiness line is not a JSON object: {line[:200]!r}")
    return info
