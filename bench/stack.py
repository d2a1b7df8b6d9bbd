"""Start what the benchmark needs: the local Triton (both built-in simulated models), a database
``llmq_bench`` recreated with Alembic, and the worker and API on free ports with a unique queue.
Everything is stopped by :meth:`BenchStack.stop`, also on Ctrl-C or error."""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
from devstack.database import drop_database, recreate_database
from devstack.processes import BIN, ManagedProcess, api_process, child_env, free_port, worker_process

from bench.workload import SIM_MODELS

ROOT = Path(__file__).resolve().parent.parent
if TYPE_CHECKING:
    from localtriton.launcher import LocalTriton

MODELS = ["sim-llm", "sim-llm-slow"]


@contextmanager
def triton_only() -> Iterator[LocalTriton]:
    """Just the local Triton with the benchmark's models (the direct-client experiments)."""
    from localtriton.launcher import LocalTriton

    triton = LocalTriton(models=MODELS, log_file=Path("/dev/null"))
    triton.start()
    try:
        yield triton
    finally:
        triton.stop()


def write_rows(json_out: Path | None, in_flight: int, jobs: int, rows: list[dict[str, float]]) -> None:
    if json_out:
        json_out.write_text(json.dumps({"in_flight": in_flight, "jobs": jobs, "rows": rows}, indent=2) + "\n")


@dataclass
class StackOptions:
    pg_base: str = "postgresql+psycopg://postgres:postgres@127.0.0.1:5432"
    # One database per run (dropped at the end): two benchmark runs at once must not drop each
    # other's database (it happened: a second run's DROP DATABASE ... WITH (FORCE) cut the first one's
    # connections mid-phase).
    db_name: str = field(default_factory=lambda: f"llmq_bench_{os.getpid()}")
    redis_url: str = "redis://127.0.0.1:6379/0"
    worker_in_flight: int = 256
    db_pool_size: int | None = None
    api_workers: int = 1
    worker_processes: int = 1  # Celery worker processes, each with worker_in_flight / this jobs in flight
    worker_loglevel: str = "INFO"
    extra_env: dict[str, str] = field(default_factory=dict)


class BenchStack:
    def __init__(self, options: StackOptions, logs: Path) -> None:
        self.options = options
        self.logs = logs
        self.triton: object | None = None
        self.processes: list[ManagedProcess] = []
        self.api_url = ""
        self.grpc_url = ""
        self.env: dict[str, str] = {}
        self.api_key = ""

    def start(self, log: Callable[[str], object] = print) -> BenchStack:
        from localtriton.launcher import LocalTriton

        o = self.options
        self.logs.mkdir(parents=True, exist_ok=True)
        log(f"database {o.db_name}: recreate + alembic upgrade head")
        db_url = recreate_database(f"{o.pg_base}/{o.db_name}")
        log("starting the local Triton (sim-llm: 0 ms; sim-llm-slow: 20 ms prefill, 15 ms/token) …")
        triton = LocalTriton(models=MODELS, log_file=self.logs / "triton.log")
        self.triton = triton
        triton.start()
        self.grpc_url = triton.grpc_url
        env = {
            "APP_ENV": "development",
            "APP_ENV_FILE": "/dev/null",
            "DATABASE_URL": db_url,
            "REDIS_URL": o.redis_url,
            "CELERY_QUEUE": f"llmq-bench-{uuid.uuid4().hex[:8]}",
            "TRITON_URL": triton.http_url,
            "TRITON_GRPC_URL": triton.grpc_url,
            "TRITON_METRICS_URL": triton.metrics_url,
            "WORKER_IN_FLIGHT": str(o.worker_in_flight),
            "ADMIN_API_KEY": f"llmq_bench-admin-{uuid.uuid4().hex}",
            "CHAT_TEMPLATES_DIRS": str(SIM_MODELS),  # the chat scenario's /v1/chat/completions
        }
        if o.db_pool_size is not None:
            env["DB_POOL_SIZE"] = str(o.db_pool_size)
        env.update(o.extra_env)
        self.env = env
        workers = []
        for k in range(o.worker_processes):
            wenv = dict(env)
            if o.worker_processes > 1:
                wenv["WORKER_IN_FLIGHT"] = str(max(1, o.worker_in_flight // o.worker_processes))
            worker = worker_process(wenv, self.logs / f"worker{'' if k == 0 else k}.log", sweeper=False)
            if o.worker_loglevel != "INFO":
                worker.argv[worker.argv.index("--loglevel") + 1] = o.worker_loglevel
            workers.append(worker)
        port = free_port()
        api = api_process(env, self.logs / "api.log", port=port)
        if o.api_workers > 1:
            api.argv += ["--workers", str(o.api_workers)]
        self.processes = [*(w.start() for w in workers), api.start()]
        self.api_url = f"http://127.0.0.1:{port}"
        for worker in workers:
            if o.worker_loglevel.upper() in ("INFO", "DEBUG"):
                worker.wait_for_log("ready.", 90)
            else:  # "ready." is an INFO line: wait for the banner's queue list, then give it time
                worker.wait_for_log("[queues]", 90)
                time.sleep(5)
        api.wait_for_http(f"{self.api_url}/health", 60)
        # The benchmark's clients use a user key, as tenants do (the key lookup is on every request).
        created = httpx.post(
            f"{self.api_url}/admin/keys",
            json={"tenant": "bench", "name": "bench"},
            headers={"authorization": f"Bearer {env['ADMIN_API_KEY']}"},
        )
        created.raise_for_status()
        self.api_key = created.json()["key"]
        log(
            f"stack up: API {self.api_url}, Triton gRPC {self.grpc_url}, queue {env['CELERY_QUEUE']}, logs {self.logs}"
        )
        return self

    def pids(self) -> dict[str, list[int]]:
        """Process ids per component, for CPU accounting and profiling."""
        out: dict[str, list[int]] = {"bench-client": [os.getpid()]}
        for proc in self.processes:
            if proc.popen is not None:
                out.setdefault(proc.name, []).extend([proc.popen.pid, *descendants(proc.popen.pid)])
        if self.triton is not None and getattr(self.triton, "pid", None):
            pid = self.triton.pid  # type: ignore[attr-defined]
            out["triton"] = [pid, *descendants(pid)]
        return out

    def exited(self) -> list[str]:
        """The processes of the stack that have ended (none should before `stop`), with their status."""
        gone = [
            f"{proc.name} ended (exit status {proc.popen.returncode})"
            for proc in self.processes
            if proc.popen is not None and proc.popen.poll() is not None
        ]
        if self.triton is not None and self.triton.exited():  # type: ignore[attr-defined]
            gone.append(f"tritonserver ended (see {self.logs / 'triton.log'})")
        return gone

    def stop(self) -> None:
        for proc in reversed(self.processes):
            try:
                proc.stop(timeout_s=10)
            except Exception as exc:  # keep stopping the rest
                print(f"stopping {proc.name}: {exc}", file=sys.stderr)
        self.processes.clear()
        if self.triton is not None:
            self.triton.stop()  # type: ignore[attr-defined]
            self.triton = None
        try:
            drop_database(f"{self.options.pg_base}/{self.options.db_name}")
        except Exception as exc:  # best effort: a leftover database is harmless
            print(f"dropping database {self.options.db_name}: {exc}", file=sys.stderr)


def descendants(pid: int) -> list[int]:
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    found: list[int] = []
    frontier = [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        found += kids
        frontier += kids
    return found


def pids_by_comm(name: str) -> list[int]:
    pids = []
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() == name:
                pids.append(int(comm.parent.name))
        except OSError:
            continue
    return pids


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime
        except (OSError, IndexError, ValueError):
            continue
    return total


class CpuMeter:
    """CPU seconds spent by each component between start() and stop()."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = dict(groups)
        # Postgres and Redis are shared system services: all their processes are counted
        # (other databases' backends too, if something else uses the server meanwhile).
        self.groups["postgres"] = pids_by_comm("postgres")
        self.groups["redis"] = pids_by_comm("redis-server")
        self._start: dict[str, float] = {}
        self._t0 = 0.0
        self.others: dict[str, float] = {}

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._start_per_pid = {k: {p: cpu_seconds([p]) for p in v} for k, v in self.groups.items()}
        self._all0 = all_processes()
        self._idle0 = _idle_seconds()
        self._stat0 = _stat_seconds()

    def _current(self, name: str) -> list[int]:
        # Backends forked during the phase (pool overflow connections) count too.
        if name == "postgres":
            return pids_by_comm("postgres")
        if name == "redis":
            return pids_by_comm("redis-server")
        pids = self.groups[name]
        if name == "bench-client":
            # This process only (its threads are in /proc/<pid>/stat). Its descendants are the stack
            # (Triton, worker, API: counted in their own rows) and py-spy: they must not be counted here.
            return pids
        return sorted({*pids, *(d for p in pids[:1] for d in descendants(p))})

    def stop(self) -> dict[str, float]:
        if not self._t0:  # never started (no measured job began): nothing measured
            self.start()
        wall = time.monotonic() - self._t0
        used = {}
        ours: set[int] = set()
        for name in self.groups:
            base = self._start_per_pid.get(name, {})
            current = self._current(name)
            ours.update(current)
            used[name] = sum(cpu_seconds([p]) - base.get(p, 0.0) for p in current)
        used["_wall_s"] = wall
        used["_machine_idle_s"] = _idle_seconds() - self._idle0
        stat1 = _stat_seconds()
        for key in ("irq", "softirq", "steal"):
            used[f"_machine_{key}_s"] = stat1[key] - self._stat0[key]
        # Who else used the CPU (processes alive at the end, outside the groups), by command name.
        others: dict[str, float] = {}
        for pid, (comm, cpu) in all_processes().items():
            if pid in ours:
                continue
            delta = cpu - self._all0.get(pid, (comm, 0.0))[1]
            if delta > 0:
                others[comm] = others.get(comm, 0.0) + delta
        self.others = dict(sorted(others.items(), key=lambda kv: -kv[1])[:8])
        return used


def all_processes() -> dict[int, tuple[str, float]]:
    """pid -> (comm, CPU seconds) of every process on the machine."""
    out: dict[int, tuple[str, float]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            raw = stat.read_text()
            fields = raw.rsplit(")", 1)[1].split()
            comm = raw[raw.index("(") + 1 : raw.rindex(")")]
            out[int(stat.parent.name)] = (comm, (int(fields[11]) + int(fields[12])) / _TICK)
        except (OSError, IndexError, ValueError):
            continue
    return out


def _stat_seconds() -> dict[str, float]:
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    return {n: int(v) / _TICK for n, v in zip(names, fields, strict=False)}


def _idle_seconds() -> float:
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    return (int(fields[3]) + int(fields[4])) / _TICK


BENCH_BIN = BIN
__all__ = ["BENCH_BIN", "BenchStack", "CpuMeter", "StackOptions", "child_env"]
