"""The HTTP/1.1 protocol the service speaks: uvicorn's httptools parser, with a bound on what is not body.

httptools (C) parses HTTP for about a fifth less of the server's CPU per request than uvicorn's h11 (pure
Python), and the server's CPU is what bounds deletions under a group commit. It is also stricter, as a
server facing hostile clients should be: it refuses a request framed by both Content-Length and
Transfer-Encoding (the request-smuggling ambiguity h11 let through), bare LF line ends and folded headers.
But it buffers a header until its end with no limit (one client sending a 64 MB header grew the server by
129 MB), and it parses trailers after a chunked body, which uvicorn appends to the request's headers (h11
drops them). So here every request's bytes that are not body (request line, headers, chunk framing)
are bounded, as h11 bounds a head, and a request with trailers is refused.
"""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD_BYTES = 64 * 1024   # browsers send a few KB of headers; nginx's default bound is 32 KB


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol; a request whose bytes other than its body pass `MAX_HEAD_BYTES`, or
    that sends trailers, is answered 400 and its connection closed."""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._in_message = True   # a connection's first bytes begin a request
        self._head_bytes = 0      # the current request's bytes that were not body
        self._body_bytes = 0      # body bytes parsed from the data being fed
        self._headers_done = False

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_message, self._head_bytes, self._headers_done = True, 0, False

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._headers_done:   # a trailer: raising here makes httptools report a malformed request (400)
            raise ValueError("trailers are not accepted")
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._headers_done = True
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._in_message = False
        super().on_message_complete()

    def data_received(self, data: bytes) -> None:
        self._body_bytes = 0
        super().data_received(data)
        if self._in_message and not self.transport.is_closing():
            # What this data held besides body belongs to the request being read (a request that began
            # in it may share it with the end of the one before: an over-count by that one's framing).
            self._head_bytes += len(data) - self._body_bytes
            if self._head_bytes > MAX_HEAD_BYTES:
                self.logger.warning("Request refused: over %d bytes besides its body.", MAX_HEAD_BYTES)
                self.send_400_response(f"Request over {MAX_HEAD_BYTES} bytes besides its body.")
