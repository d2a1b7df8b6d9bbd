"""The table printed at the end, and the JSON written next to it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.stats import RunResult, summary_ms

CPU_COMPONENTS = ("api", "worker", "triton", "postgres", "redis", "bench-client")


def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _start(ramp_s: float) -> str:
    return f"spread over {ramp_s:.2f} s" if ramp_s > 0 else "all at once"


def scenario_rows(direct: RunResult, platform: RunResult) -> list[tuple[str, str, str]]:
    d_job = summary_ms(direct.job_latency_s)
    p_job = summary_ms(platform.job_latency_s)
    sub = summary_ms(platform.submit_latency_s)
    warm_sub = summary_ms(platform.warmup_submit_latency_s)
    plain = summary_ms(platform.plain_poll_latency_s)
    polls = summary_ms(platform.poll_latency_s)
    lag = summary_ms(platform.answer_lag_s)
    ratio = platform.jobs_per_s / direct.jobs_per_s if direct.jobs_per_s else None
    long_poll = platform.poll_mode == "long"
    rows = [
        (
            "jobs completed (failed/errors)",
            f"{direct.jobs_completed} ({direct.jobs_failed}/{direct.errors})",
            f"{platform.jobs_completed} ({platform.jobs_failed}/{platform.errors})",
        ),
        ("start of the N clients", _start(direct.ramp_s), _start(platform.ramp_s)),
        ("wall time s", _f(direct.wall_s, 2), _f(platform.wall_s, 2)),
        ("jobs/s", _f(direct.jobs_per_s), _f(platform.jobs_per_s)),
        (
            "jobs/s while all N were busy (no ramp, no tail)",
            _f(direct.steady_jobs_per_s),
            _f(platform.steady_jobs_per_s),
        ),
        ("tokens/s", _f(direct.tokens_per_s, 0), _f(platform.tokens_per_s, 0)),
        ("[bold]ratio platform/direct[/]", "", f"[bold]{_f(ratio, 3)}[/]"),
        (
            "job latency p50 / p99 ms (platform: submit → terminal answer)",
            f"{_f(d_job['p50'])} / {_f(d_job['p99'])}",
            f"{_f(p_job['p50'])} / {_f(p_job['p99'])}",
        ),
        ("submit POST p50 / p95 / p99 ms", "", f"{_f(sub['p50'])} / {_f(sub['p95'])} / {_f(sub['p99'])}"),
        (
            "warm-up submit p50 / p99 ms (the N clients' first jobs)",
            "",
            f"{_f(warm_sub['p50'])} / {_f(warm_sub['p99'])} (n={warm_sub['n']})",
        ),
        (
            f"poll GET (no wait) p50 / p99 ms{' [probes]' if long_poll else ''}",
            "",
            f"{_f(plain['p50'])} / {_f(plain['p99'])} (n={plain['n']})",
        ),
    ]
    if long_poll:
        rows.append(
            (
                "long-poll GET ?wait p50 / p99 ms (incl. waiting)",
                "",
                f"{_f(polls['p50'])} / {_f(polls['p99'])}",
            )
        )
    rows += [
        ("finished_at → client answer p50 / p99 ms", "", f"{_f(lag['p50'])} / {_f(lag['p99'])}"),
        (
            "polls per job",
            "",
            _f(platform.polls / platform.jobs_completed if platform.jobs_completed else None, 2),
        ),
    ]
    for mode_name, run in (("direct", direct), ("platform", platform)):
        if run.wrong_length or run.timed_out:
            rows.append(
                (f"[red]{mode_name}: wrong length / timed out[/]", str(run.wrong_length), str(run.timed_out))
            )
    if direct.stream_pieces or platform.stream_pieces:
        rows += stream_rows(direct, platform)
    cpu_d = _cpu_per_job(direct)
    cpu_p = _cpu_per_job(platform)
    for comp in CPU_COMPONENTS:
        if comp in cpu_d or comp in cpu_p:
            rows.append((f"CPU ms/job: {comp}", _f(cpu_d.get(comp), 2), _f(cpu_p.get(comp), 2)))
    rows.append(("CPU ms/job: other processes", _f(_other(direct), 2), _f(_other(platform), 2)))
    rows.append(("CPU busy (of 2 cores) %", _f(_busy(direct), 0), _f(_busy(platform), 0)))
    return rows


def stream_rows(direct: RunResult, platform: RunResult) -> list[tuple[str, str, str]]:
    """The streaming probes (bench.streaming): direct is Triton's own streaming, platform is SSE."""
    ttft = [summary_ms(r.stream_ttft_s) for r in (direct, platform)]
    gap = [summary_ms(r.stream_gap_s) for r in (direct, platform)]
    cancel = [summary_ms(r.cancel_s) for r in (direct, platform)]
    answer = summary_ms(platform.cancel_answer_s)
    per_piece = [r.stream_tokens / r.stream_pieces if r.stream_pieces else None for r in (direct, platform)]
    rows = [
        (
            "stream: time to first token p50 / p99 ms",
            [f"{_f(t['p50'])} / {_f(t['p99'])} (n={t['n']})" for t in ttft],
        ),
        ("stream: between pieces p50 / p99 ms", [f"{_f(g['p50'])} / {_f(g['p99'])}" for g in gap]),
        ("stream: tokens per piece", [_f(v, 2) for v in per_piece]),
        (
            "cancel → engine abort p50 / p99 ms",
            [f"{_f(c['p50'])} / {_f(c['p99'])} (n={c['n']})" for c in cancel],
        ),
        (
            "cancel request answered p50 / p99 ms (with the partial text)",
            ["", f"{_f(answer['p50'])} / {_f(answer['p99'])}" if answer["n"] else ""],
        ),
    ]
    return [(name, d, p) for name, (d, p) in rows]


def _cpu_per_job(run: RunResult) -> dict[str, float]:
    done = run.jobs_completed or 1
    return {k: v * 1000 / done for k, v in run.cpu_s.items() if not k.startswith("_")}


def _other(run: RunResult) -> float | None:
    """CPU used on the machine by processes outside the stack (e.g. other test runs, py-spy)."""
    wall = run.cpu_s.get("_wall_s")
    idle = run.cpu_s.get("_machine_idle_s")
    if not wall or idle is None:
        return None
    import os

    busy = wall * (os.cpu_count() or 1) - idle
    ours = sum(v for k, v in run.cpu_s.items() if not k.startswith("_"))
    return max(busy - ours, 0.0) * 1000 / (run.jobs_completed or 1)


def _busy(run: RunResult) -> float | None:
    wall = run.cpu_s.get("_wall_s")
    idle = run.cpu_s.get("_machine_idle_s")
    if not wall or idle is None:
        return None
    import os

    cores = os.cpu_count() or 1
    return 100 * (1 - idle / (wall * cores))


def describe_client(config: dict[str, Any]) -> str:
    """Which load generator and poll mode the platform phase used."""
    if config.get("poll_mode") == "interval":
        poll = f"interval polling every {config['poll_interval_ms']:g} ms"
    else:
        poll = f"long poll GET /results/{{id}}?wait={config.get('long_poll_wait_s', 30):g}"
        if config.get("probe_every"):
            poll += f" (+1 plain GET probe every {config['probe_every']} jobs)"
    return f"client {config.get('client', 'httpx')}, {poll}"


def print_report(console: Console, config: dict[str, Any], pairs: list[tuple[RunResult, RunResult]]) -> None:
    for direct, platform in pairs:
        table = Table(
            title=f"scenario [bold]{direct.scenario}[/] — model {direct.model}, N = {direct.in_flight} in flight, "
            f"{config['max_tokens']} tokens/job; {describe_client(config)}",
            title_justify="left",
        )
        table.add_column("")
        table.add_column("direct (Triton)", justify="right")
        table.add_column("platform (HTTP API)", justify="right")
        for row in scenario_rows(direct, platform):
            table.add_row(*row)
        console.print(table)
    summary = Table(title=f"summary — {describe_client(config)}", title_justify="left")
    for col in (
        "scenario",
        "direct jobs/s",
        "platform jobs/s",
        "ratio",
        "submit p50 / p99 ms",
        "poll (no wait) p50 / p99 ms",
        "polls/job",
    ):
        summary.add_column(col, justify="right")
    for direct, platform in pairs:
        ratio = platform.jobs_per_s / direct.jobs_per_s if direct.jobs_per_s else None
        summary.add_row(
            direct.scenario,
            _f(direct.jobs_per_s),
            _f(platform.jobs_per_s),
            _f(ratio, 3),
            f"{_f(summary_ms(platform.submit_latency_s)['p50'])} / {_f(summary_ms(platform.submit_latency_s)['p99'])}",
            f"{_f(summary_ms(platform.plain_poll_latency_s)['p50'])} / {_f(summary_ms(platform.plain_poll_latency_s)['p99'])}",
            _f(platform.polls / platform.jobs_completed if platform.jobs_completed else None, 2),
        )
    console.print(summary)


def write_json(path: Path, config: dict[str, Any], pairs: list[tuple[RunResult, RunResult]]) -> None:
    scenarios = {}
    for direct, platform in pairs:
        ratio = platform.jobs_per_s / direct.jobs_per_s if direct.jobs_per_s else None
        d_json, p_json = direct.to_json(), platform.to_json()
        for run, out in ((direct, d_json), (platform, p_json)):
            other, busy = _other(run), _busy(run)
            out["other_cpu_ms_per_job"] = None if other is None else round(other, 3)
            out["machine_busy_pct"] = None if busy is None else round(busy, 1)
        scenarios[direct.scenario] = {
            "ratio": None if ratio is None else round(ratio, 4),
            "direct": d_json,
            "platform": p_json,
        }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"config": config, "scenarios": scenarios}, indent=2) + "\n")
