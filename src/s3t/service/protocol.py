"""The HTTP/1.1 protocol the service speaks: uvicorn's httptools parser, with a bound on a request's head.

httptools (C) parses HTTP for about a fifth less of the server's CPU per request than uvicorn's h11 (pure
Python), and the server's CPU is what bounds deletions under a group commit. It is also stricter, as a
server facing hostile clients should be: it refuses a request framed by both Content-Length and
Transfer-Encoding (the request-smuggling ambiguity h11 let through), bare LF line ends and folded headers.
But it buffers a header until its end with no limit: one client sending a 64 MB header grew the server
by 129 MB. So the head (request line and headers) of each request is bounded here, as h11 bounds it.
"""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD_BYTES = 64 * 1024   # browsers send a few KB; nginx's default bound is 32 KB


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol; a request whose head passes `MAX_HEAD_BYTES` is answered 400 and
    its connection closed."""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._head_bytes: int | None = 0   # bytes read of the current request's head; None once it is complete

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0

    def on_headers_complete(self) -> None:
        self._head_bytes = None
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._head_bytes is not None and not self.transport.is_closing():
            self._head_bytes += len(data)   # a head still incomplete after this data: all of it was head
            if self._head_bytes > MAX_HEAD_BYTES:
                self.logger.warning("Request head over %d bytes refused.", MAX_HEAD_BYTES)
                self.send_400_response(f"Request head over {MAX_HEAD_BYTES} bytes.")
