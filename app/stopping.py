"""This API process is being stopped (SIGTERM, SIGINT): the requests that wait are answered now.

The server waits for the requests in progress before it stops, and cuts them past its graceful
timeout (uvicorn then answers a 500 in plain text, or ends a stream mid-body). Long polls, streams and
the calls that wait for their jobs could wait minutes: told at the signal, they answer at once with
what they have (a long poll the row as it is, a stream an `error` event to resume from elsewhere).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def on_stop_signal(callback: Callable[[], None]) -> Callable[[], None]:
    """Call `callback` on the running loop when the process gets SIGTERM or SIGINT, before the
    handler installed already (the server's, which starts its shutdown); returns the undo. Only a
    handler in place is chained: with none (not under a server that stops on signals), nothing is."""
    loop = asyncio.get_running_loop()
    installed: dict[int, Any] = {}
    if threading.current_thread() is not threading.main_thread():  # signals go to the main thread
        return lambda: None
    for sig in _SIGNALS:
        previous = signal.getsignal(sig)
        if not callable(previous):
            continue

        def handler(signum: int, frame: FrameType | None, previous: Callable[..., Any] = previous) -> None:
            loop.call_soon_threadsafe(callback)
            previous(signum, frame)

        signal.signal(sig, handler)
        installed[sig] = (handler, previous)

    def undo() -> None:
        for sig, (handler, previous) in installed.items():
            if signal.getsignal(sig) is handler:  # not replaced since
                signal.signal(sig, previous)

    return undo
