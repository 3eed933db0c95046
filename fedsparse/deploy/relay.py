"""A byte-counting TCP relay, to measure what really crosses a SuperNode <-> SuperLink socket.

The strategy's ledger counts `message_to_proto(m).ByteSize()` per message; the socket also carries
Flower's object-tree push/pull (one request per object), HTTP headers, node-auth signatures,
polls, heartbeats, the FAB download and, with TLS, record framing and handshakes. Point the
SuperNodes at the relay (`--superlink 127.0.0.1:<relay.port>`) and it counts every byte in each
direction; TLS passes through untouched, so the same relay measures encrypted traffic.
`Faults` make it a bad network: a one-way delay, a bandwidth cap per connection and direction,
and a cut (both sockets reset) once a connection has carried a given number of bytes in one
direction, i.e. in the middle of a message; every byte that crossed is counted, cut or not.

    python -m fedsparse.deploy.relay 9093 127.0.0.1:9092   # prints the totals on Ctrl-C
"""

from __future__ import annotations

import queue
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

UP, DOWN = "up", "down"  # SuperNode -> SuperLink, SuperLink -> SuperNode


@dataclass
class Faults:
    """A bad network between the SuperNodes and the SuperLink."""

    latency: float = 0.0  # seconds each chunk is held back, one way (throughput is not reduced)
    bandwidth: float | None = None  # bytes per second, per connection and direction
    # direction -> bytes: the first connection that carries more than this in that direction is
    # reset after exactly that many bytes (once per direction), whatever message it is in
    cut: dict[str, int] = field(default_factory=dict)


class Relay:
    """Listens on `host:port` (0: any free port) and forwards every connection to `target`, through
    `faults` if given.

    `counts` are cumulative bytes per direction; `watch()` snapshots them whenever a file gains a
    line, so bytes can be attributed to the rounds that rounds.jsonl closes; `cuts` lists the
    connections cut, as (direction, bytes the connection had carried that way)."""

    def __init__(
        self, target: tuple[str, int], host: str = "127.0.0.1", port: int = 0, faults: Faults | None = None
    ) -> None:
        self.target = target
        self.faults = faults or Faults()
        self._armed = dict(self.faults.cut)
        self.cuts: list[tuple[str, int]] = []
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
        faults, carried = self.faults, 0
        delayed = faults.latency > 0 or faults.bandwidth
        out: queue.Queue = queue.Queue()
        if delayed:
            threading.Thread(target=self._send_later, args=(out, dst), daemon=True).start()
        try:
            while data := src.recv(1 << 16):
                cut_at = self._cut_at(direction, carried + len(data))
                if cut_at is not None:
                    data = data[: cut_at - carried]
                carried += len(data)
                with self._lock:
                    self.counts[direction] += len(data)
                if delayed:
                    out.put((time.monotonic() + faults.latency, data))
                else:
                    dst.sendall(data)
                if cut_at is not None:
                    out.put(None)
                    time.sleep(faults.latency + 0.1)  # what crossed before the cut is delivered
                    _reset(src, dst)
                    return
            out.put(None)
            if not delayed:
                dst.shutdown(socket.SHUT_WR)  # pass the half-close on (HTTP keeps the other half)
        except OSError:
            out.put(None)
            src.close()
            dst.close()

    def _cut_at(self, direction: str, carried: int) -> int | None:
        """The byte count at which this connection is cut, if it reaches it now (once per direction)."""
        with self._lock:
            limit = self._armed.get(direction)
            if limit is None or carried <= limit:
                return None
            del self._armed[direction]
            self.cuts.append((direction, limit))
            return limit

    def _send_later(self, out: queue.Queue, dst: socket.socket) -> None:
        """Sends each chunk when it is due, at most `bandwidth` bytes per second."""
        free = 0.0  # when the capped link has finished the previous chunk
        try:
            while (item := out.get()) is not None:
                due, data = item
                if self.faults.bandwidth:  # store and forward: a chunk arrives once it is all through
                    due = free = max(due, free) + len(data) / self.faults.bandwidth
                time.sleep(max(0.0, due - time.monotonic()))
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            dst.close()


def _reset(*sockets: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a dropped link or a killed middlebox would."""
    for s in sockets:
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        s.close()


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
