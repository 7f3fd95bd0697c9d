"""The gateway's TLS server certificate, reloadable while it serves.

:class:`ServerCertificate` holds an :class:`ssl.SSLContext` (TLS 1.2 or later) built from
a certificate chain file and a key file. :meth:`ServerCertificate.reload` builds a new
context from the files as they are now and swaps it in; the listener takes
:attr:`ServerCertificate.context` for each new handshake, so new connections get the new
certificate and connections already open keep theirs. A reload that fails (a missing or
unreadable file, a key that does not match the certificate, a half-written file) keeps
the context in use and says so: it is logged and reported to ``on_reload``.

Reloads happen on SIGHUP (the entry point calls :meth:`reload`) and when either file
changes: :meth:`watch` compares the files' ``stat()`` every interval, which follows the
symlinks that Kubernetes swaps when it updates a mounted Secret.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections.abc import Callable
from pathlib import Path

from wsgate.errors import ConfigError

log = logging.getLogger(__name__)

#: What identifies a version of a file without reading it.
_Signature = tuple[int, int, int] | None


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server-side context for ``cert`` (the chain, leaf first) and ``key``: TLS 1.2 or
    later, HTTP/1.1 by ALPN, no renegotiation. Raises OSError or ssl.SSLError."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # Client-initiated renegotiation costs the server a handshake for each request of it.
    context.options |= ssl.OP_NO_RENEGOTIATION
    # WebSockets over TLS are HTTP/1.1 upgrades (RFC 6455; no RFC 8441 here).
    context.set_alpn_protocols(["http/1.1"])
    context.load_cert_chain(cert, key)
    return context


class ServerCertificate:
    """The current server context and the files it comes from.

    Raises ConfigError from the constructor when the files cannot make a context (the
    gateway must not start with a certificate it cannot serve).
    """

    def __init__(
        self, cert: Path, key: Path, *, on_reload: Callable[[bool], None] = lambda ok: None
    ) -> None:
        self.cert = cert
        self.key = key
        self._on_reload = on_reload
        self._signature = self._stat()
        try:
            self.context = server_context(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"cannot serve TLS with WSGATE_TLS_CERT={str(cert)!r} and "
                f"WSGATE_TLS_KEY={str(key)!r}: {exc}"
            ) from exc

    def reload(self) -> bool:
        """Build a context from the files as they are now and use it for new handshakes.

        True if it was swapped in; False if the files could not make one, in which case
        the current context stays. Either way ``on_reload`` hears of it.
        """
        self._signature = self._stat()
        try:
            context = server_context(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:
            log.error(
                "TLS reload failed, still serving the previous certificate: %s (%s, %s)",
                exc,
                self.cert,
                self.key,
            )
            self._on_reload(False)
            return False
        self.context = context
        log.info("TLS certificate reloaded from %s", self.cert)
        self._on_reload(True)
        return True

    def changed(self) -> bool:
        """Whether either file differs from when it was last loaded (or tried)."""
        return self._stat() != self._signature

    async def watch(self, interval_s: float) -> None:
        """Reload whenever :meth:`changed`, checking every ``interval_s``; runs until
        cancelled. A failed reload is tried again only after the files change again."""
        while True:
            await asyncio.sleep(interval_s)
            if self.changed():
                self.reload()

    def _stat(self) -> tuple[_Signature, _Signature]:
        return _signature(self.cert), _signature(self.key)


def _signature(path: Path) -> _Signature:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino
