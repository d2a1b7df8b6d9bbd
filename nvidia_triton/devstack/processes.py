"""Start and stop the platform's processes (API, worker) as children: used by `make dev`, the
end-to-end tests and the benchmark, so all three run the stack the same way."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class ManagedProcess:
    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = field(default=None, repr=False)

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        # Own process group: stopping it reaches every child the process may have started.
        self.popen = subprocess.Popen(
            self.argv, env=self.env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        return self

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_for_log(self, marker: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if marker in self.log_path.read_text(errors="replace"):
                return
            if not self.running:
                raise RuntimeError(f"{self.name} exited early:\n{self.log_tail()}")
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} did not log {marker!r} within {timeout_s}s:\n{self.log_tail()}")

    def wait_for_http(self, url: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"{self.name} exited early:\n{self.log_tail()}")
            try:
                if httpx.get(url, timeout=1.0).status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} did not answer {url} within {timeout_s}s:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.popen is None:
            return
        if self.popen.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.popen.wait(timeout=5)
        # Anything the process left behind in its group goes too.
        self._signal_group(signal.SIGKILL)
        if self._log is not None:
            self._log.close()
            self._log = None

    def _signal_group(self, sig: signal.Signals) -> None:
        assert self.popen is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)


def child_env(overrides: Mapping[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.update(overrides)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def worker_process(env: Mapping[str, str], log_path: Path, *, sweeper: bool = True) -> ManagedProcess:
    """A Celery worker process. Every worker runs the sweeper loop (one of them sweeps at a time: a
    Postgres advisory lock); `sweeper=False` leaves it out (a worker sharing a database with others
    of another queue, whose rows it must not send to its own)."""
    argv = [str(BIN / "celery"), "-A", "worker.celery_app", "worker", "--loglevel", "INFO"]
    if "CELERY_QUEUE" in env:
        argv += ["-Q", env["CELERY_QUEUE"]]
    # Unique node name: several workers (tests, dev) may share one machine and one Redis.
    argv += ["-n", f"llmq-{os.getpid()}-{free_port()}@%h"]
    worker_env = child_env(env)
    if not sweeper:
        worker_env["WORKER_SWEEPER"] = "false"
    return ManagedProcess("worker", argv, worker_env, log_path)


def api_process(
    env: Mapping[str, str], log_path: Path, *, port: int, host: str = "127.0.0.1"
) -> ManagedProcess:
    argv = [
        str(BIN / "uvicorn"),
        "app.asgi:app",
        "--host",
        host,
        "--port",
        str(port),
        "--no-access-log",
        "--timeout-graceful-shutdown",
        "5",
        # As the image runs it (Dockerfile): past 1000 connections a JSON 503, not exhausted descriptors.
        "--limit-concurrency",
        "1000",
    ]
    return ManagedProcess("api", argv, child_env(env), log_path)
