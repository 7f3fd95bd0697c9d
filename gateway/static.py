"""Static files next to the WebSockets: the page that opens them, served by the gateway.

With ``static_dir`` set (``--static-dir``, ``WSGATE_STATIC_DIR``), a GET or HEAD request
that asks for no upgrade is answered from that directory: ``/`` with ``index.html``,
``/app.js`` with ``app.js`` (nested paths too), each with the content type its name
implies, an ETag and Last-Modified (so a reload revalidates instead of refetching).

Every other request goes to the WebSocket handler, unchanged. That includes a plain GET
whose path names no file there, so a WebSocket route such as ``/echo`` still answers
``400 Expected websocket``, and any request carrying ``Upgrade``, whatever its path.

Never served: directories (no listing), names starting with a dot (``.env``, ``.git``)
at any depth, and anything outside the directory, whether through ``..``, an absolute
path, an encoded slash or a symlink pointing out.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import hdrs, web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: What ``/`` (the bare origin) is answered with.
INDEX_FILE = "index.html"


def resolve_static(root: Path, request_path: str) -> Path | None:
    """The file under ``root`` (already resolved) that ``request_path`` (the decoded URL
    path) names, or None when it names none or names one it must not reach."""
    # Split by hand: PurePosixPath would drop "." segments and keep "//" as a root.
    names = [name for name in request_path.split("/") if name] or [INDEX_FILE]
    # Every segment must be a plain, visible name: this refuses "..", "." and dotfiles.
    if any(n.startswith(".") or "\\" in n or "\x00" in n for n in names):
        return None
    try:
        candidate = root.joinpath(*names).resolve()
    except (OSError, ValueError):
        return None
    # A symlink inside the directory may still point out of it: checked after resolving.
    if not candidate.is_relative_to(root) or not candidate.is_file():
        return None
    return candidate


def with_static_files(root: Path, fallback: Handler) -> Handler:
    """A handler that serves ``root``'s files as described above and passes every other
    request to ``fallback``. ``root`` must be an existing directory."""
    resolved = root.resolve()
    if not resolved.is_dir():
        raise NotADirectoryError(f"static_dir {root} is not a directory")

    # Not a coroutine: it returns the fallback's own, so an open WebSocket's task holds
    # no frame of this wrapper for the connection's life.
    def handle(request: web.Request) -> Awaitable[web.StreamResponse]:
        if (
            request.method in (hdrs.METH_GET, hdrs.METH_HEAD)
            and hdrs.UPGRADE not in request.headers
        ):
            found = resolve_static(resolved, request.path)
            if found is not None:
                # no-cache: revalidate on every load, so an edited page shows at once;
                # the ETag keeps that to a 304 when nothing changed.
                return _answer(web.FileResponse(found, headers={hdrs.CACHE_CONTROL: "no-cache"}))
        return fallback(request)

    return handle


async def _answer(response: web.StreamResponse) -> web.StreamResponse:
    return response
