"""Helpers for tests/gpu_hosts: a local HTTP server standing in for the Vast.ai REST API, an
isolated environment for the real `vastai` CLI (pinned 1.9.1), and a runner for the tool."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
NVIDIA_TRITON = ROOT / "nvidia_triton"
TRITON_MODELS = ROOT / "triton_models"
if str(NVIDIA_TRITON) not in sys.path:
    sys.path.insert(0, str(NVIDIA_TRITON))

API_KEY = "vast-test-key-0123456789abcdef"
HF_TOKEN = "hf_testtoken_ABCDEFGHIJ"
CONTRACT = 4242


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    body: Any
    headers: dict[str, str]


def offer(oid: int, gpu: str, dph: float, **extra: Any) -> dict[str, Any]:
    row = {
        "id": oid,
        "ask_contract_id": oid,
        "machine_id": oid + 1000,
        "gpu_name": gpu,
        "num_gpus": 1,
        "gpu_ram": 24564,
        "cuda_max_good": 12.8,
        "driver_version": "570.86.10",
        "dph_total": dph,
        "disk_space": 120.0,
        "reliability": 0.995,
        "reliability2": 0.995,
        "direct_port_count": 20,
        "inet_down": 800.0,
        "public_ipaddr": "203.0.113.7",
        "geolocation": "Norway, NO",
    }
    row.update(extra)
    return row


def instance_row(cid: int, status: str | None, **extra: Any) -> dict[str, Any]:
    row = {
        "id": cid,
        "actual_status": status,
        "cur_state": "running",
        "status_msg": "",
        "start_date": time.time() - 60,
        "ssh_host": "ssh5.vast.ai",
        "ssh_port": 31234,
        "public_ipaddr": "203.0.113.7",
        "ports": {"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": "41022"}]},
        "image_runtype": "ssh_direc ssh_proxy",
        "gpu_name": "RTX 4090",
        "dph_total": 0.412,
        "label": "llm-jobqueue-triton",
        # Vast.ai returns the container env, token included: the tool must never print it.
        "extra_env": [["HF_TOKEN", HF_TOKEN], ["HF_HOME", "/workspace/hf"]],
    }
    row.update(extra)
    return row


@dataclass
class FakeVast:
    """Answers the REST calls vastai 1.9.1 makes; records every request."""

    url: str = ""
    requests: list[Request] = field(default_factory=list)
    offers: list[dict[str, Any]] = field(default_factory=list)
    create_reply: tuple[int, Any] = (200, {"success": True, "new_contract": CONTRACT})
    # Statuses answered by successive `show instance` calls (an int: that HTTP error); the last repeats.
    statuses: list[str | int | None] = field(default_factory=lambda: ["loading", "loading", "running"])
    instances: list[dict[str, Any]] = field(default_factory=list)
    destroy_reply: tuple[int, Any] = (200, {"success": True})
    logs_text: str = "container log line 1\ncontainer log line 2\n"
    _shown: int = 0

    def calls(self, method: str, prefix: str) -> list[Request]:
        return [r for r in self.requests if r.method == method and r.path.startswith(prefix)]

    def handle(self, req: Request) -> tuple[int, Any]:
        path = req.path
        if req.method == "POST" and path == "/api/v0/bundles/":
            return 200, {"offers": self.offers}
        if req.method == "PUT" and path.startswith("/api/v0/asks/"):
            return self.create_reply
        if req.method == "GET" and path == "/api/v1/instances/":
            return 200, {
                "instances": self.instances,
                "next_token": None,
                "total_instances": len(self.instances),
            }
        if req.method == "GET" and path.startswith("/api/v0/instances/"):
            cid = int(path.rstrip("/").rsplit("/", 1)[1])
            status = self.statuses[min(self._shown, len(self.statuses) - 1)]
            self._shown += 1
            if isinstance(status, int):  # an HTTP error instead of a row
                return status, {"success": False, "msg": "internal error"}
            return 200, {"instances": instance_row(cid, status)}
        if req.method == "PUT" and path.startswith("/api/v0/instances/request_logs/"):
            cid = path.rstrip("/").rsplit("/", 1)[1]
            return 200, {"result_url": f"{self.url}/logs/{cid}"}
        if req.method == "GET" and path.startswith("/logs/"):
            return 200, self.logs_text
        if req.method == "DELETE" and path.startswith("/api/v0/instances/"):
            return self.destroy_reply
        return 200, {}


def _handler(fake: FakeVast) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            parts = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw) if raw else None
            except json.JSONDecodeError:
                body = raw.decode(errors="replace")
            req = Request(self.command, parts.path, parse_qs(parts.query), body, dict(self.headers))
            fake.requests.append(req)
            status, payload = fake.handle(req)
            if isinstance(payload, str):
                data, ctype = payload.encode(), "text/plain"
            else:
                # vastai checks the exact Content-Type of search results.
                data, ctype = json.dumps(payload).encode(), "application/json"
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = _serve

        def log_message(self, format: str, *args: Any) -> None:
            return

    return Handler


@pytest.fixture
def fake_vast() -> Iterator[FakeVast]:
    fake = FakeVast()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield fake
    server.shutdown()
    server.server_close()


@contextlib.contextmanager
def foreign_http(status: int) -> Iterator[str]:
    """An HTTP server that is not Triton: every GET/POST gets `status` with an HTML page. Yields its URL."""

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            data = b"<html><body>not triton</body></html>"
            self.send_response(status)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _serve

        def log_message(self, format: str, *args: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def write_config(path: Path, **overrides: Any) -> Path:
    """The shipped yaml with test-friendly overrides (section.key=value)."""
    data = yaml.safe_load((NVIDIA_TRITON / "vastai_instance_definition.yaml").read_text())
    data["instance"]["poll_interval_s"] = 0
    data["instance"]["wait_timeout_s"] = 30
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        data[section][key] = value
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def tool_env(tmp_path: Path, fake_vast: FakeVast) -> dict[str, str]:
    """Environment for the tool and the vastai CLI: isolated HOME, fake API, known secrets."""
    home = tmp_path / "home"
    home.mkdir()
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "VAST_URL": fake_vast.url,
        "VASTAI_NO_UPDATE_CHECK": "1",
        "VAST_API_KEY": API_KEY,
        "HF_TOKEN": HF_TOKEN,
        "CONFIG": str(write_config(tmp_path / "instance.yaml")),
        "PYTHONPATH": str(NVIDIA_TRITON),
    }


def run_tool(
    env: dict[str, str], *args: str, stdin: str = "", timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """`python -m gpuhost ARGS` as the Makefile runs it."""
    return subprocess.run(
        [sys.executable, "-m", "gpuhost", *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=NVIDIA_TRITON,
    )


def run_make(env: dict[str, str], target: str, *variables: str) -> subprocess.CompletedProcess[str]:
    """`make -s -C nvidia_triton TARGET VAR=value …` with the project's venv, as a user runs it."""
    clean = {k: v for k, v in env.items() if k not in ("MAKEFLAGS", "MAKELEVEL")}
    return subprocess.run(
        ["make", "-s", "-C", str(NVIDIA_TRITON), target, *variables],
        env={**clean, "PYTHON": str(ROOT / ".venv" / "bin" / "python")},
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_no_secrets(*texts: str) -> None:
    for text in texts:
        assert API_KEY not in text
        assert HF_TOKEN not in text
