"""`make bench` / `python -m bench`: the local Triton driven directly (the ceiling) vs the same jobs
through the platform's HTTP API, side by side, for a vLLM-like latency model and a zero-latency one."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import platform as host_platform
import signal
import subprocess
import time
from collections.abc import Coroutine
from pathlib import Path
from types import FrameType
from typing import Any

import typer
from rich.console import Console

from bench.chat import choose_chat_jobs, run_chat_platform
from bench.direct import run_direct
from bench.platform import CLIENTS, create_contexts, make_client, run_platform
from bench.report import print_report, write_json
from bench.stack import BENCH_BIN, BenchStack, CpuMeter, StackOptions
from bench.stats import RunResult
from bench.streaming import StreamProbes, chat_probes, direct_probes, platform_probes
from bench.workload import Phase, Polling, Warmup, choose_jobs, nominal_job_s

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = {
    # name: (model, description)
    "latency": ("sim-llm-slow", "vLLM-like: 20 ms prefill, 15 ms per token"),
    "zero": ("sim-llm", "zero latency: pure overhead"),
    "chat": ("sim-llm-slow", "vLLM-like latency, through POST /v1/chat/completions (non-streamed)"),
}

cli = typer.Typer(add_completion=False, help=__doc__)
console = Console(highlight=False)


class Profiler:
    """py-spy record (raw collapsed stacks) on the API and worker during one platform phase."""

    def __init__(self, out_dir: Path, pids: dict[str, list[int]], tag: str, gil_only: bool = False) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        py_spy = BENCH_BIN / "py-spy"
        if not py_spy.exists():
            console.print("[yellow]py-spy is not installed in the venv: no profile[/]")
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in ("api", "worker"):
            if name not in pids:
                continue
            out = out_dir / f"{tag}-{name}.txt"
            # --subprocesses: uvicorn --workers N, or a worker pool made of processes.
            argv = [
                str(py_spy),
                "record",
                "-p",
                str(pids[name][0]),
                "-r",
                "200",
                "-f",
                "raw",
                "-o",
                str(out),
                "--nonblocking",
                "--subprocesses",
            ]
            if gil_only:  # only the thread holding the GIL: Python on CPU, no waiting threads
                argv.append("--gil")
            self.procs.append(
                subprocess.Popen(
                    argv, stdout=subprocess.DEVNULL, stderr=(out_dir / f"{tag}-{name}.log").open("wb")
                )
            )
        console.print(f"profiling api+worker with py-spy into {out_dir}")

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


# After the load, how long the probes may take to end their jobs (one is ~1 s; a cancel's check 5 s).
PROBES_GRACE_S = 30.0


class Probing:
    """Streaming probes (bench.streaming) running beside one phase's load; none when k = 0."""

    def __init__(self, k: int, grace_s: float = PROBES_GRACE_S) -> None:
        self.k = k
        self.grace_s = grace_s
        self.stop = asyncio.Event()
        self._task: asyncio.Task[StreamProbes] | None = None

    def start(self, probes: Coroutine[Any, Any, StreamProbes]) -> None:
        if self.k > 0:
            self._task = asyncio.ensure_future(probes)
        else:
            probes.close()

    async def finish(self, run: RunResult) -> None:
        if self._task is None:
            return
        self.stop.set()
        await asyncio.wait({self._task}, timeout=self.grace_s)
        if not self._task.done():  # a probe follows a job that never ends (Triton died, say)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            run.stream_errors = [
                f"the stream probes were still running {self.grace_s:g} s after the load: stopped"
            ]
            console.print(f"  [red]{run.mode} stream probes:[/] {run.stream_errors[0]}; no figures")
            return
        probes = self._task.result()
        run.stream_ttft_s, run.stream_gap_s, run.cancel_s = probes.ttft_s, probes.gaps_s, probes.cancel_s
        run.cancel_answer_s = probes.cancel_answer_s
        run.stream_pieces, run.stream_tokens, run.stream_errors = probes.pieces, probes.tokens, probes.errors
        for error in probes.errors:
            console.print(f"  [red]{run.mode} stream probe error:[/] {error}")


async def run_scenario(
    name: str,
    stack_grpc: str,
    api_url: str,
    pids: dict[str, list[int]],
    *,
    jobs_total: int,
    in_flight: int,
    max_tokens: int,
    poll_mode: str,
    poll_interval_s: float,
    long_poll_wait_s: float,
    probe_every: int,
    time_limit_s: float,
    warmup_jobs: int,
    ramp_s: float | None,
    profile_dir: Path | None,
    client_kind: str,
    api_key: str | None,
    profile_gil: bool = False,
    stream_probes: int = 0,
    probe_think_s: float = 0.0,
    metrics_url: str | None = None,
) -> tuple[RunResult, RunResult]:
    model, description = SCENARIOS[name]
    count = max(in_flight, 256)
    jobs = choose_chat_jobs(model, count, max_tokens) if name == "chat" else choose_jobs(count, max_tokens)
    console.rule(f"scenario {name}: {description} (model {model})")

    # Spread starts, as independent clients would: started all at once, the direct client's jobs stay in
    # lockstep (no tail) while the platform's keep bunched waves, which measures the start, not the platform.
    ramp = nominal_job_s(model, max_tokens) if ramp_s is None else ramp_s
    phase = Phase(name, model, jobs, in_flight, max_tokens, time_limit_s, ramp, probe_think_s)
    polling = Polling(poll_mode, poll_interval_s, long_poll_wait_s, probe_every)

    meter = CpuMeter(pids)
    console.print(f"direct: {warmup_jobs} warm-up + {jobs_total} jobs, {in_flight} in flight …")
    probing = Probing(stream_probes)
    probing.start(direct_probes(stack_grpc, phase, stream_probes, probing.stop, metrics_url))
    d = await run_direct(stack_grpc, phase, jobs_total, warmup=Warmup(warmup_jobs, meter.start))
    await probing.finish(d)
    d.cpu_s = meter.stop()
    d.other_cpu_by_comm_s = {k: round(v, 2) for k, v in meter.others.items()}
    console.print(f"  direct: {d.jobs_completed} jobs in {d.wall_s:.2f} s = {d.jobs_per_s:.1f} jobs/s")

    async with make_client(api_url, in_flight, client_kind, api_key) as client:
        context_ids = await create_contexts(client)

        meter = CpuMeter(pids)
        profiler: Profiler | None = None
        connects0 = retries0 = 0

        def measure() -> None:
            nonlocal profiler, connects0, retries0
            if profile_dir is not None:
                profiler = Profiler(profile_dir, pids, name, profile_gil)
            connects0, retries0 = getattr(client, "connects", 0), getattr(client, "retries", 0)
            meter.start()

        how = (
            f"long poll ?wait={long_poll_wait_s:g}"
            if poll_mode == "long"
            else f"poll every {poll_interval_s * 1000:.0f} ms"
        )
        console.print(
            f"platform: {warmup_jobs} warm-up + {jobs_total} jobs, {in_flight} virtual clients, "
            f"client {client_kind}, {how} …"
        )
        probing = Probing(stream_probes)
        probing.start(
            chat_probes(api_url, api_key, phase, stream_probes, probing.stop)
            if name == "chat"
            else platform_probes(
                api_url, api_key, context_ids, phase, stream_probes, probing.stop, metrics_url
            )
        )
        try:
            if name == "chat":  # one call per job: created, run and answered
                p = await run_chat_platform(client, phase, jobs_total, Warmup(warmup_jobs, measure))
            else:
                p = await run_platform(
                    client, context_ids, phase, jobs_total, polling, Warmup(warmup_jobs, measure)
                )
            await probing.finish(p)
        finally:
            p_cpu = meter.stop()
            if profiler is not None:
                profiler.stop()
        p.cpu_s = p_cpu
        p.other_cpu_by_comm_s = {k: round(v, 2) for k, v in meter.others.items()}
        if client_kind == "lean":
            p.client_stats = {
                "connections_opened": client.connects - connects0,  # type: ignore[union-attr]
                "stale_keepalive_retries": client.retries - retries0,  # type: ignore[union-attr]
            }
    console.print(f"  platform: {p.jobs_completed} jobs in {p.wall_s:.2f} s = {p.jobs_per_s:.1f} jobs/s")
    for run in (d, p):
        for sample in run.error_samples:
            console.print(f"  [red]{run.mode} error:[/] {sample}")
    return d, p


@cli.command()
def main(
    jobs: int = typer.Option(2000, help="Measured jobs per mode and scenario."),
    in_flight: int = typer.Option(256, help="N: requests in flight (direct) = virtual clients (platform)."),
    scenarios: str = typer.Option("latency,zero", help="Comma-separated: latency, zero, chat."),
    poll_mode: str = typer.Option(
        "long",
        help="long: GET /results/{id}?wait=<--long-poll-wait-s> until terminal; interval: GET every --poll-interval-ms.",
    ),
    poll_interval_ms: float = typer.Option(50, help="--poll-mode interval: GET /results/{id} this often."),
    long_poll_wait_s: float = typer.Option(30, help="--poll-mode long: the ?wait= of each GET (0-60)."),
    probe_every: int | None = typer.Option(
        None,
        help="Every K-th job also does a plain GET /results/{id} after it finished, to measure poll latency under load (default: 10 in long-poll mode, 0 in interval mode, where every poll is plain).",
    ),
    max_tokens: int = typer.Option(64, help="Tokens per job (prompts/seeds chosen to produce exactly this)."),
    worker_in_flight: int | None = typer.Option(None, help="WORKER_IN_FLIGHT of the worker (default: N)."),
    db_pool_size: int | None = typer.Option(
        None, help="DB_POOL_SIZE of API and worker (default: the app's)."
    ),
    api_workers: int = typer.Option(1, help="uvicorn --workers for the API."),
    worker_processes: int = typer.Option(
        1, help="Celery worker processes (each with WORKER_IN_FLIGHT / this jobs in flight)."
    ),
    worker_loglevel: str = typer.Option("INFO", help="Celery worker --loglevel."),
    api_url: str | None = typer.Option(
        None, help="Use a running stack's API (its key in LLMQ_API_KEY) instead of starting one."
    ),
    triton_grpc_url: str = typer.Option(
        "127.0.0.1:8001", help="With --api-url: that stack's Triton gRPC address."
    ),
    time_limit_s: float = typer.Option(
        60, help="Time limit of each measured phase (jobs/s counts the jobs done by then)."
    ),
    warmup_jobs: int | None = typer.Option(None, help="Unmeasured jobs before each phase (default: N)."),
    ramp_s: float | None = typer.Option(
        None,
        min=0,
        help="The N virtual clients start spread over this many seconds (client k at k x ramp / N), "
        "in both modes. Default: one job's nominal duration on the scenario's model (prefill + "
        "(tokens - 1) x decode: 0.97 s for latency, 0 for zero). 0: all at once (rounds 1-4).",
    ),
    quick: bool = typer.Option(False, help="Smoke run: 300 jobs, N = 64."),
    profile: bool = typer.Option(False, help="py-spy record the API and worker during each platform phase."),
    profile_gil: bool = typer.Option(
        False, help="With --profile: py-spy --gil (only the thread holding the GIL)."
    ),
    json_out: Path | None = typer.Option(
        None, help="Where to write the JSON (default bench/results/<timestamp>.json)."
    ),
    label: str = typer.Option("", help="Free text stored in the JSON (what this run tries)."),
    stream_probes: int = typer.Option(
        8,
        min=0,
        help="latency and chat scenarios: K streaming clients (time to first token, between pieces) "
        "beside the load, in both modes (chat: streamed /v1/chat/completions), and in latency one "
        "cancelling client; 0: none.",
    ),
    probe_think_s: float = typer.Option(
        0.0,
        min=0,
        help="Each streaming client pauses a random time, uniform in [0, this], before each job, in "
        "both modes (default 0: back to back, in step with the load's waves).",
    ),
    sim_cancel_check_ms: float | None = typer.Option(
        None,
        help="How often the simulated engine asks each running sequence whether it was cancelled "
        "(default 50 ms, in the steps' idle time: an IPC round trip each); bounds the cancel → abort "
        "figures from below.",
    ),
    triton_metrics_url: str | None = typer.Option(
        None, help="With --api-url: that stack's Triton metrics URL (for the cancel probe)."
    ),
    client: str = typer.Option(
        "lean",
        help="Load-generator HTTP client: lean (bench/httpclient.py, asyncio streams) or httpx (the first round's, ~5 ms CPU per request).",
    ),
) -> None:
    if client not in CLIENTS:
        raise typer.BadParameter(f"unknown client {client!r}; known: {CLIENTS}")
    if poll_mode not in ("long", "interval"):
        raise typer.BadParameter("--poll-mode must be long or interval")
    if probe_every is None:
        probe_every = 10 if poll_mode == "long" else 0
    if quick:
        jobs, in_flight = min(jobs, 300), min(in_flight, 64)
    names = [s.strip() for s in scenarios.split(",") if s.strip()]
    unknown = [s for s in names if s not in SCENARIOS]
    if unknown:
        raise typer.BadParameter(f"unknown scenario(s) {unknown}; known: {sorted(SCENARIOS)}")
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    json_path = json_out or ROOT / "bench" / "results" / f"{stamp}.json"
    run_dir = ROOT / ".run" / "bench" / stamp
    options = StackOptions(
        # The streaming probes' jobs come on top of the N clients': room for them too.
        worker_in_flight=worker_in_flight
        or in_flight + (stream_probes + 1 if {"latency", "chat"} & set(names) else 0),
        db_pool_size=db_pool_size,
        api_workers=api_workers,
        worker_processes=worker_processes,
        worker_loglevel=worker_loglevel,
    )
    config = {
        "label": label,
        "started": dt.datetime.now().isoformat(timespec="seconds"),
        "host": host_platform.node(),
        "cpus": os.cpu_count(),
        "loadavg_at_start": os.getloadavg(),
        "jobs": jobs,
        "in_flight": in_flight,
        "max_tokens": max_tokens,
        "ramp_s": "nominal job duration" if ramp_s is None else ramp_s,
        "poll_mode": poll_mode,
        "poll_interval_ms": poll_interval_ms if poll_mode == "interval" else None,
        "long_poll_wait_s": long_poll_wait_s if poll_mode == "long" else None,
        "probe_every": probe_every,
        "worker_in_flight": options.worker_in_flight if api_url is None else None,
        "db_pool_size": db_pool_size,
        "api_workers": api_workers,
        "worker_processes": worker_processes,
        "worker_loglevel": worker_loglevel,
        "api_url": api_url,
        "quick": quick,
        "client": client,
        "profile": ("py-spy --gil" if profile_gil else "py-spy") if profile else None,
        "stream_probes": stream_probes,
        "probe_think_s": probe_think_s,
    }

    def on_term(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    if sim_cancel_check_ms is not None:  # inherited by tritonserver and its backend stubs
        os.environ["LOCALTRITON_CANCEL_CHECK_S"] = str(sim_cancel_check_ms / 1000)
    config["sim_cancel_check_ms"] = sim_cancel_check_ms or 50
    signal.signal(signal.SIGTERM, on_term)
    stack: BenchStack | None = None
    pairs: list[tuple[RunResult, RunResult]] = []
    started = time.monotonic()
    try:
        if api_url is None:
            stack = BenchStack(options, run_dir / "logs")  # assigned first: a failed start is stopped too
            stack.start(log=console.print)
            url, grpc, pids = stack.api_url, stack.grpc_url, stack.pids()
            key: str | None = stack.api_key
            metrics: str | None = stack.triton.metrics_url  # type: ignore[attr-defined]
        else:
            url, grpc, pids = api_url.rstrip("/"), triton_grpc_url, {"bench-client": [os.getpid()]}
            key = os.environ.get("LLMQ_API_KEY")
            metrics = triton_metrics_url
        for name in names:
            pairs.append(
                asyncio.run(
                    run_scenario(
                        name,
                        grpc,
                        url,
                        pids,
                        jobs_total=jobs,
                        in_flight=in_flight,
                        max_tokens=max_tokens,
                        poll_mode=poll_mode,
                        poll_interval_s=poll_interval_ms / 1000,
                        long_poll_wait_s=long_poll_wait_s,
                        probe_every=probe_every,
                        time_limit_s=time_limit_s,
                        warmup_jobs=warmup_jobs if warmup_jobs is not None else in_flight,
                        ramp_s=ramp_s,
                        profile_dir=run_dir / "profile" if profile else None,
                        client_kind=client,
                        api_key=key,
                        profile_gil=profile_gil,
                        stream_probes=stream_probes if name in ("latency", "chat") else 0,
                        probe_think_s=probe_think_s,
                        metrics_url=metrics if name == "latency" else None,  # cancels: latency only
                    )
                )
            )
            gone = stack.exited() if stack is not None else []
            if gone:  # what was measured after that is not the platform's
                config["stack_failed"] = f"during scenario {name}: {'; '.join(gone)}"
                console.print(f"[red]{config['stack_failed']}: figures of that scenario are not valid[/]")
                break
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
    finally:
        if stack is not None:
            console.print("stopping the stack …")
            stack.stop()
    if not pairs:
        raise typer.Exit(1)
    config["duration_s"] = round(time.monotonic() - started, 1)
    print_report(console, config, pairs)
    write_json(json_path, config, pairs)
    console.print(f"JSON: {json_path}")
    if profile:
        console.print(f"profiles: {run_dir / 'profile'}")
    if "stack_failed" in config:
        raise typer.Exit(1)


if __name__ == "__main__":
    cli()
