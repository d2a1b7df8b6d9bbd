"""The scenarios: each runs a steady submit load and injects its fault at fixed points of it, then
waits for the accepted jobs to end (the drain) and reads the outcome from the database."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from bench.faults.load import LoadRecord, lean, make_contexts, probe, submit_load
from bench.faults.malformed import catalogue, malformed_load
from bench.faults.stack import DB_NAME, MODEL, FaultStack
from bench.httpclient import LeanClient


@dataclass(frozen=True)
class Options:
    scale: int  # jobs submitted per scenario
    max_tokens: int  # every job generates exactly this many tokens (ignore_eos)
    lead_s: float  # load before the first fault
    gap_s: float  # between two faults of one scenario
    post_s: float  # load after the last fault
    triton_down_s: float
    postgres_down_s: float
    redis_down_s: float
    drain_s: float  # after the load: how long accepted jobs may take to end before they count as lost

    @staticmethod
    def full(scale: int | None = None) -> Options:
        return Options(scale or 400, 200, 10, 15, 15, 120, 30, 3, 300)

    @staticmethod
    def quick(scale: int | None = None) -> Options:
        return Options(scale or 50, 100, 4, 5, 5, 20, 8, 2, 90)


@dataclass
class Event:
    name: str
    start: float  # epoch seconds
    end: float  # the service is back (== start for a kill)


@dataclass
class Run:
    name: str
    title: str
    tenant: str
    record: LoadRecord = field(default_factory=LoadRecord)
    probes: LoadRecord = field(default_factory=LoadRecord)  # extra requests: probes, malformed ones
    events: list[Event] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    drain_timed_out: bool = False
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)  # result id -> final row
    terminal_writes: dict[str, int] = field(default_factory=dict)  # result id -> terminal writes (>1 only)
    window: tuple[float, float] | None = None  # requests started in it must be answered within 1 s
    sweepers: tuple[int, int] | None = None  # advisory locks held / waited for after the scenario


@dataclass
class Ctx:
    stack: FaultStack
    opts: Options
    run: Run
    user: LeanClient
    user_key: str
    admin: LeanClient
    contexts: list[str]
    t0: float
    duration_s: float

    async def at(self, offset_s: float) -> None:
        delay = self.t0 + offset_s - time.time()
        if delay > 0:
            await asyncio.sleep(delay)

    async def blocking(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)


Inject = Callable[[Ctx], Awaitable[None]]


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    planned_s: Callable[[Options], float]
    inject: Inject


# ---------------------------------------------------------------- the faults


async def worker_kill(ctx: Ctx) -> None:
    for k in range(3):
        await ctx.at(ctx.opts.lead_s + k * ctx.opts.gap_s)
        t = time.time()
        killed, left = await ctx.blocking(ctx.stack.kill9_worker)
        ctx.run.events.append(Event(f"kill -9 {killed.name}", t, t))
        if left:
            ctx.run.notes.append(
                f"{killed.name} left {len(left)} process(es) behind after kill -9: {'; '.join(left)}"
            )
        new = ctx.stack.start_worker()
        await ctx.blocking(new.proc.wait_for_log, "ready.", 120)


async def redis_flush_kill(ctx: Ctx) -> None:
    redis = ctx.stack.redis
    assert redis is not None
    await ctx.at(ctx.opts.lead_s)
    t = time.time()
    await ctx.blocking(redis.flushall)
    ctx.run.events.append(Event("Redis FLUSHALL", t, t))
    await ctx.at(ctx.opts.lead_s + ctx.opts.gap_s)
    t = time.time()
    await ctx.blocking(redis.kill9)
    await asyncio.sleep(ctx.opts.redis_down_s)
    await ctx.blocking(redis.start)
    ctx.run.events.append(Event("Redis kill -9, restarted empty", t, time.time()))


async def triton_down(ctx: Ctx) -> None:
    triton = ctx.stack.triton
    assert triton is not None
    await ctx.at(ctx.opts.lead_s)
    t = time.time()
    await ctx.blocking(triton.stop)
    await ctx.at(ctx.opts.lead_s + ctx.opts.triton_down_s)
    await ctx.blocking(triton.start)
    ctx.run.events.append(Event(f"tritonserver down {time.time() - t:.0f} s", t, time.time()))


async def postgres_down(ctx: Ctx) -> None:
    pg = ctx.stack.pg
    assert pg is not None
    await ctx.at(max(0.0, ctx.opts.lead_s - 2))
    result_id = ctx.run.record.accepted[0].result_id if ctx.run.record.accepted else str(uuid.uuid4())
    back_plus = 5.0  # requests just after the restart count too: the API must recover by itself
    until = ctx.t0 + ctx.opts.lead_s + ctx.opts.postgres_down_s + back_plus
    prober = asyncio.create_task(
        probe(
            ctx.user, ctx.admin, ctx.run.probes, context_id=ctx.contexts[0], result_id=result_id, model=MODEL,
            until=until,
        )
    )  # fmt: skip
    await ctx.at(ctx.opts.lead_s)
    t = time.time()
    await ctx.blocking(pg.stop_immediate)
    await ctx.at(ctx.opts.lead_s + ctx.opts.postgres_down_s)
    await ctx.blocking(pg.start)
    back = time.time()
    ctx.run.events.append(Event(f"Postgres down {back - t:.0f} s (pg_ctl stop -m immediate)", t, back))
    ctx.run.window = (t, back + back_plus)
    await prober


async def api_kill(ctx: Ctx) -> None:
    await ctx.at(ctx.opts.lead_s)
    t = time.time()
    await ctx.blocking(ctx.stack.kill9_api)
    await ctx.blocking(ctx.stack.start_api)
    ctx.run.events.append(Event("API kill -9, restarted", t, time.time()))


async def malformed(ctx: Ctx) -> None:
    items = catalogue(f"127.0.0.1:{ctx.stack.api_port}", ctx.user_key, MODEL, ctx.contexts[0])
    await malformed_load(
        "127.0.0.1", ctx.stack.api_port, items, ctx.run.probes, until=ctx.t0 + ctx.duration_s, every_s=0.1
    )


async def rolling_restart(ctx: Ctx) -> None:
    for k in range(2):
        await ctx.at(ctx.opts.lead_s + k * ctx.opts.gap_s)
        old = ctx.stack.workers.pop(0)
        t = time.time()
        stopping = asyncio.create_task(ctx.blocking(old.proc.stop, 120.0))
        new = ctx.stack.start_worker()
        await ctx.blocking(new.proc.wait_for_log, "ready.", 120)
        await stopping
        ctx.run.events.append(Event(f"SIGTERM {old.name}, {new.name} started", t, t))


SCENARIOS = [
    Scenario("worker-kill", "worker kill -9 x3", lambda o: o.lead_s + 2 * o.gap_s + o.post_s, worker_kill),
    Scenario(
        "redis",
        "Redis FLUSHALL, then kill -9",
        lambda o: o.lead_s + o.gap_s + o.redis_down_s + o.post_s,
        redis_flush_kill,
    ),
    Scenario("triton", "Triton down", lambda o: o.lead_s + o.triton_down_s + o.post_s, triton_down),
    Scenario("postgres", "Postgres down", lambda o: o.lead_s + o.postgres_down_s + o.post_s, postgres_down),
    Scenario("api-kill", "API kill -9", lambda o: o.lead_s + o.post_s, api_kill),
    Scenario("malformed", "malformed requests", lambda o: o.lead_s + o.post_s, malformed),
    Scenario("rolling", "rolling restart x2", lambda o: o.lead_s + 2 * o.gap_s + o.post_s, rolling_restart),
]
BY_NAME = {s.name: s for s in SCENARIOS}


# ---------------------------------------------------------------- one scenario, end to end


async def run_scenario(
    stack: FaultStack, scenario: Scenario, opts: Options, say: Callable[[str], object]
) -> Run:
    tenant = f"faults-{scenario.name}-{uuid.uuid4().hex[:6]}"
    run = Run(scenario.name, scenario.title, tenant)
    key = await asyncio.to_thread(stack.new_key, tenant)
    async with lean(stack.api_url, key) as user, lean(stack.api_url, stack.admin_key) as admin:
        contexts = await make_contexts(user, 8)
        duration = scenario.planned_s(opts)
        rate = opts.scale / duration
        say(f"[bold]{scenario.title}[/]: {opts.scale} jobs over {duration:.0f} s ({rate:.1f}/s)")
        ctx = Ctx(stack, opts, run, user, key, admin, contexts, time.time(), duration)
        params = {"max_tokens": opts.max_tokens, "ignore_eos": True, "temperature": 0.0}
        load = asyncio.create_task(
            submit_load(
                user,
                run.record,
                model=MODEL,
                contexts=contexts,
                jobs=opts.scale,
                rate_per_s=rate,
                params=params,
            )
        )
        try:
            await scenario.inject(ctx)
        finally:
            await load
    for event in run.events:
        say(f"  {event.name} at +{event.start - ctx.t0:.1f} s")
    await asyncio.to_thread(drain, stack, run, opts.drain_s, say)
    await asyncio.to_thread(repair, stack, run, say)
    await asyncio.to_thread(read_outcome, stack, run)
    return run


def drain(stack: FaultStack, run: Run, drain_s: float, say: Callable[[str], object]) -> None:
    """Wait until every accepted job is terminal, or the drain time is over."""
    assert stack.pg is not None
    ids = [a.result_id for a in run.record.accepted]
    deadline = time.monotonic() + drain_s
    pending = len(ids)
    while time.monotonic() < deadline:
        try:
            with stack.pg.connect(DB_NAME) as conn:
                row = conn.execute(
                    "SELECT count(*) FROM result WHERE id = ANY(%s::uuid[]) AND status = 'pending'", (ids,)
                ).fetchone()
            pending = int(row[0]) if row else len(ids)
        except Exception as exc:  # Postgres restarting: try again
            say(f"  drain: {type(exc).__name__}")
        if pending == 0:
            return
        time.sleep(1.0)
    run.drain_timed_out = True
    say(f"  [red]{pending} accepted jobs still pending after a drain of {drain_s:.0f} s[/]")


def repair(stack: FaultStack, run: Run, say: Callable[[str], object]) -> None:
    """Leave a working stack to the next scenario, and say what had to be done for it."""
    t = time.monotonic()
    while time.monotonic() - t < 30 and not stack.api_alive():
        time.sleep(0.5)
    if not stack.api_alive():
        run.notes.append("the API did not answer /health 30 s after the scenario: restarted")
        if stack.api is not None:
            stack.api.stop(timeout_s=5)
        stack.start_api()
    for dead in stack.dead_workers():
        run.notes.append(
            f"{dead.name} had exited (code {dead.proc.popen.returncode if dead.proc.popen else '?'}): replaced"
        )
        stack.workers.remove(dead)
        dead.proc.stop()
        stack.start_worker()
    stack.wait_workers_ready()
    if run.notes:
        for note in run.notes:
            say(f"  note: {note}")


def read_outcome(stack: FaultStack, run: Run) -> None:
    assert stack.pg is not None
    with stack.pg.connect(DB_NAME) as conn:
        cur = conn.execute(
            """SELECT id::text, status, extract(epoch FROM created_at)::float8, extract(epoch FROM finished_at)::float8,
                      completion_tokens, attempts, error
                 FROM result WHERE tenant = %s""",
            (run.tenant,),
        )
        for rid, status, created, finished, tokens, attempts, error in cur.fetchall():
            run.rows[rid] = {
                "status": status, "created": created, "finished": finished, "completion_tokens": tokens,
                "attempts": attempts, "error": error,
            }  # fmt: skip
        cur = conn.execute(
            "SELECT result_id::text, count(*) FROM fault_audit WHERE tenant = %s GROUP BY 1 HAVING count(*) > 1",
            (run.tenant,),
        )
        run.terminal_writes = {rid: int(n) for rid, n in cur.fetchall()}
        # The sweeper is one worker holding an advisory lock while the others wait for it.
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE granted), count(*) FILTER (WHERE NOT granted)"
            " FROM pg_locks WHERE locktype = 'advisory'"
        ).fetchone()
        run.sweepers = (int(row[0]), int(row[1])) if row else None
