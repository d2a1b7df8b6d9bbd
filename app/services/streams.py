"""Following a job's token stream: its text as it is generated, then its final row."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from app.auth import Principal
from app.db import Database
from app.models import ResultStatus
from app.notify import ResultWaiter
from app.schemas import ResultOut
from app.services import results
from app.streams import Entries, Piece, TokenStreamReader

# A blocked read gives up after this long to look at the row itself (a notice may have been lost).
_READ_BLOCK_MS = 5000
# Once the row is final, how long the last pieces and the worker's end marker may take to arrive.
_TAIL_WAIT_S = 2.0


@dataclass(frozen=True)
class Final:
    seq: int
    result: ResultOut


async def _read_or_finish(
    streams: TokenStreamReader, result_id: uuid.UUID, after: int, finished: asyncio.Future[bytes | None]
) -> Entries | None:
    """The next entries, or None if the job's completion notice comes first."""
    read = asyncio.ensure_future(streams.read(result_id, after, block_ms=_READ_BLOCK_MS))
    waits: set[asyncio.Future[object]] = {read, finished}  # type: ignore[arg-type]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    if read.done():
        return read.result()
    read.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await read
    return None


async def follow(
    db: Database,
    waiter: ResultWaiter,
    streams: TokenStreamReader,
    principal: Principal,
    result_id: uuid.UUID,
    after: int,
) -> AsyncIterator[Piece | Final]:
    """The pieces after event `after`, live while the job runs, then its final row. A job that was
    not streamed (or whose stream expired) gives its whole text as one piece when it ends."""
    seq = after
    async with waiter.watch(result_id) as finished:  # before reading the row: no notice is missed
        result = await results.read(db, principal, result_id)
        ended = False
        while result.status == ResultStatus.PENDING and not finished.done():
            entries = await _read_or_finish(streams, result_id, seq, finished)
            if entries is None:
                break
            for piece in entries.pieces:
                yield piece
                seq = piece.seq
            if entries.done:
                ended = True
                break
            if not entries.pieces:  # a quiet spell: the notice may have been lost, look at the row
                result = await results.read(db, principal, result_id)
    if not ended and await streams.exists(result_id):
        # The job ended (possibly cancelled by someone else): its last pieces may be on their way.
        give_up = time.monotonic() + _TAIL_WAIT_S
        while time.monotonic() < give_up:
            entries = await streams.read(result_id, seq, block_ms=int(_TAIL_WAIT_S * 1000 / 4))
            for piece in entries.pieces:
                yield piece
                seq = piece.seq
            if entries.done:
                break
        ended = True
    final = await results.read(db, principal, result_id)
    if not ended and after == 0 and final.output:  # never streamed (or its stream expired)
        yield Piece(1, final.output)
        seq = 1
    yield Final(seq + 1, final)
