"""The server API over HTTP/JSON (docs/server-api.md), on ``WSGATE_API_PORT``::

    POST /v1/connections/{id}/send         {"text": str} | {"base64": str}     202
    POST /v1/connections/{id}/close        {"code": int, "reason": str}         202
    POST /v1/objects/{ns}/{name}/broadcast {"text"|"base64", "tag", "exclude"}  200
    GET  /v1/objects/{ns}/{name}/connections?tag=                               200
    POST /v1/objects/{ns}/{name}/call/{method}  {"args": [...], "kwargs": {}}   200
    GET  /v1/objects/{ns}?prefix=&after=&limit=                                 200

Errors are JSON, ``{"error": {"type": ..., "message": ...}}``, with the status of their
:class:`~wsgate.worker.server_api.ApiError`. Values are JSON, bytes as
``{"base64": ...}``. HTTPS with ``WSGATE_API_TLS_CERT``/``_KEY``.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

from wsgate import ids
from wsgate.values import Value
from wsgate.worker.server_api import ApiError, ServerApi, api_error

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(
    status: int, kind: str, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    """The JSON body of a failure."""
    return web.json_response(
        {"error": {"type": kind, "message": message}}, status=status, headers=headers
    )


class HttpServerApi:
    """The HTTP/JSON face of ``api``."""

    def __init__(self, api: ServerApi) -> None:
        self._api = api
        self._runner: web.AppRunner | None = None

    def application(self) -> web.Application:
        """The routes, behind the token check and the error mapping."""
        app = web.Application(
            middlewares=[self._errors, self._authenticated],
            client_max_size=self._api.config.api_max_body_bytes,
        )
        app.router.add_post("/v1/connections/{id}/send", self._send)
        app.router.add_post("/v1/connections/{id}/close", self._close)
        app.router.add_post("/v1/objects/{ns}/{name}/broadcast", self._broadcast)
        app.router.add_get("/v1/objects/{ns}/{name}/connections", self._connections)
        app.router.add_post("/v1/objects/{ns}/{name}/call/{method}", self._call)
        app.router.add_get("/v1/objects/{ns}", self._list)
        return app

    async def start(self, host: str, port: int) -> int:
        """Listen; the port bound. Raises OSError if it is taken."""
        self._runner = web.AppRunner(self.application(), handle_signals=False, access_log=None)
        await self._runner.setup()
        config = self._api.config
        tls = None
        if config.api_tls_cert:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.load_cert_chain(config.api_tls_cert, config.api_tls_key)
        await web.TCPSite(self._runner, host, port, ssl_context=tls).start()
        return int(self._runner.addresses[0][1])

    async def close(self) -> None:
        """Stop listening. Idempotent."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    # -- middlewares ---------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge:
            limit = self._api.config.api_max_body_bytes
            return error_response(413, "PayloadTooLarge", f"a body is at most {limit} bytes")
        except web.HTTPException as exc:
            return error_response(exc.status, type(exc).__name__, exc.reason)
        except Exception as exc:
            error = api_error(exc)
            if error is None:
                raise
            headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
            return error_response(error.status, error.kind, str(error), headers)

    @web.middleware
    async def _authenticated(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self._api.authenticate(request.headers.get("Authorization", ""))
        return await handler(request)

    # -- the calls -----------------------------------------------------------------------

    async def _send(self, request: web.Request) -> web.Response:
        body = await _json_object(request)
        await self._api.send(_connection_id(request), _payload(body))
        return web.json_response({"sent": 1}, status=202)

    async def _close(self, request: web.Request) -> web.Response:
        body = await _json_object(request)
        code, reason = body.get("code", 1000), body.get("reason", "")
        await self._api.close(_connection_id(request), code, reason)
        return web.json_response({"closing": 1}, status=202)

    async def _broadcast(self, request: web.Request) -> web.Response:
        body = await _json_object(request)
        tag = body.get("tag")
        exclude = body.get("exclude", [])
        if tag is not None and not isinstance(tag, str):
            raise ApiError(400, "InvalidRequest", "tag is a str")
        if not isinstance(exclude, list) or not all(isinstance(c, str) for c in exclude):
            raise ApiError(400, "InvalidRequest", "exclude is a list of connection ids")
        ns, name = request.match_info["ns"], request.match_info["name"]
        result = await self._api.broadcast(ns, name, _payload(body), tag=tag, exclude=exclude)
        return web.json_response({"recipients": result.recipients, "commands": result.commands})

    async def _connections(self, request: web.Request) -> web.Response:
        ns, name = request.match_info["ns"], request.match_info["name"]
        found = await self._api.connections(ns, name, request.query.get("tag"))
        listed = [
            {"id": m.id, "tags": list(m.tags), "state": _jsonable(m.attachment)} for m in found
        ]
        return web.json_response({"connections": listed})

    async def _call(self, request: web.Request) -> web.Response:
        body = await _json_object(request)
        args, kwargs = body.get("args", []), body.get("kwargs", {})
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise ApiError(400, "InvalidRequest", "args is a list and kwargs an object")
        info = request.match_info
        value = await self._api.call(info["ns"], info["name"], info["method"], args, kwargs)
        return web.json_response({"value": _jsonable(value)})

    async def _list(self, request: web.Request) -> web.Response:
        try:
            limit = int(request.query.get("limit", "100"))
        except ValueError:
            raise ApiError(400, "InvalidRequest", "limit is a number") from None
        page = await self._api.list_objects(
            request.match_info["ns"],
            prefix=request.query.get("prefix", ""),
            after=request.query.get("after", ""),
            limit=limit,
        )
        objects = [
            {
                "name": s.name,
                "members": s.usage.members,
                "bytes": s.usage.bytes,
                "keys": s.usage.keys,
            }
            for s in page.objects
        ]
        return web.json_response({"objects": objects, "more": page.more})


def _connection_id(request: web.Request) -> str:
    connection_id = request.match_info["id"]
    ids.gateway_of(connection_id)  # InvalidConnectionId: 400
    return connection_id


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json() if request.can_read_body else {}
    except json.JSONDecodeError:
        raise ApiError(400, "InvalidRequest", "the body is not JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "InvalidRequest", "the body is a JSON object")
    return body


def _payload(body: Mapping[str, Any]) -> str | bytes:
    """The message a body carries: ``text`` (a text frame) or ``base64`` (binary)."""
    if "text" in body and isinstance(body["text"], str):
        return str(body["text"])
    if "base64" in body and isinstance(body["base64"], str):
        try:
            return base64.b64decode(body["base64"], validate=True)
        except binascii.Error:
            raise ApiError(400, "InvalidRequest", "base64 does not decode") from None
    raise ApiError(400, "InvalidRequest", 'give the message as "text" (a str) or "base64"')


def _jsonable(value: Value) -> object:
    """A stored value as JSON: bytes as ``{"base64": ...}``."""
    if isinstance(value, bytes):
        return {"base64": base64.b64encode(value).decode()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value
