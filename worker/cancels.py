"""Cancel notices: the API publishes a cancelled job's id; the worker process running it aborts it.

Every worker process subscribes (one thread) and hands each id to its runtime, which aborts the job
if it runs there and remembers the id for a while, so a job claimed just after its cancel never starts.
"""

from __future__ import annotations

import logging
import threading
import time

import redis

from app.config import Settings
from app.notify import cancel_channel
from worker.runtime import InferenceRuntime

log = logging.getLogger(__name__)


class CancelListener:
    def __init__(self, settings: Settings, runtime: InferenceRuntime) -> None:
        self._url = settings.REDIS_URL
        self._channel = cancel_channel(settings)
        self._runtime = runtime
        self._thread = threading.Thread(target=self._listen, name="cancel-listener", daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while True:
            try:
                client = redis.Redis.from_url(self._url, socket_connect_timeout=2, health_check_interval=30)
                pubsub = client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
                pubsub.subscribe(self._channel)
                for message in pubsub.listen():
                    if message.get("type") == "message":
                        self._runtime.cancel(message["data"].decode())
            except Exception:  # Redis gone: cancels are missed meanwhile (those jobs run to their end)
                log.warning("cancel notices: subscription lost, reconnecting", exc_info=True)
                time.sleep(1)


_listener: CancelListener | None = None
_listener_lock = threading.Lock()


def get_listener(settings: Settings, runtime: InferenceRuntime) -> CancelListener:
    global _listener
    if _listener is not None:  # every job asks: no lock once it exists
        return _listener
    with _listener_lock:
        if _listener is None:
            _listener = CancelListener(settings, runtime)
        return _listener


def reset_listener() -> None:
    """After a fork the listener's thread does not exist in the child."""
    global _listener
    _listener = None
