"""The suite's own Postgres cluster, Redis and Triton: never the shared ones, so that stopping,
flushing and killing them harms nobody else on the machine."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg
import redis
from devstack.processes import ManagedProcess, child_env, free_port
from localtriton.launcher import LocalTriton

PG_BIN = Path("/usr/local/bin")


def _pg_tool(name: str) -> str:
    found = PG_BIN / name
    if found.exists():
        return str(found)
    which = shutil.which(name)
    if which is not None:
        return which
    # Debian/Ubuntu keep the server binaries off PATH, one folder per major version.
    versions = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: int(p.parts[-3]))
    if not versions:
        raise RuntimeError(
            f"{name} not found (in {PG_BIN}, on PATH, /usr/lib/postgresql): install PostgreSQL's server"
        )
    return str(versions[-1])


class OwnPostgres:
    """A throw-away cluster (initdb) on a free port, trust auth, stopped and removed at the end."""

    def __init__(self, logs: Path) -> None:
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="llmq-faults-pg-"))
        self.data = self.root / "data"
        self.log_path = logs / "postgres.log"
        # initdb refuses to run as root: run the cluster as the postgres user then.
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self._as, *argv], capture_output=True, text=True, check=check)

    def init(self) -> OwnPostgres:
        if self._as:
            shutil.chown(self.root, "postgres")
            self.log_path.touch()
            shutil.chown(self.log_path, "postgres")
        self._run(
            _pg_tool("initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
            "--locale=C", "--no-sync",
        )  # fmt: skip
        return self

    def start(self) -> None:
        # fsync off: the suite stops the server with `-m immediate`, never the machine; commits stay
        # synchronous so that an acknowledged write survives the stop.
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.root} "
            "-c fsync=off -c full_page_writes=off -c max_connections=200"
        )
        self._run(
            _pg_tool("pg_ctl"), "-D", str(self.data), "-l", str(self.log_path), "-o", options, "-w", "start"
        )

    def stop_immediate(self) -> None:
        """What a crash looks like to clients: every connection cut, no shutdown checkpoint."""
        self._run(_pg_tool("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop", check=False)

    def destroy(self) -> None:
        if self.data.exists():
            self._run(_pg_tool("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(self.root, ignore_errors=True)

    def connect(self, database: str) -> psycopg.Connection[tuple[Any, ...]]:
        return psycopg.connect(
            f"postgresql://postgres@127.0.0.1:{self.port}/{database}", autocommit=True, connect_timeout=5
        )


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
