"""Images over HTTP on 127.0.0.1 that a test holds back: a job reading them cannot get
past them until the test opens the gate, so a kill or Ctrl-C lands mid-job by
construction instead of by the job being long enough.

Files under ``open/`` are served at once; a request for one under ``gated/`` waits
until ``open_gate()`` (at most ``wait_s``, then it is served anyway, so nothing hangs).
"""

from __future__ import annotations

import functools
import pathlib
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer


class GatedImages:
    """``with GatedImages(folder) as images: images.add(name, data, gated) -> URL``."""

    def __init__(self, folder, wait_s: float = 300.0):
        self.folder = pathlib.Path(folder)
        self.wait_s = wait_s
        self.gate = threading.Event()
        self.requests: list[str] = []  # paths in the order their requests arrived
        self._lock = threading.Lock()
        for sub in ("open", "gated"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)

    def add(self, name: str, data: bytes, gated: bool) -> str:
        """Store ``data`` as ``name``; its URL, held back until the gate opens if ``gated``."""
        path = self.folder / ("gated" if gated else "open") / name
        path.write_bytes(data)
        return f"http://127.0.0.1:{self._server.server_address[1]}/{path.parent.name}/{name}"

    def open_gate(self) -> None:
        """Serve every held and future request."""
        self.gate.set()

    def __enter__(self) -> "GatedImages":
        images = self

        class Handler(SimpleHTTPRequestHandler):
            def send_head(self):
                with images._lock:
                    images.requests.append(self.path)
                if self.path.startswith("/gated/"):
                    images.gate.wait(images.wait_s)
                return super().send_head()

            def log_message(self, *args):  # quiet: the job's log is what a failure shows
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass  # a killed job's socket is gone when its held request is served

        self._server = Server(("127.0.0.1", 0), functools.partial(Handler, directory=str(self.folder)))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.open_gate()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=30)
