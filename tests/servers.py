"""Real local HTTP servers standing in for the Push Gateway, FCM and APNs.

`StubApp` is a small ASGI app that records every request and answers from a
script: tests say "the next two requests to /push/gcm/send get 500, then 200"
and then assert on exactly what arrived. `serve_http` runs it under uvicorn on
127.0.0.1 in a background thread, so the code under test talks real HTTP.
`serve_http2` runs it under hypercorn over TLS with HTTP/2 (APNs' protocol),
with a throwaway CA the client is told to trust.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import tempfile
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hypercorn.asyncio
import hypercorn.config
import orjson
import uvicorn

from streamer.devmongo import free_port
from tests.tls import issue_certificates

Scope = dict[str, Any]


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    http_version: str

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass
class Reply:
    status: int = 200
    body: bytes | dict[str, Any] | list[Any] = b"{}"
    headers: dict[str, str] = field(default_factory=dict)
    #: Seconds to wait before answering (a hanging peer).
    delay: float = 0.0


class StubApp:
    """Records requests; answers each path from its scripted replies, else `default`."""

    def __init__(self, default: Reply | None = None) -> None:
        self.default = default or Reply()
        self.requests: list[Recorded] = []
        self._scripts: dict[str, deque[Reply]] = {}
        self._lock = threading.Lock()

    def script(self, path: str, *replies: Reply) -> None:
        """The next requests to `path` get these replies, in order; then the default."""
        with self._lock:
            self._scripts.setdefault(path, deque()).extend(replies)

    def received(self, path: str | None = None) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if path is None or r.path == path]

    def wait_for(
        self, count: int, path: str | None = None, timeout: float = 10.0
    ) -> list[Recorded]:
        """Block until `count` requests (to `path`) arrived; fail after `timeout`."""
        deadline = time.monotonic() + timeout
        while len(found := self.received(path)) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(found)} of {count} requests arrived in {timeout} s")
            time.sleep(0.01)
        return found

    def _next_reply(self, path: str) -> Reply:
        with self._lock:
            queue = self._scripts.get(path)
            return queue.popleft() if queue else self.default

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        body = await read_body(receive)
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        with self._lock:
            self.requests.append(
                Recorded(scope["method"], scope["path"], headers, body, scope["http_version"])
            )
        reply = self._next_reply(scope["path"])
        if reply.delay:
            await asyncio.sleep(reply.delay)
        payload = reply.body if isinstance(reply.body, bytes) else orjson.dumps(reply.body)
        response_headers = [(b"content-type", b"application/json")]
        response_headers += [(k.encode(), v.encode()) for k, v in reply.headers.items()]
        start = {"type": "http.response.start", "status": reply.status}
        await send({**start, "headers": response_headers})
        await send({"type": "http.response.body", "body": payload})


async def read_body(receive: Any) -> bytes:
    """The whole request body of an ASGI http scope."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


async def lifespan(receive: Any, send: Any) -> None:
    """Answer an ASGI lifespan scope: the stand-ins need no start-up or shutdown work."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


@contextlib.contextmanager
def serve_http(app: Any, port: int | None = None) -> Iterator[str]:
    """Serve `app` with uvicorn on 127.0.0.1 in a thread; yields its base URL."""
    port = port or free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"stub server did not start on port {port}")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextlib.contextmanager
def serve_connections(handle: Callable[[socket.socket], None]) -> Iterator[str]:
    """A raw TCP peer on 127.0.0.1 that passes each connection to `handle`, one at a
    time, then closes it; yields its URL."""
    stop = threading.Event()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)

    def accept() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            with connection:
                handle(connection)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=10)
        listener.close()


def _read_head(connection: socket.socket) -> bytes:
    """What arrived up to the end of the request's head (and maybe some body after it)."""
    data = b""
    while b"\r\n\r\n" not in data and (chunk := connection.recv(65536)):
        data += chunk
    return data


@contextlib.contextmanager
def serve_hang_up() -> Iterator[tuple[str, list[bytes]]]:
    """A peer that reads each request's head, then closes the connection unanswered:
    a gateway that took a push and died before answering. Yields its URL and the heads."""
    heads: list[bytes] = []
    with serve_connections(lambda connection: heads.append(_read_head(connection))) as url:
        yield url, heads


@contextlib.contextmanager
def serve_forward_proxy() -> Iterator[tuple[str, list[str]]]:
    """An HTTP forward proxy, one request per connection: it records each request's
    target (absolute, as a client sends it to a proxy) and relays it to its server.
    Yields its URL and the targets."""
    targets: list[str] = []

    def relay(connection: socket.socket) -> None:
        head, _, body = _read_head(connection).partition(b"\r\n\r\n")
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        method, target, version = request_line.split(" ")
        targets.append(target)
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)
        }
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            body += connection.recv(65536)
        url = urllib.parse.urlsplit(target)
        kept = [
            line for line in header_lines if not line.lower().startswith(("connection:", "proxy-"))
        ]
        upstream_head = "\r\n".join([f"{method} {url.path} {version}", *kept, "Connection: close"])
        with socket.create_connection((url.hostname, url.port or 80)) as upstream:
            upstream.sendall(upstream_head.encode("latin-1") + b"\r\n\r\n" + body)
            while chunk := upstream.recv(65536):
                connection.sendall(chunk)

    with serve_connections(relay) as url:
        yield url, targets


@contextlib.contextmanager
def serve_http2(app: Any) -> Iterator[tuple[str, str]]:
    """Serve `app` with hypercorn over TLS, HTTP/2 by ALPN, in a thread.

    Yields (base URL, path of the CA certificate to trust). APNs only speaks
    HTTP/2, so its stand-in must too.
    """
    with tempfile.TemporaryDirectory() as tmp:
        tls = issue_certificates(Path(tmp))
        port = free_port()
        config = hypercorn.config.Config()
        config.bind = [f"127.0.0.1:{port}"]
        config.certfile, config.keyfile = str(tls.cert), str(tls.key)
        config.alpn_protocols = ["h2", "http/1.1"]
        config.loglevel = "WARNING"
        loop = asyncio.new_event_loop()
        stop = asyncio.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(
                hypercorn.asyncio.serve(app, config, shutdown_trigger=stop.wait)
            )

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        _wait_until_listening(port, thread)
        try:
            yield f"https://127.0.0.1:{port}", str(tls.ca)
        finally:
            loop.call_soon_threadsafe(stop.set)
            thread.join(timeout=10)
            loop.close()


def _wait_until_listening(port: int, thread: threading.Thread, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError(f"HTTP/2 stub server did not start on port {port}") from None
            time.sleep(0.01)
