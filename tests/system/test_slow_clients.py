"""Slow and idle clients against a real ``kbms serve``: every such connection is closed, none holds the application.

The server runs with 1 s deadlines; a slow client goes on for up to 30 s, so "closed" means closed by the server,
long before the client would have stopped. No latency is asserted.
"""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import LiveServer, migrated_sqlite_url, start_server
from tests.support.helpers import dumps, intercom_payload, part

pytestmark = pytest.mark.slow
INGEST = "/integrations/intercom/conversations"
PATIENCE = 30.0  # how long a slow client would go on if the server let it


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    directory = tmp_path_factory.mktemp("slow")
    env = {
        "KBMS_HEADER_TIMEOUT": "1",
        "KBMS_BODY_TIMEOUT": "1",
        "KBMS_KEEPALIVE_TIMEOUT": "1",
        "KBMS_MAX_HEADER_BYTES": "8192",
        # One request at a time and no queue: a request the application is holding shows as a 503 for the next.
        "KBMS_MAX_IN_FLIGHT": "1",
        "KBMS_MAX_QUEUED": "0",
    }
    running = start_server(migrated_sqlite_url(directory), directory / "server.log", env=env)
    try:
        yield running
    finally:
        running.stop()


def connect(server: LiveServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), timeout=10)


def trickle(sock: socket.socket, data: bytes, *, every: float = 0.3) -> tuple[bytes, bool]:
    """Send ``data`` a byte at a time; (what the server answered, whether it closed the connection)."""
    answer = b""
    pending = iter(data)
    deadline = time.monotonic() + PATIENCE
    sock.setblocking(False)
    while time.monotonic() < deadline:
        readable, _, _ = select.select([sock], [], [], every)
        if readable:
            try:
                received = sock.recv(65536)
            except ConnectionResetError:
                return answer, True
            if not received:
                return answer, True
            answer += received
            continue
        byte = next(pending, None)
        if byte is not None:
            try:
                sock.send(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                return answer, True
    return answer, False


def error_code(answer: bytes) -> tuple[int, str]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)["error_code"]


def test_headers_sent_a_byte_at_a_time_are_cut_off_with_408(server: LiveServer) -> None:
    with connect(server) as sock:
        answer, closed = trickle(
            sock, f"GET /internal/conversations HTTP/1.1\r\nhost: t\r\nx-pad: {'a' * 200}".encode()
        )
    assert closed
    assert error_code(answer) == (408, "request_timeout")


def test_a_body_sent_a_byte_at_a_time_is_cut_off_with_408(server: LiveServer) -> None:
    body = dumps(intercom_payload("slow-body"))
    head = f"POST {INGEST} HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    with connect(server) as sock:
        sock.sendall(head.encode())
        answer, closed = trickle(sock, body)
    assert closed
    assert error_code(answer) == (408, "request_timeout")


def test_a_connection_that_never_sends_is_closed(server: LiveServer) -> None:
    with connect(server) as sock:
        answer, closed = trickle(sock, b"")
    assert (answer, closed) == (b"", True)


def test_an_idle_kept_alive_connection_is_closed(server: LiveServer) -> None:
    with connect(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: t\r\n\r\n")
        answer, closed = trickle(sock, b"")
    assert answer.startswith(b"HTTP/1.1 200")
    assert closed


def test_oversized_headers_are_431(server: LiveServer) -> None:
    headers = "".join(f"x-pad-{i}: {'a' * 1000}\r\n" for i in range(16))  # 16 KiB, twice the limit
    with connect(server) as sock:
        sock.sendall(f"GET /health HTTP/1.1\r\nhost: t\r\n{headers}".encode())
        answer, closed = trickle(sock, b"")
    assert closed
    assert error_code(answer) == (431, "headers_too_large")


def test_slow_bodies_do_not_hold_the_application(server: LiveServer) -> None:
    # The server takes one request at a time. Were slow bodies handed to the application as soon as their
    # headers arrived, the first would hold that one slot and this read would be a 503.
    head = f"POST {INGEST} HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{{"
    slow = [connect(server) for _ in range(3)]
    try:
        for sock in slow:
            sock.sendall(head.encode())
        time.sleep(0.3)
        with connect(server) as sock:
            sock.sendall(b"GET /internal/conversations HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
            answer, _ = trickle(sock, b"")
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    finally:
        for sock in slow:
            sock.close()


def test_expect_100_continue_is_told_to_continue_at_once(server: LiveServer) -> None:
    body = dumps(intercom_payload("expecting"))
    head = (
        f"POST {INGEST} HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        "expect: 100-continue\r\nconnection: close\r\n\r\n"
    )
    with connect(server) as sock:
        sock.sendall(head.encode())
        assert sock.recv(64).startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(body)
        answer, _ = trickle(sock, b"")
    assert answer.startswith(b"HTTP/1.1 201"), answer[:200]


def test_a_large_body_sent_at_speed_streams_into_the_application(server: LiveServer) -> None:
    parts = [part(f"p{i}", "<p>" + "x" * 1000 + "</p>", at=1_700_000_100 + i) for i in range(300)]
    body = dumps(intercom_payload("large", parts=parts))  # about 400 KB: handed over at 64 KiB, then streamed
    head = (
        f"POST {INGEST} HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    with connect(server) as sock:
        sock.sendall(head.encode() + body)
        answer, _ = trickle(sock, b"")
    assert answer.startswith(b"HTTP/1.1 201"), answer[:200]


@pytest.mark.parametrize("path", ["/health", "/internal/conversations"])
def test_requests_keep_working_on_a_kept_alive_connection(server: LiveServer, path: str) -> None:
    with connect(server) as sock:
        for _ in range(3):
            sock.sendall(f"GET {path} HTTP/1.1\r\nhost: t\r\n\r\n".encode())
            received = b""
            while b"\r\n\r\n" not in received:
                received += sock.recv(65536)
            assert received.startswith(b"HTTP/1.1 200")
            length = int(next(v for k, _, v in _headers(received) if k == "content-length"))
            body = received.partition(b"\r\n\r\n")[2]
            while len(body) < length:
                body += sock.recv(65536)


def _headers(answer: bytes) -> Iterator[tuple[str, str, str]]:
    for line in answer.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")[1:]:
        name, sep, value = line.partition(":")
        yield name.strip().lower(), sep, value.strip()


def test_worker_processes_enforce_the_deadlines_too(tmp_path: Path) -> None:
    # With --workers, uvicorn's workers import the protocol by name and read the limits from KBMS_* variables.
    env = {"KBMS_HEADER_TIMEOUT": "1", "KBMS_MAX_HEADER_BYTES": "8192"}
    running = start_server(migrated_sqlite_url(tmp_path), tmp_path / "server.log", env=env, args=("--workers", "2"))
    try:
        with connect(running) as sock:
            answer, closed = trickle(sock, b"GET /health HTTP/1.1\r\nhost: t\r\nx-pad: " + b"a" * 200)
    finally:
        running.stop()
    assert closed
    assert error_code(answer) == (408, "request_timeout")


def read_answers(sock: socket.socket, count: int) -> list[bytes]:
    """``count`` whole answers (heads and bodies with a content-length) from a kept-alive connection."""
    buffer = b""
    answers: list[bytes] = []
    sock.settimeout(10)
    while len(answers) < count:
        while b"\r\n\r\n" not in buffer:
            buffer += sock.recv(65536)
        head, _, rest = buffer.partition(b"\r\n\r\n")
        length = int(next(v for k, _, v in _headers(head + b"\r\n\r\n") if k == "content-length"))
        while len(rest) < length:
            rest += sock.recv(65536)
        answers.append(head + b"\r\n\r\n" + rest[:length])
        buffer = rest[length:]
    return answers


def test_pipelined_requests_are_answered_in_order(server: LiveServer) -> None:
    body = dumps(intercom_payload("pipelined"))
    requests = (
        b"GET /health HTTP/1.1\r\nhost: t\r\n\r\n"
        + f"POST {INGEST} HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n".encode()
        + f"content-length: {len(body)}\r\n\r\n".encode()
        + body
        + b"GET /internal/conversations HTTP/1.1\r\nhost: t\r\n\r\n"
    )
    with connect(server) as sock:
        sock.sendall(requests)
        answers = read_answers(sock, 3)
    assert [answer.split(b" ", 2)[1] for answer in answers] == [b"200", b"201", b"200"]
    assert b'"external_id":"pipelined"' in answers[2]


def test_a_stray_line_break_after_a_body_does_not_cut_the_connection(server: LiveServer) -> None:
    # Some old clients send CRLF after a POST body; the server skips it (RFC 9112) and the connection lives on.
    body = dumps(intercom_payload("crlf"))
    head = f"POST {INGEST} HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    with connect(server) as sock:
        sock.sendall(head.encode() + body + b"\r\n")
        first = read_answers(sock, 1)[0]
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: t\r\n\r\n")
        second = read_answers(sock, 1)[0]
    assert (first.split(b" ", 2)[1], second.split(b" ", 2)[1]) == (b"201", b"200")
