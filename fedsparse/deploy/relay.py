"""A byte-counting TCP relay, to measure what really crosses a SuperNode <-> SuperLink socket.

The strategy's ledger counts `message_to_proto(m).ByteSize()` per message; the socket also carries
Flower's object-tree push/pull (one request per object), HTTP headers, node-auth signatures,
polls, heartbeats, the FAB download and, with TLS, record framing and handshakes. Point the
SuperNodes at the relay (`--superlink 127.0.0.1:<relay.port>`) and it counts every byte in each
direction; TLS passes through untouched, so the same relay measures encrypted traffic.

    python -m fedsparse.deploy.relay 9093 127.0.0.1:9092   # prints the totals on Ctrl-C
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from pathlib import Path

UP, DOWN = "up", "down"  # SuperNode -> SuperLink, SuperLink -> SuperNode


class Relay:
    """Listens on `host:port` (0: any free port) and forwards every connection to `target`.

    `counts` are cumulative bytes per direction; `watch()` snapshots them whenever a file gains a
    line, so bytes can be attributed to the rounds that rounds.jsonl closes."""

    def __init__(self, target: tuple[str, int], host: str = "127.0.0.1", port: int = 0) -> None:
        self.target = target
        self.counts = {UP: 0, DOWN: 0, "connections": 0}
        self.marks: list[dict[str, int]] = []  # a snapshot per watched line, in order
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server((host, port))
        self.port: int = self._listener.getsockname()[1]

    def __enter__(self) -> Relay:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._listener.close()
        for s in self._sockets:
            s.close()

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)

    def watch(self, path: Path, interval: float = 0.05) -> None:
        """Append a snapshot to `marks` each time `path` gains a line (polled every `interval`)."""

        def poll() -> None:
            while not self._stop.is_set():
                lines = path.read_bytes().count(b"\n") if path.exists() else 0
                while len(self.marks) < lines:
                    self.marks.append(self.snapshot())
                time.sleep(interval)

        threading.Thread(target=poll, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
                server = socket.create_connection(self.target)
            except OSError:
                return
            self._sockets += [client, server]
            with self._lock:
                self.counts["connections"] += 1
            threading.Thread(target=self._pump, args=(client, server, UP), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, DOWN), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        try:
            while data := src.recv(1 << 16):
                with self._lock:
                    self.counts[direction] += len(data)
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)  # pass the half-close on (HTTP keeps the other half)
        except OSError:
            src.close()
            dst.close()


def windows(marks: list[dict[str, int]], final: dict[str, int]) -> list[dict[str, int]]:
    """Bytes per window: before the first mark, between consecutive marks, after the last one."""
    edges = [{UP: 0, DOWN: 0, "connections": 0}, *marks, final]
    return [{k: b[k] - a[k] for k in a} for a, b in zip(edges, edges[1:])]


if __name__ == "__main__":
    listen, target = int(sys.argv[1]), sys.argv[2].rsplit(":", 1)
    with Relay((target[0], int(target[1])), port=listen) as relay:
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            print(relay.snapshot())
