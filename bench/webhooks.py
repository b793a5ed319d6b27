"""A loopback webhook receiver: the benchmark learns that a request is final the way an
integrator would, instead of re-reading a growing status document many times a second
(which costs the status service and this process CPU that the codec needs)."""

from __future__ import annotations

import json
import threading
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FINAL_TYPES = {"request.completed", "request.error"}


class FinalWebhooks:
    """One event per request id, set when its final webhook arrives."""

    def __init__(self) -> None:
        self._events: defaultdict[str, threading.Event] = defaultdict(threading.Event)
        self._lock = threading.Lock()

    def event(self, request_id: str) -> threading.Event:
        with self._lock:
            return self._events[request_id]

    def heard(self, body: bytes) -> None:
        try:
            payload = json.loads(body)
        except ValueError:
            return
        if isinstance(payload, dict) and payload.get("type") in FINAL_TYPES:
            self.event(str(payload.get("request_id"))).set()


@contextmanager
def receive_webhooks() -> Iterator[tuple[str, FinalWebhooks]]:
    """Serve on 127.0.0.1 (a free port); yields the webhook URL and what it heard."""
    finals = FinalWebhooks()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            finals.heard(self.rfile.read(length))
            self.send_response(204)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hooks", finals
    finally:
        server.shutdown()
        server.server_close()
