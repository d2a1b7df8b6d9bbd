"""A throw-away Postgres cluster (initdb in a temporary folder, a free port, trust auth) for the tests
and the fault suite that stop and crash it: the shared server is never touched."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

import psycopg

from devstack.processes import free_port

PG_BIN = Path("/usr/local/bin")


def pg_tool(name: str) -> str:
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
    """`with OwnPostgres() as pg:` a running cluster, stopped and removed at the end (or `init()`,
    `start()`, `destroy()`)."""

    def __init__(self, log_path: Path | None = None) -> None:
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="llmq-pg-"))
        self.data = self.root / "data"
        self.log_path = log_path or self.root / "postgres.log"
        # initdb refuses to run as root: run the cluster as the postgres user then.
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    @property
    def base_url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}"

    def url(self, database: str) -> str:
        return f"{self.base_url}/{database}"

    def _run(self, *argv: str, check: bool = True) -> None:
        done = subprocess.run([*self._as, *argv], capture_output=True, text=True)
        if check and done.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {done.stdout}\n{done.stderr}")

    def init(self) -> OwnPostgres:
        if self._as:
            shutil.chown(self.root, "postgres")
            self.log_path.touch()
            shutil.chown(self.log_path, "postgres")
        self._run(
            pg_tool("initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
            "--locale=C", "--no-sync",
        )  # fmt: skip
        return self

    def start(self) -> None:
        # fsync off: it is stopped with `-m immediate`, never the machine; commits stay synchronous so
        # that an acknowledged write survives the stop.
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.root} "
            "-c fsync=off -c full_page_writes=off -c max_connections=200"
        )
        self._run(
            pg_tool("pg_ctl"), "-D", str(self.data), "-l", str(self.log_path), "-o", options, "-w", "start"
        )

    def stop_immediate(self) -> None:
        """What a crash looks like to clients: every connection cut, no shutdown checkpoint."""
        self._run(pg_tool("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop", check=False)

    def destroy(self) -> None:
        if self.data.exists():
            self.stop_immediate()
        shutil.rmtree(self.root, ignore_errors=True)

    def connect(self, database: str) -> psycopg.Connection[tuple[Any, ...]]:
        return psycopg.connect(
            f"postgresql://postgres@127.0.0.1:{self.port}/{database}", autocommit=True, connect_timeout=5
        )

    def __enter__(self) -> OwnPostgres:
        self.init().start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.destroy()
