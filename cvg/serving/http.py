"""Connection guards for `cvg serve` on uvicorn: clients that open sockets and send nothing, or half a request
head, hold nothing for long and crowd out nobody.

`guarded_protocol(head_seconds, max_connections)` is uvicorn's h11 protocol with two guards:
- a deadline on each request head: a connection that has not sent a whole head within `head_seconds` of
  connecting (or of its last response) is closed;
- a cap on open connections: when a new one would pass `max_connections`, the connection that has waited
  longest for its head is closed to make room (one busy with a request is never closed); when every one
  is busy, the new one is answered 503 and closed.
So 200 half-open sockets cannot starve /healthz, and the cap, below the process's file limit
(`connection_cap`), keeps the server from running out of descriptors. Bodies that stop arriving are the
application's to time out (`cvg.serving.api.BodyLimit`).
"""

from __future__ import annotations

import resource
import time

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

HEAD_SECONDS = 10.0
SPARE_DESCRIPTORS = 64  # files the server opens besides its sockets: outputs, records, libraries
_REFUSED = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


def connection_cap(limit: int = 1000) -> int:
    """At most `limit` connections, and few enough to leave `SPARE_DESCRIPTORS` of the process's file limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    room = limit if soft == resource.RLIM_INFINITY else soft - SPARE_DESCRIPTORS
    return max(1, min(limit, room))


class GuardedProtocol(H11Protocol):
    """uvicorn's `H11Protocol` with a request-head deadline and a connection cap (see the module)."""

    head_seconds: float = HEAD_SECONDS
    max_connections: int = 1000

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._head_timer = None
        self._waiting_since = time.monotonic()
        open_connections = sum(not c.transport.is_closing() for c in self.connections)
        if open_connections > self.max_connections and not _evict_one(self.connections, self):
            transport.write(_REFUSED)
            transport.close()
            return
        self._expect_head()

    def connection_lost(self, exc) -> None:
        self._stop_timer()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        if self._busy():
            self._stop_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._waiting_since = time.monotonic()
            self._expect_head()

    def _busy(self) -> bool:
        """Serving a request: its head came in and its response is not done."""
        return self.cycle is not None and not self.cycle.response_complete

    def _expect_head(self) -> None:
        self._stop_timer()
        self._head_timer = self.loop.call_later(self.head_seconds, self._head_late)

    def _stop_timer(self) -> None:
        if getattr(self, "_head_timer", None) is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        if not self._busy() and not self.transport.is_closing():
            self.close_idle()

    def close_idle(self) -> None:
        """Close a connection that is waiting for a request head."""
        self._stop_timer()
        try:
            self.conn.send(h11.ConnectionClosed())
        except h11.LocalProtocolError:  # mid-message: the socket closes all the same
            pass
        self.transport.close()


def _evict_one(connections, newcomer: GuardedProtocol) -> bool:
    """Close the connection (not `newcomer`) that has waited longest for a request head; False if none waits."""
    waiting = [
        c
        for c in connections
        if c is not newcomer and isinstance(c, GuardedProtocol) and not c._busy() and not c.transport.is_closing()
    ]
    if not waiting:
        return False
    min(waiting, key=lambda c: c._waiting_since).close_idle()
    return True


def guarded_protocol(head_seconds: float = HEAD_SECONDS, max_connections: int | None = None) -> type[GuardedProtocol]:
    """The protocol class to give uvicorn (`uvicorn.run(app, http=...)`) with these guards."""
    cap = connection_cap() if max_connections is None else max_connections
    if head_seconds <= 0 or cap < 1:
        raise ValueError(f"head_seconds must be positive and max_connections at least 1, got {head_seconds}, {cap}")
    return type("GuardedProtocol", (GuardedProtocol,), {"head_seconds": head_seconds, "max_connections": cap})
