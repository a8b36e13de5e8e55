"""Serves the HTTP API (:mod:`attrimeter.runtime.app`) with uvicorn, on an h11 protocol hardened for open networks.

uvicorn's h11 protocol does the HTTP/1.1 framing (h11 refuses conflicting ``Content-Length`` headers and lengths that
are not plain digits, such as ``1_0`` or `` +0002 ``: the request-smuggling class), with three changes:

* every request head has a deadline (``request_timeout_s``, counted from the connection or the previous answer):
  uvicorn has none before the first request, so a client sending its headers a byte at a time, or trickling a body
  nobody reads, would hold a connection for ever;
* a request that breaks the framing gets a JSON 400 (or h11's 431/501) naming the problem, like every other error;
* above ``max_connections`` connections or requests in progress, uvicorn's ``limit_concurrency`` answer becomes a
  JSON 503 with ``Retry-After``.

The listening socket is bound with a large backlog (bursts of connections wait in the kernel instead of being reset),
and SIGINT/SIGTERM stop serving gracefully: no new connections, answers in progress are finished (up to
``request_timeout_s``), then the runtime is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import threading
from collections.abc import Iterator
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from attrimeter.runtime.app import ServerLimits, create_app

if TYPE_CHECKING:
    from starlette.types import Receive, Scope, Send

    from attrimeter.runtime.runtime import Runtime

__all__ = ["RuntimeServer", "ServerLimits", "serve"]

log = logging.getLogger(__name__)

_MAX_HEAD_BYTES = 16 * 1024  # request line + headers (h11's default; a larger head is answered 431)


def _json(status: int, message: str) -> bytes:
    return json.dumps({"error": message, "status": status}).encode()


class _RecordingConnection(h11.Connection):
    """h11's connection, keeping the last framing error so that the answer can name it."""

    last_error: h11.RemoteProtocolError | None = None

    def next_event(self) -> Any:  # noqa: D102 - h11's method
        try:
            return super().next_event()
        except h11.RemoteProtocolError as e:
            self.last_error = e
            raise


class _Config(uvicorn.Config):
    """uvicorn's configuration plus the head deadline that :class:`_Protocol` reads."""

    def __init__(self, app: Any, *, header_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.header_timeout_s = header_timeout_s


class _Protocol(H11Protocol):
    """uvicorn's h11 protocol with a head deadline, JSON framing errors and a JSON 503 at the concurrency limit."""

    def __init__(self, config: _Config, server_state: Any, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.conn = _RecordingConnection(h11.SERVER, config.h11_max_incomplete_event_size or _MAX_HEAD_BYTES)
        self._header_timeout_s = config.header_timeout_s
        self._limit, self.limit_concurrency = self.limit_concurrency, None  # enforced by _admit, answered in JSON
        self._app, self.app = self.app, self._admit
        self._head_timer: asyncio.TimerHandle | None = None

    async def _admit(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self._limit
        if limit is not None and (len(self.connections) > limit or len(self.tasks) > limit):
            self.logger.warning("over the concurrency limit (%d): answered 503", limit)
            body = _json(503, f"the server is at its limit of {limit} connections; retry later")
            await send({"type": "http.response.start", "status": 503, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                (b"retry-after", b"1"), (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": body})
            return
        await self._app(scope, receive, send)

    # ------------------------------------------------------------------------------------------- head deadline

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # noqa: D102 - asyncio's hook
        super().connection_made(transport)  # type: ignore[arg-type]
        self._arm()

    def on_response_complete(self) -> None:  # noqa: D102 - uvicorn's hook
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: D102 - asyncio's hook
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = None if self.transport.is_closing() else self.loop.call_later(
            self._header_timeout_s, self._head_overdue)

    def _head_overdue(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
            return  # a request is being answered: its body has the app's deadline
        if self.conn.trailing_data[0] and self.conn.our_state is h11.IDLE:  # part of a request head came: say why
            message = f"request head not received within {self._header_timeout_s:g} s"
            body = _json(408, message)
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                 b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
        self.transport.close()

    # ------------------------------------------------------------------------------------------ framing errors

    def send_400_response(self, msg: str) -> None:
        """Answer a request h11 refused, in JSON, naming h11's reason (uvicorn sends plain text without it)."""
        error = self.conn.last_error if isinstance(self.conn, _RecordingConnection) else None
        status = error.error_status_hint if error is not None else 400
        body = _json(status, f"malformed HTTP request: {error or msg}")
        try:
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                       (b"connection", b"close")]
            response = h11.Response(status_code=status, reason=HTTPStatus(status).phrase, headers=headers)
            self.transport.write(self.conn.send(response) or b"")
            self.transport.write(self.conn.send(h11.Data(data=body)) or b"")
            self.transport.write(self.conn.send(h11.EndOfMessage()) or b"")
        except h11.LocalProtocolError:  # e.g. an answer already started: nothing more can be said
            pass
        self.transport.close()


class _Uvicorn(uvicorn.Server):
    """uvicorn's server, except that a stopping signal is not raised again once it has stopped.

    uvicorn re-raises SIGINT/SIGTERM after a graceful shutdown, which would end the process before the runtime is
    closed (and turn SIGINT into a KeyboardInterrupt traceback).
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # noqa: D102 - uvicorn's hook
        if threading.current_thread() is not threading.main_thread():  # signals can only be caught there
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _listen(host: str, port: int, backlog: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


class RuntimeServer:
    """An HTTP server for one runtime, bound at construction (port 0 picks a free port: read :attr:`url`).

    Run it with :meth:`serve_forever` (blocks; SIGINT/SIGTERM stop it when called from the main thread) or in a
    background thread with :meth:`start` / :meth:`stop` (or ``with``). The runtime is not closed by the server.

    Args:
        runtime: The runtime every request uses.
        host: Interface to listen on (``127.0.0.1`` keeps it local; ``0.0.0.0`` exposes it).
        port: TCP port.
        limits: Request and server limits.

    Raises:
        OSError: The address cannot be bound (e.g. the port is taken).
    """

    def __init__(self, runtime: Runtime, host: str = "127.0.0.1", port: int = 8080,
                 limits: ServerLimits | None = None) -> None:
        self.limits = limits or ServerLimits()
        self.app = create_app(runtime, self.limits)
        config = _Config(self.app, header_timeout_s=self.limits.request_timeout_s, http=_Protocol, ws="none",
                         loop="asyncio", lifespan="on", log_config=None, access_log=False, server_header=False,
                         limit_concurrency=self.limits.max_connections, backlog=self.limits.backlog,
                         h11_max_incomplete_event_size=_MAX_HEAD_BYTES,
                         timeout_graceful_shutdown=max(1, round(self.limits.request_timeout_s)))
        self._server = _Uvicorn(config)
        self._socket = _listen(host, port, self.limits.backlog)
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None

    @property
    def server_address(self) -> tuple[str, int]:
        """``(host, port)`` of the listening socket."""
        host, port = self._socket.getsockname()[:2]
        return host, port

    @property
    def url(self) -> str:
        """``http://host:port`` of the listening socket."""
        host, port = self.server_address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def serve_forever(self) -> None:
        """Serve until :meth:`stop` or SIGINT/SIGTERM, then finish the answers in progress."""
        try:
            self._server.run(sockets=[self._socket])
        finally:
            self._socket.close()

    def start(self) -> RuntimeServer:
        """Serve in a background thread; returns once the server accepts requests.

        Raises:
            RuntimeError: The server failed to start (the cause is chained).
        """
        def run() -> None:
            try:
                self.serve_forever()
            except BaseException as e:  # noqa: BLE001 - reported by start()
                self._failure = e

        self._thread = threading.Thread(target=run, name="attrimeter-http", daemon=True)
        self._thread.start()
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the HTTP server failed to start") from self._failure
            self._thread.join(0.01)
        return self

    def stop(self, timeout: float | None = 60.0) -> None:
        """Stop serving (gracefully) and wait for the background thread."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        self._socket.close()

    def __enter__(self) -> RuntimeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(runtime: Runtime, host: str = "127.0.0.1", port: int = 8080, limits: ServerLimits | None = None) -> None:
    """Serve ``runtime`` over HTTP until SIGINT/SIGTERM, then finish the answers in progress and close the runtime.

    Args:
        runtime: The runtime to serve; closed when serving ends (also when the address cannot be bound).
        host: Interface to listen on.
        port: TCP port; 0 picks a free one (logged).
        limits: Request and server limits.
    """
    try:
        server = RuntimeServer(runtime, host, port, limits)
    except BaseException:
        runtime.close()
        raise
    gallery = "no gallery" if runtime.gallery is None else f"gallery of {len(runtime.gallery)}"
    log.info("serving at %s (%s on %s, %s, model %s); viewer at %s/viewer/", server.url, runtime.backend.name,
             runtime.backend.device, gallery, runtime.model_id[:12], server.url)
    try:
        server.serve_forever()
    finally:
        runtime.close()
        log.info("server stopped")
