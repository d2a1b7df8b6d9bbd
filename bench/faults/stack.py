"""The suite's stack: its own Postgres cluster and Redis, the local Triton (simulated slow model),
N workers and the API, all started through the same helpers as `make dev` and the tests
(`devstack.processes`), with an audit trigger on `result` that records every terminal write."""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from devstack.database import recreate_database
from devstack.own_postgres import OwnPostgres
from devstack.processes import ManagedProcess, api_process, free_port, worker_process

from bench.faults.services import OwnRedis, TracedTriton

MODEL = "sim-llm-slow"  # 20 ms prefill, 15 ms per token: jobs are in flight when a fault hits
DB_NAME = "llmq_faults"

# Every UPDATE that sets a terminal status, and every UPDATE that changes the outcome of a row that
# was already terminal: a result written terminal more than once shows as two rows or more.
AUDIT_SQL = """
CREATE TABLE fault_audit (
    seq bigserial PRIMARY KEY,
    result_id uuid NOT NULL,
    tenant text NOT NULL,
    old_status text NOT NULL,
    new_status text NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE FUNCTION fault_audit_result() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO fault_audit (result_id, tenant, old_status, new_status)
    VALUES (NEW.id, NEW.tenant, OLD.status, NEW.status);
    RETURN NEW;
END $$;
CREATE TRIGGER fault_audit AFTER UPDATE ON result FOR EACH ROW
WHEN ((OLD.status = 'pending' AND NEW.status <> 'pending')
      OR (OLD.status <> 'pending'
          AND (OLD.status, OLD.output, OLD.error, OLD.finish_reason, OLD.completion_tokens, OLD.finished_at)
              IS DISTINCT FROM
              (NEW.status, NEW.output, NEW.error, NEW.finish_reason, NEW.completion_tokens, NEW.finished_at)))
EXECUTE FUNCTION fault_audit_result();
"""


def _pgid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[2])
    except (OSError, IndexError, ValueError):
        return None


def group_members(pgid: int) -> list[int]:
    """Live processes of a process group (what a killed worker left behind)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        pid = int(stat.parent.name)
        if _pgid(pid) == pgid:
            try:
                if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    found.append(pid)
            except (OSError, IndexError):
                continue
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


@dataclass
class Worker:
    name: str
    proc: ManagedProcess


@dataclass
class FaultStack:
    logs: Path
    workers_wanted: int
    extra_env: dict[str, str] = field(default_factory=dict)
    pg: OwnPostgres | None = None
    redis: OwnRedis | None = None
    triton: TracedTriton | None = None
    env: dict[str, str] = field(default_factory=dict)
    workers: list[Worker] = field(default_factory=list)
    api: ManagedProcess | None = None
    api_port: int = 0
    admin_key: str = field(default_factory=lambda: f"llmq_faults-admin-{uuid.uuid4().hex}")
    _started: int = 0

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def trace_dir(self) -> Path:
        return self.logs / "trace"

    def start(self, say: Callable[[str], object] = print) -> FaultStack:
        self.logs.mkdir(parents=True, exist_ok=True)
        say("own Postgres cluster (initdb, pg_ctl) …")
        self.pg = OwnPostgres(self.logs / "postgres.log").init()
        self.pg.start()
        db_url = recreate_database(self.pg.url(DB_NAME))
        with self.pg.connect(DB_NAME) as conn:
            conn.execute(AUDIT_SQL)
        say(f"  port {self.pg.port}, database {DB_NAME} migrated, audit trigger on result")
        self.redis = OwnRedis(self.logs)
        self.redis.start()
        say(f"own redis-server on port {self.redis.port} (no persistence)")
        say(f"local Triton with {MODEL} (request tracing on) …")
        self.triton = TracedTriton(self.trace_dir, models=[MODEL], log_file=self.logs / "triton.log")
        self.triton.start()
        self.api_port = free_port()
        self.env = {
            "APP_ENV": "test",
            "APP_ENV_FILE": "/dev/null",  # the platform's defaults, not a developer's .env.api.dev
            "DATABASE_URL": db_url,
            "REDIS_URL": self.redis.url,
            "CELERY_QUEUE": f"llmq-faults-{uuid.uuid4().hex[:8]}",
            "TRITON_URL": self.triton.http_url,
            "TRITON_GRPC_URL": self.triton.grpc_url,
            "TRITON_METRICS_URL": self.triton.metrics_url,
            "ADMIN_API_KEY": self.admin_key,
            **self.extra_env,
        }
        for _ in range(self.workers_wanted):
            self.start_worker()
        self.wait_workers_ready()
        self.start_api()
        say(f"{len(self.workers)} workers, API {self.api_url}; logs {self.logs}")
        return self

    # ------------------------------------------------------------ workers

    def start_worker(self) -> Worker:
        self._started += 1
        name = f"worker-{self._started}"
        # Every worker runs the sweeper loop; one sweeps at a time (an advisory lock).
        proc = worker_process(self.env, self.logs / f"{name}.log").start()
        worker = Worker(name, proc)
        self.workers.append(worker)
        return worker

    def wait_workers_ready(self, timeout_s: float = 120.0) -> None:
        for w in self.workers:
            w.proc.wait_for_log("ready.", timeout_s)

    def kill9_worker(self) -> tuple[Worker, list[str]]:
        """kill -9 of the oldest worker's main process, as the OOM killer does; returns it and what
        it left behind (its children still alive a second later), which are then ended."""
        worker = self.workers.pop(0)
        assert worker.proc.popen is not None
        pid = worker.proc.popen.pid
        os.kill(pid, signal.SIGKILL)
        worker.proc.popen.wait(10)
        time.sleep(1.0)
        left = [f"{p}: {cmdline(p)[:80]}" for p in group_members(pid)]
        worker.proc.stop(timeout_s=5)  # ends the rest of its group and closes the log
        return worker, left

    def dead_workers(self) -> list[Worker]:
        return [w for w in self.workers if not w.proc.running]

    # ------------------------------------------------------------ API

    def start_api(self) -> None:
        self.api = api_process(
            self.env, self.logs / f"api-{int(time.time())}.log", port=self.api_port
        ).start()
        self.api.wait_for_http(f"{self.api_url}/health", 60)

    def kill9_api(self) -> None:
        assert self.api is not None and self.api.popen is not None
        os.kill(self.api.popen.pid, signal.SIGKILL)
        self.api.popen.wait(10)
        self.api.stop(timeout_s=5)

    def api_alive(self, timeout_s: float = 5.0) -> bool:
        try:
            return httpx.get(f"{self.api_url}/health", timeout=timeout_s).status_code == 200
        except httpx.HTTPError:
            return False

    def new_key(self, tenant: str) -> str:
        reply = httpx.post(
            f"{self.api_url}/admin/keys",
            json={"tenant": tenant, "name": "fault suite"},
            headers={"authorization": f"Bearer {self.admin_key}"},
            timeout=30,
        )
        if reply.status_code != 201:
            raise RuntimeError(f"POST /admin/keys answered {reply.status_code}: {reply.text[:300]}")
        return str(reply.json()["key"])

    # ------------------------------------------------------------ teardown

    def stop(self) -> None:
        for proc in [*(w.proc for w in self.workers), *([self.api] if self.api else [])]:
            with contextlib.suppress(Exception):
                proc.stop(timeout_s=10)
        self.workers.clear()
        if self.triton is not None:
            with contextlib.suppress(Exception):
                self.triton.stop()  # also writes the last trace files
        if self.redis is not None:
            self.redis.stop()
        if self.pg is not None:
            self.pg.destroy()
