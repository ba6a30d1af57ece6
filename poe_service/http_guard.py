"""Limits uvicorn has no setting for: request-head size and header count under httptools, and a deadline for
receiving a whole request.

uvicorn bounds concurrency (``limit_concurrency``), idle keep-alive
(``timeout_keep_alive``) and, only with its h11 parser, the request head
(``h11_max_incomplete_event_size``).  With httptools (the fast parser the
``serve`` extra installs) a 200 MB header was buffered whole (server RSS 94 ->
354 MB), 10,000 headers were accepted, and a half-sent request held its
connection forever.  This subclass changes only three things, all before the
application sees a request:

- at most ``max_header_bytes`` of request line + headers are fed to the
  parser; more is answered ``431`` and the connection closed (bytes are
  counted as they arrive, so nothing large is ever buffered);
- more than ``max_headers`` header fields: ``431``;
- a request (head and body) not fully received ``request_timeout`` seconds
  after its first byte, or after the connection opened: ``408`` and closed.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from poe_service.limits import HttpLimits


class _Refused(Exception):
    """Raised inside a parser callback to stop parsing; ``data_received`` answers it."""


def guarded_protocol(limits: HttpLimits) -> type:
    """An ``HttpToolsProtocol`` subclass enforcing ``limits`` (pass it as ``uvicorn.Config(http=...)``)."""
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), {"limits": limits})


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    limits = HttpLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head, self._head_bytes, self._header_count = True, 0, 0
        self._deadline: asyncio.TimerHandle | None = None
        self._refusal: tuple[int, str] | None = None

    # ------------------------------------------------------------------ connection
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        self._arm()
        if self._in_head:  # feed at most the allowed head bytes; a larger head is never buffered
            room = self.limits.max_header_bytes - self._head_bytes
            head, data = data[:room], data[room:]
            self._head_bytes += len(head)
            if not self._feed(head):
                return
            if data and self._in_head:
                self._refuse(431, f"request line and headers exceed {self.limits.max_header_bytes} bytes")
                return
        if data:
            self._feed(data)

    def _feed(self, data: bytes) -> bool:
        """Feed the parser like uvicorn does; False once the connection was answered and closed."""
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        except httptools.HttpParserError:
            status, message = self._refusal or (400, "invalid HTTP request")
            self._refuse(status, message)
            return False
        return True

    # ------------------------------------------------------------------ parser callbacks
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_count = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.limits.max_headers:
            self._refusal = (431, f"more than {self.limits.max_headers} header fields")
            raise _Refused()
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_head, self._head_bytes = True, 0
        self._disarm()  # the whole request is in; the application's own time is not limited here
        super().on_message_complete()

    # ------------------------------------------------------------------ deadline
    def _arm(self) -> None:
        if self._deadline is None:
            self._deadline = self.loop.call_later(self.limits.request_timeout, self._timed_out)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _timed_out(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete and self._in_head:
            self._arm()  # a pipelined request waits for the answer before it: not the client's fault
            return
        if self._in_head:
            self._refuse(408, f"request not received within {self.limits.request_timeout:g} s")
        else:  # the body is late: the application sees a disconnect
            self.transport.close()

    def _refuse(self, status: int, message: str) -> None:
        """A JSON error like the application's, then close: the request is never handed to it."""
        self._disarm()
        self.logger.warning("refused a request from %s: %s", self.client, message)
        body = json.dumps({"error": message, "valid": []}).encode("utf-8")
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [b"content-type: application/json\r\ncontent-length: ", str(len(body)).encode("ascii"),
                 b"\r\nconnection: close\r\n\r\n", body]
        self.transport.write(b"".join(head))
        self.transport.close()
