"""One Redis pub/sub subscription kept alive for a process's lifetime (the API's completion notices
and token pieces, the worker's cancel notices)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import redis.asyncio as aioredis

from app import background

log = logging.getLogger(__name__)


async def subscribe_forever(
    redis_url: str,
    channel: str,
    what: str,
    subscribed: asyncio.Event,
    on_message: Callable[[bytes], None],
    on_lost: Callable[[], None],
) -> None:
    """Hand each message of `channel` to `on_message` until cancelled. A lost connection is
    reopened a second later, after `on_lost` (messages may have been missed meanwhile);
    `subscribed` is set while the subscription stands."""
    failing = False
    while True:
        # RESP2: under RESP3 redis-py hands every pub/sub message to its push handler, which
        # formats the message into a debug string whether or not debug is logged.
        client = aioredis.from_url(redis_url, protocol=2)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(channel)
            subscribed.set()
            if failing:
                log.info("%s: subscribed again", what)
                failing = False
            async for message in pubsub.listen():
                if message.get("type") == "message":
                    on_message(message["data"])
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if background.cancelling():  # a cancel the client library turned into an error
                raise asyncio.CancelledError from None
            # One line when it is lost, none for each second of an outage: no traceback per retry.
            if not failing:
                log.warning(
                    "%s: subscription lost (%s: %s); retrying every second", what, type(exc).__name__, exc
                )
                failing = True
            subscribed.clear()
            on_lost()
            await asyncio.sleep(1)
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
                await client.aclose()
