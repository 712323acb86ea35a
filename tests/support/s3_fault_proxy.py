"""A flaky object store for tests: an HTTP proxy on 127.0.0.1 in front of an S3 server
(moto) that answers a seeded share of requests with a fault instead of forwarding them.

Faults, in equal shares: ``slowdown`` (503 SlowDown, S3's throttling answer),
``internal`` (500 InternalError) and ``drop`` (the request is read, then the connection
is closed with no answer). The fault decision for the n-th request comes from one
``random.Random(seed)`` drawn in arrival order, so a run's share of faults is fixed; which
request gets which depends only on arrival order. A faulted request never reaches the
server, so a retry of it is the first try there.

Bounded: loopback only, socket timeouts on both sides, daemon threads, ``stop()`` closes
the listener and waits for it. Not a general proxy: HTTP/1.1 with Content-Length or
chunked request bodies, which is what botocore sends.
"""

from __future__ import annotations

import http.client
import random
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULTS = ("slowdown", "internal", "drop")
_ERRORS = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "internal": (500, "InternalError", "We encountered an internal error. Please try again."),
}
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-connection",
    "content-length",
}
SOCKET_TIMEOUT_S = 60


class FaultProxy:
    """``FaultProxy(upstream, rate, seed)``; ``start()`` -> its URL; ``stop()``; ``counts``."""

    def __init__(self, upstream: str, rate: float, seed: int = 0):
        if not 0 <= rate < 1:
            raise ValueError(f"fault rate must be in [0, 1), got {rate}")
        up = urlsplit(upstream)
        if up.hostname != "127.0.0.1":
            raise ValueError(f"upstream must be on 127.0.0.1, got {upstream}")
        self.upstream = (up.hostname, up.port)
        self.rate = rate
        self.seed = seed
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.counts = dict.fromkeys(("forwarded", *FAULTS), 0)  # requests by what the proxy did
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3-fault-proxy", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> str:
        self._thread.start()
        return self.url

    def stop(self) -> None:
        if self._thread.is_alive():  # shutdown() waits for a serve_forever that never began
            self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=30)

    def decide(self) -> str:
        """'forwarded' or a fault name, for the next request (seeded, in arrival order)."""
        with self._lock:
            kind = _draw(self._rng, self.rate)
            self.counts[kind] += 1
            return kind

    @property
    def faults(self) -> int:
        return sum(self.counts[f] for f in FAULTS)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def first_with_every_fault(self, limit: int = 100_000) -> int:
        """How many requests it takes, with this seed, until every fault kind has happened:
        a run that made at least that many requests met them all."""
        rng, seen = random.Random(self.seed), set()
        for n in range(1, limit + 1):
            seen.add(_draw(rng, self.rate))
            if seen >= set(FAULTS):
                return n
        raise ValueError(f"rate {self.rate} never gives every fault in {limit} requests")


def _draw(rng: random.Random, rate: float) -> str:
    return rng.choice(FAULTS) if rng.random() < rate else "forwarded"


def _handler(proxy: FaultProxy):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect
        timeout = SOCKET_TIMEOUT_S

        def log_message(self, *args):  # quiet: pytest shows failures, not traffic
            pass

        def _body(self) -> bytes:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                parts = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline().strip():  # trailers up to the blank line
                            pass
                        return b"".join(parts)
                    parts.append(self.rfile.read(size))
                    self.rfile.readline()  # CRLF after each chunk
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _handle(self):
            body = self._body()
            kind = proxy.decide()
            if kind == "drop":
                self.close_connection = True
                self.connection.close()  # the client sees the connection end with no answer
                return
            if kind in _ERRORS:
                return self._error(*_ERRORS[kind])
            self._forward(body)

        def _error(self, status: int, code: str, message: str):
            xml = (
                f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                f"<Message>{message}</Message><Resource>{self.path}</Resource></Error>"
            ).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(0 if self.command == "HEAD" else len(xml)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(xml)

        def _forward(self, body: bytes):
            conn = http.client.HTTPConnection(*proxy.upstream, timeout=SOCKET_TIMEOUT_S)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in _HOP_BY_HOP:
                        self.send_header(k, v)
                # HEAD: the object's size, as the server said; else the body we relay
                length = resp.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
            finally:
                conn.close()

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    return Handler


# ----------------------------------------------------------------------------- moto

FAKE_AWS = dict(
    AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1", AWS_REGION="us-east-1"
)  # what moto accepts


class MotoS3:
    """moto's S3 server on a free 127.0.0.1 port; ``with MotoS3() as url: ...``.

    Empty on entry: moto's servers in one process share their state, so the buckets an
    earlier test's server made would otherwise still be there.
    """

    def __enter__(self) -> str:
        import socket

        from moto.server import ThreadedMotoServer

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self._server.start()
        url = f"http://127.0.0.1:{port}"
        urllib.request.urlopen(urllib.request.Request(f"{url}/moto-api/reset", method="POST"), timeout=30).close()
        return url

    def __exit__(self, *exc):
        self._server.stop()
