"""A TCP proxy on loopback that a test controls, to put a network fault
between one process and a server it talks to.

- ``cut()`` is a partition: nothing is forwarded either way, and nothing is
  closed. Connections stay open and what is sent waits, as it does while
  TCP retransmits into a broken link; new connections are accepted (by the
  kernel's backlog) and get no further. ``heal()`` lets everything that
  waited through, in order, as a link that comes back does.
- ``refuse()`` is a server that is gone: open connections are reset and new
  ones refused (nothing listens on the port). ``heal()`` serves again, on
  the same port.
- ``reset_requests(n)``: the next ``n`` connections are reset once the
  client has sent its first bytes, before any is forwarded: a server
  process that stopped under a request it had not read.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from types import TracebackType


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._listening = True
        #: Set while data may flow; cleared by cut().
        self._flowing = threading.Event()
        self._flowing.set()
        self._refusing = False
        self._closed = False
        self._resets_left = 0
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._serve()

    def _serve(self) -> None:
        threading.Thread(
            target=self._accept, args=(self._listener,), name=f"proxy-{self.port}", daemon=True
        ).start()

    def url_for(self, url: str, host_port: str) -> str:
        """``url`` with its ``host_port`` replaced by this proxy's."""
        assert host_port in url, (host_port, url)
        return url.replace(host_port, f"127.0.0.1:{self.port}", 1)

    def cut(self) -> None:
        self._flowing.clear()

    def reset_requests(self, count: int) -> None:
        with self._lock:
            self._resets_left += count

    def _take_reset(self) -> bool:
        with self._lock:
            if self._resets_left <= 0:
                return False
            self._resets_left -= 1
            return True

    def refuse(self) -> None:
        self._refusing = True
        if self._listening:
            self._listening = False
            _stop_listening(self._listener)
        with self._lock:
            doomed = list(self._sockets)
        for sock in doomed:
            _reset(sock)

    def heal(self) -> None:
        self._refusing = False
        self._flowing.set()
        if not self._listening and not self._closed:
            # create_server sets SO_REUSEADDR: the port is free to take again.
            self._listener = socket.create_server(("127.0.0.1", self.port))
            self._listening = True
            self._serve()

    def close(self) -> None:
        self._closed = True
        _stop_listening(self._listener)
        self._flowing.set()
        with self._lock:
            doomed = list(self._sockets)
        for sock in doomed:
            _reset(sock)

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _accept(self, listener: socket.socket) -> None:
        while not self._closed:
            try:
                client, _ = listener.accept()
            except OSError:  # closed: refusing, or done
                return
            if self._refusing:
                _reset(client)
                continue
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        # A partition holds new connections too: the upstream connection is
        # made only once data may flow.
        self._flowing.wait()
        try:
            upstream = socket.create_connection(self._target, timeout=5)
            upstream.settimeout(None)
        except OSError:
            _reset(client)
            return
        with self._lock:
            self._sockets.update((client, upstream))
        for source, sink, from_client in ((client, upstream, True), (upstream, client, False)):
            threading.Thread(
                target=self._pump, args=(source, sink, from_client), daemon=True
            ).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        first = from_client
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if first and self._take_reset():
                    _reset(source)
                    break
                first = False
                # Read while cut (the kernel would have buffered it anyway),
                # sent only once healed.
                self._flowing.wait()
                if self._refusing or self._closed:
                    break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            with self._lock:
                self._sockets.difference_update((source, sink))


def _reset(sock: socket.socket) -> None:
    """Drop the connection at once (a zero linger makes the close a reset);
    the shutdown also wakes a pump blocked reading it."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


def _stop_listening(listener: socket.socket) -> None:
    """Close the port: a shutdown wakes the thread blocked accepting on it
    (a close alone would leave the kernel listening until that returns)."""
    with contextlib.suppress(OSError):
        listener.shutdown(socket.SHUT_RDWR)
    listener.close()
