"""`python -m bench.compare bench/results/*.json`: one line per run and scenario, to compare runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _ms(d: dict[str, float | None] | None, key: str) -> float:
    return (d or {}).get(key) or 0.0


def _steady_ratio(direct: dict[str, Any], platform: dict[str, Any]) -> float:
    """Ratio of the jobs/s while all N clients were busy (0 when not recorded, before round 5)."""
    d, p = direct.get("steady_jobs_per_s"), platform.get("steady_jobs_per_s")
    return p / d if d and p else 0.0


def main(paths: list[str]) -> None:
    head = (
        f"{'file':38} {'client':6} {'poll':9} {'scen':7} {'N':>4} {'wif':>4} {'ramp s':>6} {'direct/s':>9} {'plat/s':>7} {'ratio':>6} {'ss ratio':>8} "
        f"{'sub p50':>8} {'sub p99':>8} {'poll p50':>8} {'poll p99':>8} {'polls/j':>7} {'api ms':>6} {'wrk ms':>6} "
        f"{'pg ms':>6} {'cli ms':>6} {'oth ms':>6} {'busy%':>5}"
    )
    print(head)
    for path in paths:
        data = json.loads(Path(path).read_text())
        if "scenarios" not in data:  # e.g. bench.jitter's output
            continue
        cfg = data["config"]
        client = cfg.get("client", "httpx")
        mode = cfg.get("poll_mode") or "interval"
        poll = "long" if mode == "long" else f"{cfg.get('poll_interval_ms') or 50:g}ms"
        for name, s in data["scenarios"].items():
            d, p = s["direct"], s["platform"]
            cpu = p.get("cpu_ms_per_job", {})
            plain = p.get("plain_poll_latency_ms") or p.get("poll_latency_ms")
            print(
                f"{Path(path).name[:38]:38} {client:6} {poll:9} {name:7} {cfg.get('in_flight', 0):4} "
                f"{cfg.get('worker_in_flight') or 0:4} {d.get('ramp_s', 0):6.2f} {d['jobs_per_s']:9.1f} {p['jobs_per_s']:7.1f} "
                f"{s['ratio'] or 0:6.3f} {_steady_ratio(d, p):8.3f} {_ms(p['submit_latency_ms'], 'p50'):8.1f} {_ms(p['submit_latency_ms'], 'p99'):8.1f} "
                f"{_ms(plain, 'p50'):8.1f} {_ms(plain, 'p99'):8.1f} {p.get('polls_per_job') or 0:7.2f} "
                f"{cpu.get('api', 0):6.2f} {cpu.get('worker', 0):6.2f} {cpu.get('postgres', 0):6.2f} "
                f"{cpu.get('bench-client', 0):6.2f} {p.get('other_cpu_ms_per_job') or 0:6.2f} "
                f"{p.get('machine_busy_pct') or 0:5.0f}"
            )


if __name__ == "__main__":
    main(sys.argv[1:])
