"""Requests that do not parse as their method's message are refused with INVALID_ARGUMENT.

gRPC's own answer to a request its deserializer cannot parse is INTERNAL ("Exception
deserializing request!"): the status of a fault of the server, which clients and proxies
may retry, and which a dashboard counts against the service. A request that is not the
method's message is the caller's fault. :class:`RefuseUndecodable`, a server interceptor,
gives every method a deserializer that never raises (it returns :class:`Undecodable`
instead) and ends the call with INVALID_ARGUMENT before the servicer sees it: at once for
a unary request, at the message for a stream (``context.read()`` and the request iterator
both). Nothing else changes: a request that parses reaches the servicer as before.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

#: The details of the refusal, with the method's name (the bytes are never echoed).
DETAILS = "the request to {} does not parse as its message"


class Undecodable:
    """What the lenient deserializer returns for bytes that do not parse."""

    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        self.size = size


def _lenient(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError:
            return Undecodable(len(data))

    return parse


class _CheckedContext:
    """A servicer context whose ``read()`` refuses an undecodable message."""

    def __init__(self, context: Any, message: str) -> None:
        self._context = context
        self._message = message

    async def read(self) -> Any:
        request = await self._context.read()
        if isinstance(request, Undecodable):
            await self._context.abort(grpc.StatusCode.INVALID_ARGUMENT, self._message)
        return request

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def _checked_unary(behavior: Callable[..., Any], message: str) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(behavior):

        async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
            if isinstance(request, Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
            async for response in behavior(request, context):
                yield response

        return stream

    async def unary(request: Any, context: Any) -> Any:
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
        return await behavior(request, context)

    return unary


def _checked_stream(behavior: Callable[..., Any], message: str) -> Callable[..., Any]:
    async def checked(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        async for request in requests:
            if isinstance(request, Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
            yield request

    if inspect.isasyncgenfunction(behavior):

        async def stream(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
            checked_context = _CheckedContext(context, message)
            async for response in behavior(checked(requests, context), checked_context):
                yield response

        return stream

    async def unary(requests: AsyncIterator[Any], context: Any) -> Any:
        return await behavior(checked(requests, context), _CheckedContext(context, message))

    return unary


class RefuseUndecodable(grpc.aio.ServerInterceptor):
    """Give every method a deserializer that never raises, and refuse what it could not
    parse with INVALID_ARGUMENT (see the module docstring)."""

    def __init__(self) -> None:
        # Per method: the handler gRPC gave, and its checked copy (made once, not per call).
        self._checked: dict[str, tuple[Any, Any]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        known = self._checked.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        checked = self._check(handler, method.rsplit("/", 1)[-1])
        self._checked[method] = (handler, checked)
        return checked

    def _check(self, handler: Any, method: str) -> Any:
        message = DETAILS.format(method)
        deserializer = _lenient(handler.request_deserializer)
        if handler.request_streaming:
            name = "stream_stream" if handler.response_streaming else "stream_unary"
        else:
            name = "unary_stream" if handler.response_streaming else "unary_unary"
        wrap = _checked_stream if handler.request_streaming else _checked_unary
        return handler._replace(
            request_deserializer=deserializer,
            **{name: wrap(getattr(handler, name), message)},
        )
