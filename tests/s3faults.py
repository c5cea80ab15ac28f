"""A real S3 endpoint (moto's server) behind a small fault-injecting HTTP proxy, on localhost.

The proxy forwards every request to moto and relays the answer, except where its ``policy``
says otherwise: it can answer ``503 SlowDown`` (S3's throttling reply) or drop the connection
without a reply, and it counts the requests per (method, path) so tests can see how often an
object was fetched. Nothing is mocked: the AWS SDK inside pyarrow talks HTTP to the proxy.
"""
from __future__ import annotations

import contextlib
import http.client
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Iterator

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b'<Message>Please reduce your request rate.</Message></Error>')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_server() -> Iterator[int]:
    """moto's S3 server on a free port (skips the test when moto[server] is missing)."""
    import pytest
    server = Path(sys.executable).with_name("moto_server")
    if not server.exists():
        pytest.skip("moto[server] is not installed (pip install -e '.[test]')")
    port = free_port()
    proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto_server did not start")
                time.sleep(0.2)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# policy(method, path, attempt) -> None (forward), "503" or "drop"; attempt counts from 1 per
# (method, path with query)
Policy = Callable[[str, str, int], "str | None"]


class FaultProxy:
    """``http://127.0.0.1:{port}`` in front of moto at ``upstream_port``."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = upstream_port
        self.policy: Policy = lambda method, path, attempt: None
        self.requests: Counter[tuple[str, str]] = Counter()   # (method, path without query)
        self.faults: Counter[str] = Counter()
        self._attempts: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path = self.path.split("?")[0]
                with proxy._lock:
                    proxy.requests[(self.command, path)] += 1
                    proxy._attempts[(self.command, self.path)] += 1
                    attempt = proxy._attempts[(self.command, self.path)]
                fault = proxy.policy(self.command, self.path, attempt)
                if fault:
                    with proxy._lock:
                        proxy.faults[fault] += 1
                if fault == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if fault == "503":
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    self.wfile.write(SLOW_DOWN)
                    return
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = f"127.0.0.1:{proxy.upstream}"
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.faults.clear()
            self._attempts.clear()
        self.policy = lambda method, path, attempt: None

    def gets(self, key_suffix: str) -> int:
        """GET requests so far for object paths ending in ``key_suffix``."""
        return sum(n for (m, p), n in self.requests.items() if m == "GET" and p.endswith(key_suffix))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def s3_env(port: int) -> dict[str, str]:
    return {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
