"""`make dev`, the README's first command, then the README's example, as a new user would run them."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from devstack.__main__ import Stack, start_local_triton
from devstack.database import drop_database
from devstack.processes import free_port
from localtriton.launcher import REAL_MODEL
from sqlalchemy import create_engine, make_url, text

from app.config import Settings
from tests.conftest import PG_BASE
from tests.localtriton.localtriton_helpers import listening_hosts

ROOT = Path(__file__).resolve().parents[2]
DEV_DB = "llmq_devcmd"


def _descendants(pid: int) -> set[int]:
    found: set[int] = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            child = int(stat.parent.name)
            found |= {child} | _descendants(child)
    return found


def _readme_example() -> str:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- example:start -->\s*```bash\n(.*?)```\s*<!-- example:end -->", readme, re.S)
    assert block, "the README's example block is missing"
    return block.group(1)


REAL_ENGINE_SKIPPED = os.environ.get("LLMQ_SKIP_REAL_ENGINE") == "1"


def _diagnosis() -> str:
    engine = create_engine(f"{PG_BASE}/{DEV_DB}")
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text("SELECT id, status, attempts, error, created_at, started_at, finished_at FROM result")
            ).all()
    finally:
        engine.dispose()
    logs = "\n".join(
        f"--- {path.name}:\n" + "\n".join(path.read_text(errors="replace").splitlines()[-15:])
        for path in sorted((ROOT / ".run" / "logs").glob("*.log"))
    )
    return f"result rows: {rows}\n{logs}"


def test_make_dev_serves_the_readme_example_and_stops_cleanly(tmp_path: Path) -> None:
    admin = create_engine(f"{PG_BASE}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:  # make dev must create the database itself
        conn.execute(text(f'DROP DATABASE IF EXISTS "{DEV_DB}" WITH (FORCE)'))
    admin.dispose()

    api_port, http_port, grpc_port, metrics_port = (free_port() for _ in range(4))
    env = {
        **os.environ,
        "APP_ENV_FILE": "/dev/null",
        "DATABASE_URL": f"{PG_BASE}/{DEV_DB}",
        "API_PORT": str(api_port),
        "TRITON_URL": f"http://127.0.0.1:{http_port}",
        "TRITON_GRPC_URL": f"127.0.0.1:{grpc_port}",
        "TRITON_METRICS_URL": f"http://127.0.0.1:{metrics_port}/metrics",
        "CELERY_QUEUE": f"llmq-devcmd-{api_port}",
        # The real model, as a new user gets it (`make engine` has installed it), unless its tests are
        # skipped on purpose: then the simulated models only.
        **({"LLMQ_LIGHT": "1"} if REAL_ENGINE_SKIPPED else {}),
    }
    model = "sim-llm" if REAL_ENGINE_SKIPPED else "smollm2-135m-instruct"
    out = (tmp_path / "make-dev.out").open("w+b")
    # Its own session, like a terminal's foreground job: Ctrl-C reaches the whole group.
    make = subprocess.Popen(
        ["make", "dev"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120
        while b"Ready." not in (tmp_path / "make-dev.out").read_bytes():
            assert make.poll() is None, (tmp_path / "make-dev.out").read_text()
            assert time.monotonic() < deadline, (tmp_path / "make-dev.out").read_text()
            time.sleep(0.2)
        printed = (tmp_path / "make-dev.out").read_text()
        assert f"API on http://127.0.0.1:{api_port}" in printed
        assert "curl" in printed  # a copy-paste example
        key = re.search(r"admin key: (llmq_\S+)", printed)
        assert key, printed

        try:
            example = subprocess.run(
                ["bash", "-x", "-c", _readme_example()],
                env={
                    **os.environ,
                    "API": f"http://127.0.0.1:{api_port}",
                    "KEY": key.group(1),
                    "MODEL": model,
                },
                capture_output=True,
                text=True,
                timeout=90,
            )
        except (
            subprocess.TimeoutExpired
        ) as exc:  # say where it stood: the commands run, the job's row, the logs
            raise AssertionError(f"the README example hung:\n{exc.stderr!r}\n{_diagnosis()}") from None
        assert example.returncode == 0, example.stderr
        result = json.loads(example.stdout.strip().splitlines()[-1])
        assert result["status"] == "completed", result
        assert result["model"] == model
        assert result["completion_tokens"] and result["output"].strip()
        assert "<|im_" not in result["output"]  # the chat template was applied, not echoed
        if model != "sim-llm":  # real words from the real model (not the simulator's vocabulary)
            assert re.search(r"[A-Za-z]{3,}", result["output"]), result["output"]
        assert f"API=${{API:-http://127.0.0.1:{api_port}}} MODEL=${{MODEL:-{model}}}" in printed

        children = _descendants(make.pid)
        assert len(children) >= 4  # python -m devstack, tritonserver, celery, uvicorn (and more)
    finally:
        with contextlib.suppress(ProcessLookupError):  # already gone: the assertion above says why
            os.killpg(make.pid, signal.SIGINT)
        try:
            make.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(make.pid, signal.SIGKILL)
            raise
    printed = (tmp_path / "make-dev.out").read_text()
    assert "stopped." in printed
    deadline = time.monotonic() + 10  # the engine's processes take a moment to go after their stub
    while (alive := [pid for pid in children if _running(pid)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert alive == [], f"stray processes after Ctrl-C: {alive}"


def _running(pid: int) -> bool:
    """Alive and not a zombie (an exited process its new parent has not reaped yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_light_mode_serves_only_the_simulated_models_on_loopback(tmp_path: Path) -> None:
    """LLMQ_LIGHT=1: GET /models/ (Triton's repository index) must not list the real model that this
    server never loads, and Triton (no authentication) must not be reachable from the network."""
    http_port, grpc_port, metrics_port = (free_port() for _ in range(3))
    settings = Settings(
        TRITON_URL=f"http://127.0.0.1:{http_port}",
        TRITON_GRPC_URL=f"127.0.0.1:{grpc_port}",
        TRITON_METRICS_URL=f"http://127.0.0.1:{metrics_port}/metrics",
    )
    stack = Stack()
    try:
        triton = start_local_triton(settings, tmp_path, light=True, stack=stack)
        assert REAL_MODEL not in triton.models
        index = httpx.post(f"{triton.http_url}/v2/repository/index", json={}, timeout=10).json()
        assert sorted((m["name"], m.get("state")) for m in index) == [
            ("sim-llm", "READY"),
            ("sim-llm-slow", "READY"),
        ]
        ports = [http_port, grpc_port, metrics_port]
        assert listening_hosts(ports) == {port: {"127.0.0.1"} for port in ports}
    finally:
        stack.stop()


def test_make_help_describes_every_target() -> None:
    makefile = (ROOT / "Makefile").read_text()
    phony = re.search(r"^\.PHONY:(.*)$", makefile, re.M)
    assert phony, "the Makefile's .PHONY line is missing"
    helped = subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert helped.returncode == 0, helped.stderr
    listed = set(re.findall(r"^\s+(?:\x1b\[[0-9;]*m)?([a-zA-Z_%-]+)", helped.stdout, re.M))
    missing = [t for t in phony.group(1).split() if t not in listed]
    assert missing == [], f"targets without a `## ` description in `make help`: {missing}"


def _devstack_up(tmp_path: Path, timeout_s: float = 120, *args: str, **settings: str) -> tuple[int, str]:
    env = {
        **{k: v for k, v in os.environ.items() if k not in Settings.model_fields},
        "APP_ENV_FILE": "/dev/null",
        "LLMQ_LIGHT": "1",
        "REDIS_URL": os.environ["REDIS_URL"],
        "CELERY_QUEUE": f"llmq-devcmd-{free_port()}",
        "TRITON_URL": f"http://127.0.0.1:{free_port()}",
        "TRITON_GRPC_URL": f"127.0.0.1:{free_port()}",
        "TRITON_METRICS_URL": f"http://127.0.0.1:{free_port()}/metrics",
        "API_PORT": str(free_port()),
        **settings,
    }
    out = tmp_path / "devstack.out"
    with out.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "devstack", "up", *args],
            cwd=ROOT,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            proc.wait(timeout=timeout_s)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=60)
    return proc.returncode, out.read_text()


def _database_exists(name: str) -> bool:
    admin = create_engine(f"{PG_BASE}/postgres")
    try:
        with admin.connect() as conn:
            return bool(
                conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}).first()
            )
    finally:
        admin.dispose()


def test_a_port_in_use_is_refused_before_anything_starts(tmp_path: Path) -> None:
    """A second `make dev` on the same API_PORT said Ready: its health check reached the first one."""
    name = f"llmq_devcmd_port_{free_port()}"
    with socket.socket() as api, socket.socket() as grpc:
        for sock in (api, grpc):
            sock.bind(("127.0.0.1", 0))
            sock.listen()
        api_port, grpc_port = api.getsockname()[1], grpc.getsockname()[1]
        code, printed = _devstack_up(
            tmp_path,
            30,
            DATABASE_URL=f"{PG_BASE}/{name}",
            API_PORT=str(api_port),
            TRITON_GRPC_URL=f"127.0.0.1:{grpc_port}",
        )
    assert code != 0 and "Ready." not in printed and "Traceback" not in printed, printed
    assert printed.strip() == (
        f"error: port {api_port} for the API is in use (another `make dev`?): set API_PORT to a free port; "
        f"port {grpc_port} for the local Triton's gRPC is in use (another `make dev`?): set TRITON_GRPC_URL "
        "to a free port"
    )
    assert not _database_exists(name)  # nothing was started or created


def test_a_process_that_exits_at_start_shows_this_runs_lines_only(tmp_path: Path) -> None:
    logs = ROOT / ".run" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with (logs / "api.log").open("a") as earlier:
        earlier.write("Traceback (most recent call last):\nAnEarlierRunsError: not this run's\n")
    name = f"llmq_devcmd_exit_{free_port()}"
    try:
        # Not an address of this machine: uvicorn cannot listen there and exits.
        code, printed = _devstack_up(
            tmp_path, 120, "--no-local-triton", DATABASE_URL=f"{PG_BASE}/{name}", API_HOST="192.0.2.1"
        )
    finally:
        drop_database(f"{PG_BASE}/{name}")
    assert code != 0 and "Ready." not in printed, printed
    assert "api exited early" in printed and "192.0.2.1" in printed, printed
    assert "AnEarlierRunsError" not in printed and "Traceback" not in printed, printed


def test_a_database_user_postgres_refuses_is_said_in_one_line(tmp_path: Path) -> None:
    url = make_url(f"{PG_BASE}/llmq_devcmd_user").set(username="llmq_nobody", password="not-the-password-42")
    code, printed = _devstack_up(tmp_path, 60, DATABASE_URL=url.render_as_string(hide_password=False))
    assert code != 0 and "not-the-password-42" not in printed, printed
    [line] = [line for line in printed.splitlines() if line.strip()]
    assert line.startswith(
        "error: cannot check or create the database 'llmq_devcmd_user' as user 'llmq_nobody' on 127.0.0.1:"
    ), printed
    assert line.endswith('role "llmq_nobody" does not exist (check DATABASE_URL)'), printed
