"""A small real HTTP proxy in front of moto that misbehaves like other S3 implementations, request by request.

``S3Proxy(upstream, rule)``: every request goes to ``rule(method, path, headers)``, which answers ``FORWARD``,
``DROP_IF_NONE_MATCH`` (forward without the ``If-None-Match`` header, like an S3 that ignores it), an
``Answer(status, code)`` (an S3 error document, the request never reaches moto) or ``LoseAnswer(status, code)``
(the request reaches moto and is carried out, the client gets that error instead: a response lost on the way). moto does not check signatures,
so a forwarded request with a header removed is still accepted.
"""

from __future__ import annotations

import http.client
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Mapping
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Answer:
    status: int
    code: str


@dataclass(frozen=True)
class LoseAnswer:
    status: int
    code: str


FORWARD = "forward"
DROP_IF_NONE_MATCH = "drop-if-none-match"
Rule = Callable[[str, str, Mapping[str, str]], "str | Answer | LoseAnswer"]
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer", "upgrade"}


class S3Proxy:
    def __init__(self, upstream: str, rule: Rule) -> None:
        target = urlsplit(upstream)
        self.rule = rule
        self.seen: list[tuple[str, str, str]] = []  # (method, path, action) of every request
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                body = self._body()
                headers = {name: value for name, value in self.headers.items()}
                action = proxy.rule(self.command, self.path, headers)
                proxy.seen.append((self.command, self.path, action if isinstance(action, str) else str(action.status)))
                if isinstance(action, Answer):
                    self._error(action.status, action.code)
                    return
                forwarded = {k: v for k, v in headers.items() if k.lower() not in _HOP_BY_HOP}
                if action == DROP_IF_NONE_MATCH:
                    forwarded = {k: v for k, v in forwarded.items() if k.lower() != "if-none-match"}
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    forwarded["Content-Length"] = str(len(body))
                connection = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
                try:
                    connection.request(self.command, self.path, body=body if body or self.command in ("PUT", "POST")
                                       else None, headers=forwarded)
                    response = connection.getresponse()
                    data = response.read()
                    if isinstance(action, LoseAnswer):  # carried out upstream, the client hears otherwise
                        self._error(action.status, action.code)
                        return
                    self.send_response(response.status)
                    for name, value in response.getheaders():
                        if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                            self.send_header(name, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    connection.close()

            def _error(self, status: int, code: str) -> None:
                document = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                            f"<Message>{code} (test proxy)</Message></Error>").encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(document)))
                self.end_headers()
                self.wfile.write(document)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "S3Proxy":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)
