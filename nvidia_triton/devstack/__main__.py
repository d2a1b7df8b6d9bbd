"""`make dev`: bring up the whole platform on this machine and stop all of it on Ctrl-C.

Postgres and Redis are used where they run (started if installed but stopped), the database
is created and migrated, then the local Triton (the real tritonserver on the CPU, serving
SmolLM2-135M-Instruct on the real vLLM engine next to the simulated models; `--light` or
LLMQ_LIGHT=1: the simulated ones only), the Celery worker and the API start as children of this
process.
"""

from __future__ import annotations

import errno
import glob
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import typer
from rich.console import Console
from rich.markup import escape
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from app.config import Settings, settings_or_exit
from devstack.database import create_database_if_missing, setup_problem
from devstack.processes import ManagedProcess, api_process, worker_process

if TYPE_CHECKING:
    from localtriton.launcher import LocalTriton

ROOT = Path(__file__).resolve().parents[2]
RUN_DIR = ROOT / ".run"
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}

cli = typer.Typer(add_completion=False, help=__doc__)
console = Console(highlight=False)


def reachable(host: str, port: int, timeout_s: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def wait_reachable(name: str, host: str, port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not reachable(host, port):
        if time.monotonic() > deadline:
            raise SystemExit(f"{name} at {host}:{port} is not reachable after {timeout_s:.0f}s")
        time.sleep(0.3)


def _start_postgres() -> None:
    versions = sorted(Path(p).name for p in glob.glob("/etc/postgresql/*"))
    if not versions or shutil.which("pg_ctlcluster") is None:
        raise SystemExit("Postgres is not reachable and no local cluster is installed: set DATABASE_URL")
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main", "start"], check=False)


def _start_redis(port: int) -> None:
    if shutil.which("redis-server") is None:
        raise SystemExit("Redis is not reachable and redis-server is not installed: set REDIS_URL")
    subprocess.run(
        [
            "redis-server",
            "--daemonize",
            "yes",
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        check=False,
    )


def ensure_services(settings: Settings) -> None:
    """Postgres and Redis must answer; local ones that are installed but stopped are started."""
    db = make_url(settings.DATABASE_URL)
    db_host, db_port = db.host or "127.0.0.1", db.port or 5432
    if not reachable(db_host, db_port):
        if db_host not in LOCAL_HOSTS:
            raise SystemExit(f"Postgres at {db_host}:{db_port} is not reachable")
        console.print("[yellow]Postgres is not running: starting the local cluster[/]")
        _start_postgres()
    wait_reachable("Postgres", db_host, db_port, 30)

    redis = urlsplit(settings.REDIS_URL)
    r_host, r_port = redis.hostname or "127.0.0.1", redis.port or 6379
    if not reachable(r_host, r_port):
        if r_host not in LOCAL_HOSTS:
            raise SystemExit(f"Redis at {r_host}:{r_port} is not reachable")
        console.print("[yellow]Redis is not running: starting a local redis-server[/]")
        _start_redis(r_port)
    wait_reachable("Redis", r_host, r_port, 30)


def ensure_database(settings: Settings) -> None:
    try:
        created = create_database_if_missing(settings.DATABASE_URL)
    except DBAPIError as exc:  # a wrong user or password, no right to create databases, ...
        raise SystemExit(f"error: {setup_problem(exc, settings.DATABASE_URL)}") from None
    if created:
        console.print(f"created database [bold]{make_url(settings.DATABASE_URL).database}[/]")


def migrate() -> None:
    # A child process, so that Alembic's logging setup does not take over this one's.
    alembic = [str(Path(sys.executable).parent / "alembic"), "upgrade", "head"]
    if subprocess.run(alembic, cwd=ROOT, check=False).returncode != 0:
        raise SystemExit("error: `alembic upgrade head` failed (its output is above)")


def port_taken(host: str, port: int) -> bool:
    """Whether a server could not listen there (as uvicorn and Triton bind: address reuse allowed)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:  # another failure (e.g. not this machine's address) is the server's to say
            return exc.errno == errno.EADDRINUSE
    return False


def refuse_taken_ports(settings: Settings, local_triton: bool) -> None:
    """Before anything starts: a port in use would fail that server, and the health check would
    reach the other one and say Ready."""
    wanted = [(settings.API_HOST, settings.API_PORT, "the API", "API_PORT")]
    if local_triton:
        wanted += [
            (
                "127.0.0.1",
                _port(settings.TRITON_GRPC_URL, 8001),
                "the local Triton's gRPC",
                "TRITON_GRPC_URL",
            ),
            (
                "127.0.0.1",
                _port(settings.TRITON_METRICS_URL, 8002),
                "the local Triton's metrics",
                "TRITON_METRICS_URL",
            ),
        ]
    taken = [
        f"port {port} for {what} is in use (another `make dev`?): set {setting} to a free port"
        for host, port, what, setting in wanted
        if port_taken(host, port)
    ]
    if taken:
        raise SystemExit("error: " + "; ".join(taken))


def example(api_url: str, admin_key: str, model: str) -> str:
    return f"""  API=${{API:-{api_url}}} MODEL=${{MODEL:-{model}}}
  AUTH="Authorization: Bearer ${{KEY:-{admin_key}}}"
  CTX=$(curl -s -X POST $API/contexts/ -H "$AUTH" -H 'content-type: application/json' \\
        -d '{{"content": "Write a haiku about GPUs."}}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
  RID=$(curl -s -X POST $API/models/send/$MODEL/$CTX -H "$AUTH" -H 'content-type: application/json' \\
        -d '{{"max_tokens": 48, "seed": 1, "chat": true}}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["result_id"])')
  curl -s -H "$AUTH" "$API/results/$RID?wait=60"
"""


def start_local_triton(settings: Settings, logs: Path, light: bool, stack: Stack) -> LocalTriton:
    """The real SmolLM2 model next to the simulated ones; the simulated ones alone when light, or
    where the engine cannot be installed or started (said, not silent), and then the served
    repository holds only them. Triton listens on 127.0.0.1 only (no authentication)."""
    from localtriton import engine_env
    from localtriton.launcher import (
        BUILTIN_REPOSITORY,
        REAL_MODEL,
        LocalTriton,
        LocalTritonError,
        repository_models,
    )

    ports: dict[str, Any] = {
        "http_port": _port(settings.TRITON_URL, 8000),
        "grpc_port": _port(settings.TRITON_GRPC_URL, 8001),
        "metrics_port": _port(settings.TRITON_METRICS_URL, 8002),
        "log_file": logs / "triton.log",
    }
    simulated = [m for m in repository_models(BUILTIN_REPOSITORY) if m != REAL_MODEL]
    real = not light
    if real:
        status = engine_env.status()
        if status.problem:
            console.print(
                f"[yellow]the real model cannot run here ({status.problem}): simulated models only[/]"
            )
            real = False
        elif not status.ready:
            console.print(
                "first run: installing the real vLLM engine (its own virtualenv in ~/.cache/llmq, ~700 MB "
                "download) and preparing SmolLM2-135M-Instruct: about 2 minutes, once (LLMQ_LIGHT=1 skips it) …"
            )
            try:
                engine_env.install(quiet=True)  # one line per step
            except engine_env.EngineEnvError as exc:
                console.print(f"[yellow]could not install the real engine: {exc}; simulated models only[/]")
                real = False
    if real:
        console.print(
            f"starting the local Triton: {REAL_MODEL} on the real vLLM engine (~30 s) + simulated models …"
        )
        triton = LocalTriton(models=[*simulated, REAL_MODEL], **ports)
        stack.triton = triton
        try:
            triton.start()
            return triton
        except LocalTritonError as exc:
            triton.stop()
            first_line = str(exc).splitlines()[0]
            console.print(f"[yellow]the real engine did not start ({first_line}); see {logs}/triton.log[/]")
    console.print("starting the local Triton (simulated vLLM models) …")
    # A repository of the simulated models alone: GET /models/ must not offer the real model that
    # this server never loads.
    triton = LocalTriton(models=simulated, only_listed_models=True, **ports)
    stack.triton = triton
    triton.start()
    return triton


class Stack:
    def __init__(self) -> None:
        self.triton: LocalTriton | None = None
        self.processes: list[ManagedProcess] = []

    def stop(self) -> None:
        for proc in reversed(self.processes):
            proc.stop()
        self.processes.clear()
        if self.triton is not None:
            self.triton.stop()
            self.triton = None


def _port(url: str, default: int) -> int:
    return urlsplit(url if "://" in url else f"//{url}").port or default


@cli.command()
def up(
    local_triton: bool = typer.Option(
        True, help="Start the local CPU Triton unless one already answers at TRITON_URL."
    ),
    light: bool = typer.Option(
        False, "--light", envvar="LLMQ_LIGHT", help="Serve only the simulated models (no real vLLM engine)."
    ),
) -> None:
    """Start Postgres/Redis (if needed), migrate, then local Triton, the worker and the API."""
    settings = settings_or_exit()
    triton_host = urlsplit(settings.TRITON_URL).hostname or "127.0.0.1"
    triton_http = _port(settings.TRITON_URL, 8000)
    # Started only when none answers at TRITON_URL (its HTTP port answering is that one in use).
    start_triton = local_triton and triton_host in LOCAL_HOSTS and not reachable(triton_host, triton_http)
    refuse_taken_ports(settings, start_triton)
    ensure_services(settings)
    ensure_database(settings)
    migrate()
    logs = RUN_DIR / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for name in ("api", "worker", "triton"):  # this run's lines only: a process that exits shows its own
        (logs / f"{name}.log").write_bytes(b"")
    stack = Stack()

    def shutdown(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, shutdown)
    # Ctrl-C stops everything even when started with SIGINT ignored (e.g. from a background job).
    signal.signal(signal.SIGINT, shutdown)
    try:
        env: dict[str, str] = {}
        # Chat templates: the production models' folders and the local models'.
        env["CHAT_TEMPLATES_DIRS"] = (
            f"{ROOT / 'triton_models'},{ROOT / 'nvidia_triton' / 'localtriton' / 'models'}"
        )
        model = "sim-llm"
        if start_triton:
            from localtriton.launcher import REAL_MODEL

            triton = start_local_triton(settings, logs, light, stack)
            env.update(TRITON_URL=triton.http_url, TRITON_GRPC_URL=triton.grpc_url)
            model = REAL_MODEL if REAL_MODEL in triton.models else "sim-llm"
        else:
            console.print(f"using the Triton at {settings.TRITON_URL}")

        worker = worker_process(env, logs / "worker.log")
        stack.processes.append(worker.start())
        api = api_process(env, logs / "api.log", port=settings.API_PORT, host=settings.API_HOST)
        stack.processes.append(api.start())
        api_url = f"http://{settings.API_HOST}:{settings.API_PORT}"
        try:
            worker.wait_for_log("ready.", 60)
            api.wait_for_http(f"{api_url}/health", 30)
        except (RuntimeError, TimeoutError) as exc:  # the process's own last lines say why
            first, *tail = str(exc).splitlines()
            console.print(f"[red]{escape(first)}[/]")
            console.print("\n".join(tail), markup=False)
            raise SystemExit(1) from None

        console.print(f"\n[bold green]Ready.[/] API on [bold]{api_url}[/]  (docs: {api_url}/docs)")
        console.print(f"logs: {logs}/{{api,worker,triton}}.log   Ctrl-C stops everything.\n")
        if settings.ADMIN_API_KEY:
            console.print(
                f"admin key: {settings.ADMIN_API_KEY}  (ADMIN_API_KEY; development only)", markup=False
            )
            console.print(
                "Try it:\n" + example(api_url, settings.ADMIN_API_KEY, model), soft_wrap=True, markup=False
            )
        else:
            console.print(
                "[yellow]ADMIN_API_KEY is not set: make a key with `python -m app.cli keys create`[/]"
            )
        while True:
            for proc in stack.processes:
                if not proc.running:
                    console.print(f"[red]{proc.name} exited[/]; last lines:\n{proc.log_tail()}")
                    raise SystemExit(1)
            time.sleep(0.5)
    except KeyboardInterrupt:
        console.print("\nstopping …")
    finally:
        stack.stop()
        console.print("stopped.")


@cli.command()
def services() -> None:
    """Only make sure Postgres and Redis answer, and the database exists and is migrated."""
    settings = settings_or_exit()
    ensure_services(settings)
    ensure_database(settings)
    migrate()


if __name__ == "__main__":
    cli()
