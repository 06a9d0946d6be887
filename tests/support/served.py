"""An ASGI app served over real HTTP on a free local port, in a thread: a fake provider, for what must reach it by
URL (``kbms sync`` run as a command, the sync service inside ``kbms serve``), or kbms itself for a browser."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any, Literal

import uvicorn


@contextlib.contextmanager
def served(app: Any, *, lifespan: Literal["on", "off"] = "off") -> Iterator[str]:
    """``app`` at ``http://127.0.0.1:<port>`` while the block runs; its base URL.

    ``lifespan="on"`` runs the app's startup and shutdown in the server's thread: kbms's app opens its store there
    (a store belongs to the event loop that first writes through it) and runs its sync service.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan=lifespan)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the app did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
