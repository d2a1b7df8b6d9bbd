"""Following a job's token stream: its text as it is generated, then its final row."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from app import background
from app.auth import Principal
from app.db import Database
from app.errors import STOPPING, ServiceUnavailable
from app.models import ResultStatus
from app.notify import PENDING, ResultWaiter
from app.schemas import ResultOut
from app.services import results
from app.streams import Entries, Piece, Restart, TokenStreamReader

# A quiet spell after which a follower reads the stream and the row itself (a message may be lost);
# it is also how often a client waiting for text hears that the stream is alive.
QUIET_S = 5.0
# Once the row is final, how long the last pieces and the worker's end marker may take to arrive.
_TAIL_WAIT_S = 2.0


@dataclass(frozen=True)
class Final:
    seq: int
    result: ResultOut


@dataclass(frozen=True)
class Quiet:
    """Nothing came for `QUIET_S`: the client is owed a keep-alive."""


QUIET = Quiet()


async def _read(db: Database, principal: Principal, result_id: uuid.UUID) -> ResultOut:
    """The row, read to the end even if the stream is cancelled meanwhile (its client left): a query
    cancelled midway costs the pool its connection, and a warning in the log."""
    return await asyncio.shield(background.detached(results.read(db, principal, result_id)))


class _Position:
    """What the client holds: the last event id sent, and whether it holds text a restart voids."""

    def __init__(self, after: int) -> None:
        self.seq = after
        self.holds_text = after > 0

    def take(self, entries: Entries) -> list[Piece | Restart]:
        """The items of `entries` the client lacks, in order; a restart only to one that holds text."""
        items: list[Piece | Restart] = []
        if entries.restart_seq is not None and entries.restart_seq > self.seq:
            if self.holds_text:
                items.append(Restart(entries.restart_seq))
            self.seq, self.holds_text = entries.restart_seq, False
        for piece in entries.pieces:
            if piece.seq > self.seq:
                items.append(piece)
                self.seq, self.holds_text = piece.seq, True
        return items


async def follow(
    db: Database,
    waiter: ResultWaiter,
    streams: TokenStreamReader,
    principal: Principal,
    result_id: uuid.UUID,
    after: int,
) -> AsyncGenerator[Piece | Restart | Quiet | Final]:
    """The pieces after event `after`, live while the job runs, then its final row. A job that was
    not streamed (or whose stream expired) gives its whole text as one piece when it ends. `QUIET`
    after each spell of `QUIET_S` without news; `Restart` when the job runs again from the start
    after the client got some of an earlier run's text (a client starting later never sees that text)."""
    at = _Position(after)
    # Both watches before reading anything: no notice and no piece is missed.
    async with waiter.watch(result_id) as finished, streams.follow(result_id) as live:
        finished.add_done_callback(lambda _: live.wake())
        known = waiter.known(result_id, principal.tenant_filter)
        # Created by this process and not ended: no need to read the row to know it is pending.
        pending = known == PENDING or (
            not known and (await _read(db, principal, result_id)).status == ResultStatus.PENDING
        )
        done_seq: int | None = None  # the end marker's event id, once seen
        caught_up = False
        while pending and not finished.done() and done_seq is None:
            if not caught_up:  # what the stream holds already, or what a lost message carried
                entries = await streams.read(result_id, at.seq, block_ms=None)
                for item in at.take(entries):
                    yield item
                done_seq, caught_up = entries.done_seq, True
                continue
            await live.wait(QUIET_S)
            taken = live.take()
            if not taken:
                if not finished.done():  # a quiet spell: the worker may be gone, look at the row
                    result = await _read(db, principal, result_id)
                    pending, caught_up = result.status == ResultStatus.PENDING, False
                    yield QUIET
                continue
            for piece_seq, text in taken:
                if piece_seq > at.seq + 1:  # a gap (a lost message, a restart): the stream has it
                    entries = await streams.read(result_id, at.seq, block_ms=None)
                    for item in at.take(entries):
                        yield item
                    if entries.done_seq is not None:
                        done_seq = entries.done_seq
                        break
                if text is None:
                    done_seq = piece_seq
                    break
                if piece_seq <= at.seq:
                    continue  # sent already (read from the stream)
                yield Piece(piece_seq, text)
                at.seq, at.holds_text = piece_seq, True
    if waiter.stopping and done_seq is None and pending:
        raise ServiceUnavailable(f"{STOPPING}; Last-Event-ID resumes where this stream ends")
    streamed = False
    if done_seq is None:
        last = await streams.last(result_id)
        if last is not None and last.done_seq is not None and last.done_seq <= at.seq:
            done_seq = last.done_seq  # a resume from the end marker or past it: nothing follows
        elif last is not None:
            # The job ended (possibly cancelled by someone else): its last pieces may be on their way.
            # From the last piece, or from where the client is if that is before it (a resume past it).
            read_from = min(at.seq, last.pieces[-1].seq) if last.pieces else at.seq
            give_up = time.monotonic() + _TAIL_WAIT_S
            while time.monotonic() < give_up and done_seq is None:
                entries = await streams.read(result_id, read_from, block_ms=int(_TAIL_WAIT_S * 1000 / 4))
                for item in at.take(entries):
                    yield item
                read_from = max([read_from, entries.restart_seq or 0, *(p.seq for p in entries.pieces)])
                done_seq = entries.done_seq
        streamed = last is not None
    final = await _read(db, principal, result_id)
    if done_seq is None and not streamed and after == 0 and final.output:
        yield Piece(1, final.output)  # never streamed (or its stream expired)
        at.seq = 1
    yield Final(done_seq if done_seq is not None else at.seq + 1, final)
