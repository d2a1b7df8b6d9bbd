"""The suite's own Redis and Triton (its Postgres cluster: devstack.own_postgres): never the shared
ones, so that stopping, flushing and killing them harms nobody else on the machine."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from collections import Counter
from pathlib import Path

import redis
from devstack.processes import ManagedProcess, child_env, free_port
from localtriton.launcher import LocalTriton


class OwnRedis:
    """redis-server on a free port without persistence: a restart starts empty, as after a crash."""

    def __init__(self, logs: Path) -> None:
        self.port = free_port()
        self.logs = logs
        self.proc: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        argv = [
            shutil.which("redis-server") or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--daemonize", "no",
        ]  # fmt: skip
        self.proc = ManagedProcess("redis", argv, child_env({}), self.logs / "redis.log").start()
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(redis.RedisError):
                if self.client().ping():
                    return
            if time.monotonic() > deadline or not self.proc.running:
                raise RuntimeError(f"redis-server did not start:\n{self.proc.log_tail()}")
            time.sleep(0.1)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5, socket_connect_timeout=2)

    def flushall(self) -> None:
        self.client().flushall()

    def kill9(self) -> None:
        assert self.proc is not None and self.proc.popen is not None
        os.kill(self.proc.popen.pid, 9)
        self.proc.popen.wait(10)
        self.proc.stop()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(timeout_s=5)


_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class TracedTriton(LocalTriton):
    """The local Triton with request tracing on: every inference request it receives is written
    with its request id (the worker's is `<result id>-<attempt>`), so generations are counted per
    result from the server's own record. Each start writes trace files of its own."""

    def __init__(self, trace_dir: Path, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.trace_dir = trace_dir
        self.starts = 0

    def command(self, backend_dir: Path) -> list[str]:
        self.starts += 1
        self.trace_dir.mkdir(parents=True, exist_ok=True)
        trace = self.trace_dir / f"trace-{self.starts}.json"
        return [
            *super().command(backend_dir),
            "--trace-config", f"triton,file={trace}",
            "--trace-config", "triton,log-frequency=1",  # one file per request: none lost at exit
            "--trace-config", "level=TIMESTAMPS",
            "--trace-config", "rate=1",
            "--trace-config", "count=-1",
        ]  # fmt: skip


def generations_per_result(trace_dir: Path) -> Counter[str]:
    """result id -> inference requests Triton received for it (every trace file of every start)."""
    counts: Counter[str] = Counter()
    for path in sorted(trace_dir.glob("trace-*.json*")):
        try:
            entries = json.loads(path.read_text() or "[]")
        except (OSError, ValueError):
            continue  # a file cut by a crash: its requests are not counted
        for entry in entries:
            match = _UUID.match(str(entry.get("request_id", ""))) if isinstance(entry, dict) else None
            if match:
                counts[match.group(0)] += 1
    return counts
