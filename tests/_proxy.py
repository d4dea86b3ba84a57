"""A TCP proxy on 127.0.0.1 that puts faults between a client and a server, switchable at run time.

    proxy = FaultProxy(server_port)          # listening on proxy.port
    proxy.cut_after(1_000_000)               # every connection: cut after 1 MB client -> server
    proxy.stall()                            # accept, forward nothing either way
    proxy.refuse()                           # close every connection, new ones at once
    proxy.drop_responses(1)                  # the next response is lost (the request was served)
    proxy.throttle()                         # answer every request 503 SlowDown, forward nothing
    proxy.pass_through()                     # back to normal
    proxy.close()

Every mode applies to the connections already open as well as to new ones (a client's
keep-alive pool would otherwise bypass it). ``cut_after`` counts the bytes each connection has
carried client -> server since the mode was set: a PUT larger than that is cut mid-body, both
sides closed. ``stall`` holds what it has read and reads nothing more, so a sender's buffers
fill and it blocks, as against a server that hangs; ``pass_through`` releases the held bytes.
``drop_responses(n)``: the next ``n`` final responses from the server close their connection
instead of reaching the client (an interim ``100 Continue`` still passes), so the client cannot
know its request was carried out (what a retried conditional write must cope with). ``throttle`` answers each request itself with
``503 SlowDown`` (what S3 says when a prefix gets too many requests) and counts them in
``throttled``: a test can see how many attempts a client made.

Threads: one accepting, two per connection; :meth:`FaultProxy.close` closes every socket and
joins them all (bounded).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Literal

Mode = Literal["pass", "cut", "stall", "refuse", "throttle"]
_CHUNK = 65536
_SLOW_DOWN = (
    b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code>"
    b"<Message>Please reduce your request rate.</Message></Error>"
)



def _slow_down_response(*, close: bool) -> bytes:
    return (
        b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
        + (b"Connection: close\r\n" if close else b"")
        + f"Content-Length: {len(_SLOW_DOWN)}\r\n\r\n".encode()
        + _SLOW_DOWN
    )


class _Connection:
    def __init__(self, client: socket.socket, upstream: socket.socket, epoch: int) -> None:
        self.client = client
        self.upstream = upstream
        self.epoch = epoch  # the mode epoch that ``sent`` counts from
        self.sent = 0  # bytes forwarded client -> server since ``epoch``
        self.closed = False
        self.threads: list[threading.Thread] = []

    def close(self) -> None:
        self.closed = True
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()


class FaultProxy:
    """Forward 127.0.0.1:``port`` to ``target_host``:``target_port``, with faults on demand.

    Counters for tests: ``accepted`` connections, ``peak`` connections open at once, ``cuts``
    (connections cut by ``cut_after``), ``dropped`` responses, ``refused`` connections,
    ``throttled`` requests.
    """

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self._cond = threading.Condition()
        self._mode: Mode = "pass"
        self._epoch = 0
        self._cut_after = 0
        self._drop_budget = 0
        self._closing = False
        self._connections: set[_Connection] = set()
        self._responders: list[tuple[threading.Thread, socket.socket]] = []
        self.accepted = self.peak = self.cuts = self.dropped = self.refused = self.throttled = 0
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port: int = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept_loop, name="fault-proxy-accept", daemon=True)
        self._acceptor.start()

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def mode(self) -> Mode:
        return self._mode

    # --------------------------------------------------------------------- modes

    def _set(self, mode: Mode, *, cut_after: int = 0) -> None:
        with self._cond:
            self._mode = mode
            self._epoch += 1
            self._cut_after = cut_after
            doomed = list(self._connections) if mode in ("refuse", "throttle") else []
            self._cond.notify_all()
        for conn in doomed:
            conn.close()

    def pass_through(self) -> None:
        """Forward everything (releases what a stall held)."""
        self._set("pass")

    def cut_after(self, nbytes: int) -> None:
        """Cut each connection once it has carried ``nbytes`` client -> server from now on."""
        self._set("cut", cut_after=nbytes)

    def stall(self) -> None:
        """Accept connections, forward nothing in either direction."""
        self._set("stall")

    def refuse(self) -> None:
        """Close every open connection, and each new one as soon as it is accepted."""
        self._set("refuse")

    def throttle(self) -> None:
        """Answer every request with 503 SlowDown; forward nothing (open connections are closed)."""
        self._set("throttle")

    def drop_responses(self, count: int = 1) -> None:
        """Lose the next ``count`` responses: close the connection instead of forwarding them.
        (Independent of the mode; set it in "pass".)"""
        with self._cond:
            self._drop_budget = count

    # ------------------------------------------------------------------- threads

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _addr = self._listener.accept()
            except OSError:
                return  # closed
            with self._cond:
                if self._closing:
                    client.close()
                    return
                self.accepted += 1
                mode = self._mode
                if mode == "refuse":
                    self.refused += 1
            if mode == "refuse":
                with contextlib.suppress(OSError):
                    client.close()
                continue
            if mode == "throttle":
                thread = threading.Thread(target=self._answer_slow_down, args=(client,), daemon=True)
                with self._cond:
                    self._responders.append((thread, client))
                thread.start()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._cond:
                conn = _Connection(client, upstream, self._epoch)
                self._connections.add(conn)
                self.peak = max(self.peak, len(self._connections))
            for up in (True, False):
                thread = threading.Thread(target=self._pump, args=(conn, up), name="fault-proxy-pump", daemon=True)
                conn.threads.append(thread)
                thread.start()

    def _answer_slow_down(self, client: socket.socket) -> None:
        """Read each request (headers, then Content-Length bytes of body) and answer it 503."""
        buffer = b""
        client.settimeout(10)
        try:
            while not self._closing:
                while b"\r\n\r\n" not in buffer:
                    data = client.recv(_CHUNK)
                    if not data:
                        return
                    buffer += data
                head, buffer = buffer.split(b"\r\n\r\n", 1)
                headers = {}
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    headers[name.strip().lower()] = value.strip()
                length = int(headers.get(b"content-length", b"0"))
                if headers.get(b"expect", b"").lower() == b"100-continue":
                    # The client waits for "100 Continue" before sending the body: answer now,
                    # body unsent, and close (what a server that refuses it early does).
                    with self._cond:
                        self.throttled += 1
                    client.sendall(_slow_down_response(close=True))
                    return
                while len(buffer) < length:
                    data = client.recv(_CHUNK)
                    if not data:
                        return
                    buffer += data
                buffer = buffer[length:]
                with self._cond:
                    self.throttled += 1
                client.sendall(_slow_down_response(close=False))
        except (OSError, ValueError):
            pass
        finally:
            with contextlib.suppress(OSError):
                client.close()

    def _wait_while_stalled(self, conn: _Connection) -> bool:
        """Block while the mode is "stall"; False if the connection or proxy closed meanwhile."""
        with self._cond:
            while self._mode == "stall" and not conn.closed and not self._closing:
                self._cond.wait(0.5)
            return not (conn.closed or self._closing)

    def _pump(self, conn: _Connection, upstream: bool) -> None:
        src, dst = (conn.client, conn.upstream) if upstream else (conn.upstream, conn.client)
        try:
            while self._wait_while_stalled(conn):
                data = src.recv(_CHUNK)
                if not data:
                    break
                if not self._wait_while_stalled(conn):  # read before a stall began: hold it
                    break
                with self._cond:
                    if upstream and self._mode == "cut":
                        if conn.epoch != self._epoch:
                            conn.epoch, conn.sent = self._epoch, 0
                        room = self._cut_after - conn.sent
                        if len(data) >= room:
                            data, cut = data[: max(room, 0)], True
                            self.cuts += 1
                        else:
                            cut = False
                        conn.sent += len(data)
                    elif upstream:
                        conn.epoch, conn.sent, cut = self._epoch, conn.sent + len(data), False
                    elif self._drop_budget > 0:
                        # Forward an interim "100 Continue" (the client then sends the body);
                        # drop the final response.
                        interim = b""
                        while data.startswith(b"HTTP/1.1 1") and b"\r\n\r\n" in data:
                            head, data = data.split(b"\r\n\r\n", 1)
                            interim += head + b"\r\n\r\n"
                        cut = bool(data)
                        if cut:
                            self._drop_budget -= 1
                            self.dropped += 1
                        data = interim
                    else:
                        cut = False
                if data:
                    dst.sendall(data)
                if cut:
                    break
        except OSError:
            pass
        finally:
            conn.close()
            with self._cond:
                self._connections.discard(conn)

    # ------------------------------------------------------------------- closing

    def close(self) -> None:
        """Stop accepting, close every connection, join every thread (bounded)."""
        with self._cond:
            self._closing = True
            connections = list(self._connections)
            self._cond.notify_all()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):  # wake accept() where shutdown() does not
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        self._listener.close()
        for conn in connections:
            conn.close()
        self._acceptor.join(timeout=10)
        for thread, sock in self._responders:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            thread.join(timeout=10)
        for conn in connections:
            for thread in conn.threads:
                thread.join(timeout=10)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
