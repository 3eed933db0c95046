"""The byte-counting relay of the deployment tests, against a local echo server (no Flower)."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from fedsparse.deploy.relay import DOWN, UP, Faults, Relay, windows


def _echo_server() -> tuple[socket.socket, int]:
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            while data := conn.recv(1 << 16):
                if data.endswith(b"\n"):  # answers 10 bytes per line: up and down differ
                    conn.sendall(b"0123456789")

    threading.Thread(target=serve, daemon=True).start()
    return server, server.getsockname()[1]


def _wait(condition, timeout: float = 5) -> None:
    deadline = time.time() + timeout
    while not condition() and time.time() < deadline:
        time.sleep(0.01)
    assert condition()


def test_relay_counts_each_direction_and_windows(tmp_path: Path):
    server, port = _echo_server()
    marker = tmp_path / "rounds.jsonl"
    with server, Relay(("127.0.0.1", port)) as relay:
        relay.watch(marker, interval=0.01)
        with socket.create_connection(("127.0.0.1", relay.port)) as client:
            client.sendall(b"x" * 999 + b"\n")
            assert len(client.recv(100)) == 10
            marker.write_text("{}\n")  # a round ends
            _wait(lambda: len(relay.marks) == 1)
            client.sendall(b"y" * 499 + b"\n")
            assert len(client.recv(100)) == 10
            _wait(lambda: relay.snapshot()[DOWN] == 20)
    assert relay.snapshot() == {UP: 1500, DOWN: 20, "connections": 1}
    first, second = windows(relay.marks, relay.snapshot())
    assert (first[UP], first[DOWN], second[UP], second[DOWN]) == (1000, 10, 500, 10)


def test_latency_holds_each_direction_back_and_bandwidth_paces_it():
    server, port = _echo_server()
    with server, Relay(("127.0.0.1", port), faults=Faults(latency=0.2)) as relay:
        with socket.create_connection(("127.0.0.1", relay.port)) as client:
            began = time.monotonic()
            client.sendall(b"x" * 99 + b"\n")
            assert len(client.recv(100)) == 10
            assert time.monotonic() - began >= 0.4  # 0.2 s up, 0.2 s down
    server, port = _echo_server()
    with server, Relay(("127.0.0.1", port), faults=Faults(bandwidth=100_000)) as relay:
        with socket.create_connection(("127.0.0.1", relay.port)) as client:
            began = time.monotonic()
            client.sendall(b"x" * 49_999 + b"\n")
            assert len(client.recv(100)) == 10
            assert time.monotonic() - began >= 0.5  # 50 KB at 100 KB/s
    assert relay.snapshot()[UP] == 50_000


def test_a_cut_resets_the_first_connection_mid_message_and_counts_what_crossed():
    server, port = _echo_server()
    with server, Relay(("127.0.0.1", port), faults=Faults(cut={UP: 300})) as relay:
        with socket.create_connection(("127.0.0.1", relay.port)) as client:
            client.sendall(b"x" * 999 + b"\n")  # one 1,000-byte message, cut after 300 bytes
            with pytest.raises(OSError):
                while client.recv(100):  # the relay resets the connection: no answer comes
                    pass
                raise ConnectionResetError("closed without an answer")
        assert relay.cuts == [(UP, 300)]
        assert relay.snapshot()[UP] == 300
        _wait(lambda: relay.snapshot()[DOWN] == 0)
