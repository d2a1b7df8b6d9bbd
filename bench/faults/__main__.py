"""`python -m bench.faults [--quick] [--scenarios a,b] [--scale N]`: exit 1 if an accepted job was
lost or finished twice, 2 if only a target was missed (unless `--targets report`), else 0."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import FrameType

from rich.console import Console

from app.config import Settings
from bench.faults.measure import Figures, figures
from bench.faults.report import table, verdict
from bench.faults.scenarios import BY_NAME, SCENARIOS, Options, run_scenario
from bench.faults.services import generations_per_result
from bench.faults.stack import FaultStack

ROOT = Path(__file__).resolve().parents[2]
# The reduced run keeps the whole suite within minutes: the sweeper looks for lost messages more often
# than its defaults (30 s interval, 120 s before a message counts as lost), or the Redis scenario alone
# would take them.
QUICK_ENV = {"SWEEP_INTERVAL_S": "2", "SWEEP_REQUEUE_AFTER_S": "10"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__)
    p.add_argument(
        "--quick", action="store_true", help="the reduced run (CI): ~50 jobs per scenario, short outages"
    )
    p.add_argument(
        "--scenarios",
        default=",".join(s.name for s in SCENARIOS),
        help="comma-separated, of: " + ", ".join(BY_NAME),
    )
    p.add_argument("--scale", type=int, help="jobs per scenario (400; --quick: 50)")
    p.add_argument("--workers", type=int, default=2, help="worker processes (at least 2)")
    p.add_argument("--triton-down-s", type=float, help="Triton outage (120; --quick: 20)")
    p.add_argument("--postgres-down-s", type=float, help="Postgres outage (30; --quick: 8)")
    p.add_argument(
        "--drain-s",
        type=float,
        help="how long accepted jobs may take to end after the load (300; --quick: 90)",
    )
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for the API and workers (repeatable)",
    )
    p.add_argument(
        "--targets",
        choices=["fail", "report"],
        help="whether a missed target fails the run (exit 2): fail by default, report with --quick",
    )
    p.add_argument(
        "--json-out", type=Path, help="where the figures go (default bench/results/faults-<time>.json)"
    )
    args = p.parse_args(argv)
    unknown = [s for s in args.scenarios.split(",") if s not in BY_NAME]
    if unknown:
        p.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(BY_NAME)}")
    if args.workers < 2:
        p.error("--workers must be at least 2 (a killed worker's jobs need another one)")
    for item in args.env:
        if "=" not in item:
            p.error(f"--env {item!r}: expected NAME=VALUE")
    return args


def options(args: argparse.Namespace) -> Options:
    base = Options.quick(args.scale) if args.quick else Options.full(args.scale)
    changes = {
        "triton_down_s": args.triton_down_s,
        "postgres_down_s": args.postgres_down_s,
        "drain_s": args.drain_s,
    }
    return replace(base, **{k: v for k, v in changes.items() if v is not None})


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # the stack is stopped by the `finally` below


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 180)
    opts = options(args)
    env = dict(QUICK_ENV) if args.quick else {}
    env.update(dict(item.split("=", 1) for item in args.env))
    # The platform runs on its defaults: settings inherited from the caller's environment (a test
    # run's, a developer's shell) would silently change what is measured.
    inherited = sorted(name for name in Settings.model_fields if name in os.environ)
    for name in inherited:
        del os.environ[name]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    stack = FaultStack(ROOT / ".run" / "faults" / stamp, args.workers, extra_env=env)
    signal.signal(signal.SIGTERM, _terminate)
    chosen = [BY_NAME[n] for n in args.scenarios.split(",")]
    console.print(
        f"[bold]fault suite[/] ({'quick' if args.quick else 'full'}): {', '.join(s.name for s in chosen)}; "
        f"{opts.scale} jobs per scenario of {opts.max_tokens} tokens; settings: platform defaults"
        + (f" except {', '.join(f'{k}={v}' for k, v in env.items())}" if env else "")
    )
    if inherited:
        console.print(f"ignored from the environment (pass them with --env): {', '.join(inherited)}")
    started = time.monotonic()
    results: list[Figures] = []
    runs = []
    try:
        stack.start(console.print)
        for scenario in chosen:
            run = asyncio.run(run_scenario(stack, scenario, opts, console.print))
            runs.append(run)
            f = figures(run)
            results.append(f)
            console.print(
                f"  → accepted {f.accepted}, completed {f.completed}, failed {f.failed}, lost {f.lost}, "
                f"finished twice {f.twice}"
            )
        if stack.triton is not None:
            stack.triton.stop()  # no request reaches it after this: its trace is complete
        counts = generations_per_result(stack.trace_dir)
        if counts:
            for run, f in zip(runs, results, strict=True):
                ids = [a.result_id for a in run.record.accepted]
                f.generations = sum(counts[r] for r in ids)
                f.regenerated = sum(1 for r in ids if counts[r] > 1)
    finally:
        stack.stop()
    elapsed = time.monotonic() - started
    console.print()
    console.print(
        table(results, f"fault suite: {elapsed / 60:.1f} min, {args.workers} workers, logs {stack.logs}")
    )
    targets_fail = (args.targets or ("report" if args.quick else "fail")) == "fail"
    status = verdict(console, results, targets_fail=targets_fail)
    out = args.json_out or ROOT / "bench" / "results" / f"faults-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"quick": args.quick, "env": env, "options": opts.__dict__, "elapsed_s": elapsed,
             "scenarios": [f.as_json() for f in results], "exit": status},
            indent=2,
            default=str,
        )
        + "\n"
    )  # fmt: skip
    console.print(f"figures: {out}; exit {status}")
    return status


if __name__ == "__main__":
    sys.exit(main())
