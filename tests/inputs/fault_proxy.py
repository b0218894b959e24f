"""A fault-injecting HTTP proxy on 127.0.0.1, in front of a local server (moto's S3, a Range server).

Each request is read whole, then either forwarded as it came and its answer relayed, or met with
a fault: `503` (S3's SlowDown throttling answer), `reset` (the connection cut with an RST, no
answer), `hang` (the connection held open, never answered) or `trickle` (the answer relayed a few
bytes at a time). Which requests get a fault is switchable while the proxy runs (`inject`).
"""

from __future__ import annotations

import http.client
import http.server
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

_SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length"}


@dataclass
class Fault:
    """A fault for the requests `matches` picks: every `every`-th of them, at most `times` in all
    (None: no limit); with `once`, each request (method, path, Range) at most once, so that its
    retry passes. `trickle` relays `chunk` bytes every `pause` seconds."""

    kind: str
    every: int = 1
    times: int | None = None
    once: bool = False
    matches: Callable[[str, str, dict], bool] = lambda method, path, headers: True
    chunk: int = 256
    pause: float = 0.05
    seen: int = 0
    injected: int = 0
    met: set = field(default_factory=set)


@dataclass
class Log:
    """What the proxy saw: every request (method, path, Range), the faults it injected, the bytes
    of trickled answers relayed so far."""

    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    faults: list[tuple[str, str, str | None]] = field(default_factory=list)
    trickled: int = 0


class FaultProxy:
    """`with FaultProxy(port) as proxy:` forwards 127.0.0.1:`proxy.port` to 127.0.0.1:`port`."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.log = Log()
        self._fault: Fault | None = None
        self.on_request: Callable[[str, str], None] | None = None  # called first, for each request
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def inject(self, fault: Fault | None) -> Fault | None:
        """Meet the requests from now on with `fault` (None: forward them all)."""
        with self._lock:
            self._fault = fault
        return fault

    def decide(self, method: str, path: str, headers: dict) -> Fault | None:
        """The fault to meet a request with, if any."""
        if self.on_request is not None:
            self.on_request(method, path)
        request = (method, path, headers.get("range"))
        with self._lock:
            self.log.requests.append(request)
            fault = self._fault
            if fault is None or not fault.matches(method, path, headers) or request in fault.met:
                return None
            fault.seen += 1
            if (fault.times is not None and fault.injected >= fault.times) or fault.seen % fault.every:
                return None
            fault.injected += 1
            if fault.once:
                fault.met.add(request)
            self.log.faults.append((fault.kind, *request))
            return fault

    def __enter__(self) -> FaultProxy:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._stopping.set()  # held connections give up
        self._server.shutdown()
        self._server.server_close()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the storage libraries use it
    owner: FaultProxy

    def log_message(self, *args):
        pass

    def handle_one_request(self):
        try:
            super().handle_one_request()
        except (ConnectionError, TimeoutError):
            self.close_connection = True

    def do_GET(self):
        body = self._body()
        headers = {k.lower(): v for k, v in self.headers.items()}
        fault = self.owner.decide(self.command, self.path, headers)
        kind = fault.kind if fault else None
        if kind == "reset":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            return
        if kind == "hang":
            self.owner._stopping.wait()
            self.close_connection = True
            return
        if kind == "503":
            self._answer(503, [("Content-Type", "application/xml")], _SLOW_DOWN)
            return
        status, reply_headers, data = self._forward(body)
        self._answer(status, reply_headers, data, fault if kind == "trickle" else None)

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raw = b""
            while True:
                line = self.rfile.readline()
                raw += line
                size = int(line.split(b";")[0], 16)
                raw += self.rfile.read(size + 2)
                if size == 0:
                    return raw
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _forward(self, body: bytes):
        """The upstream server's answer (a fresh connection to it for each request)."""
        upstream = http.client.HTTPConnection("127.0.0.1", self.owner.upstream_port, timeout=30)
        try:
            upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for key, value in self.headers.items():
                if key.lower() != "connection":
                    upstream.putheader(key, value)
            upstream.endheaders(body or None)
            reply = upstream.getresponse()
            return reply.status, reply.getheaders(), reply.read()
        finally:
            upstream.close()

    def _answer(self, status: int, headers, data: bytes, trickle: Fault | None = None) -> None:
        self.send_response_only(status)
        length = None
        for key, value in headers:
            if key.lower() == "content-length":
                length = value
            if key.lower() not in _HOP_BY_HOP:
                self.send_header(key, value)
        head = self.command == "HEAD"
        self.send_header("Content-Length", length if head and length else str(len(data)))
        self.end_headers()
        if head:
            return
        if trickle is None:
            self.wfile.write(data)
            return
        for begin in range(0, len(data), trickle.chunk):
            if self.owner._stopping.is_set():
                self.close_connection = True
                return
            self.wfile.write(data[begin : begin + trickle.chunk])
            self.wfile.flush()
            self.owner.log.trickled += len(data[begin : begin + trickle.chunk])
            time.sleep(trickle.pause)

    do_HEAD = do_PUT = do_POST = do_DELETE = do_GET
