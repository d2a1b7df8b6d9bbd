"""A Postgres cluster of the test's own (initdb in a temporary folder, another port), which the test
may stop and start: the shared server on 5432 is never touched."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

from devstack.processes import free_port

PG_BIN = Path("/usr/local/bin")


def _tool(name: str) -> str:
    found = PG_BIN / name
    return str(found) if found.exists() else (shutil.which(name) or name)


class OwnPostgres:
    def __init__(self) -> None:
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="llmq-test-pg-"))
        self.data = self.root / "data"
        self.log_path = self.root / "postgres.log"  # where the cluster's user may write
        # initdb refuses to run as root: the cluster then runs as the postgres user.
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    @property
    def base_url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}"

    def _run(self, *argv: str, check: bool = True) -> None:
        done = subprocess.run([*self._as, *argv], capture_output=True, text=True)
        if check and done.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {done.stdout}\n{done.stderr}")

    def __enter__(self) -> OwnPostgres:
        if self._as:
            shutil.chown(self.root, "postgres")
        self._run(_tool("initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        self.start()
        return self

    def start(self) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.root} "
            "-c fsync=off -c max_connections=100"
        )
        self._run(
            _tool("pg_ctl"), "-D", str(self.data), "-l", str(self.log_path), "-o", options, "-w", "start"
        )

    def stop(self) -> None:
        """As a crash looks to clients: every connection cut at once."""
        self._run(_tool("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop", check=False)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
