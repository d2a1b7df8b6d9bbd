"""Launcher lifecycle: latency overrides, clean stop, failed start, CLI, listening addresses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from localtriton.launcher import BUILTIN_REPOSITORY, REAL_MODEL, SHM_DIR, LocalTriton, LocalTritonError
from localtriton_helpers import generate, listening_hosts

pytestmark = pytest.mark.integration


def _processes_with(marker: str) -> list[str]:
    out = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().decode(errors="replace")
        except OSError:
            continue
        if marker in argv:
            out.append(argv)
    return out


def _assert_clean(server: LocalTriton) -> None:
    assert not list(SHM_DIR.glob(f"{server.shm_prefix}*"))
    assert not _processes_with(server.shm_prefix)
    assert server.pid is not None and not Path(f"/proc/{server.pid}").exists()


def test_latency_override_and_clean_stop() -> None:
    server = LocalTriton(models=["sim-llm"], prefill_ms=20, decode_ms=20)
    with server:
        assert list(SHM_DIR.glob(f"{server.shm_prefix}*"))
        assert len(_processes_with(server.shm_prefix)) >= 2  # server + stub
        t0 = time.monotonic()
        replies = generate(
            server.grpc_url, "sim-llm", "slow", {"max_tokens": 10, "ignore_eos": True}, stream=True
        )
        elapsed = time.monotonic() - t0
        assert len(replies) == 10
        assert elapsed >= 0.2  # prefill 20 ms (first token) + 9 decode steps x 20 ms
    _assert_clean(server)


def test_listens_on_loopback_only() -> None:
    # Triton has no authentication and explicit model control: reachable from the network, anyone
    # could load models or generate around the API's keys and quotas.
    with LocalTriton(models=["sim-llm"]) as server:
        ports = [server.http_port, server.grpc_port, server.metrics_port]
        assert listening_hosts(ports) == {port: {"127.0.0.1"} for port in ports}
        assert httpx.get(f"{server.http_url}/v2/health/ready", timeout=10).status_code == 200


def test_another_address_only_when_asked() -> None:
    server = LocalTriton(models=[], host="0.0.0.0")
    command = server.command(Path("/nonexistent"))
    assert {"--http-address=0.0.0.0", "--grpc-address=0.0.0.0", "--metrics-address=0.0.0.0"} <= set(command)
    assert server.http_url == f"http://127.0.0.1:{server.http_port}"  # clients still connect locally
    default = LocalTriton(models=[]).command(Path("/nonexistent"))
    assert [a for a in default if "-address=" in a] == [
        "--http-address=127.0.0.1",
        "--grpc-address=127.0.0.1",
        "--metrics-address=127.0.0.1",
    ]


def test_only_listed_models_hides_the_others() -> None:
    with LocalTriton(models=["sim-llm"], only_listed_models=True) as server:
        index = httpx.post(f"{server.http_url}/v2/repository/index", json={}, timeout=10).json()
        assert [(m["name"], m.get("state")) for m in index] == [("sim-llm", "READY")]
        served = server.served_repository
        assert served != BUILTIN_REPOSITORY
    assert not served.exists()
    # The run dir held links: removing it left the built-in models in place.
    assert (BUILTIN_REPOSITORY / REAL_MODEL / "config.pbtxt").is_file()
    assert (BUILTIN_REPOSITORY / "sim-llm" / "config.pbtxt").is_file()


def test_failed_start_reports_log_and_leaves_nothing(tmp_path: Path) -> None:
    (tmp_path / "broken" / "1").mkdir(parents=True)
    (tmp_path / "broken" / "config.pbtxt").write_text('backend: "vllm"\n')
    (tmp_path / "broken" / "1" / "model.json").write_text('{"model": "x", "max_num_seq": 4}')
    server = LocalTriton(model_repository=tmp_path, models=["broken"], ready_timeout=30)
    with pytest.raises(LocalTritonError, match="unexpected keyword argument 'max_num_seq'"):
        server.start()
    _assert_clean(server)


def test_cli_serve_stops_on_sigterm(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "localtriton",
            "serve",
            "--http-port",
            "0",
            "--grpc-port",
            "0",
            "--metrics-port",
            "0",
            "--model",
            "sim-llm",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.stdout is not None
    lines = {}
    try:
        for line in proc.stdout:
            key, _, value = line.partition(":")
            lines[key.strip()] = value.strip()
            if key == "pid":
                break
        server_pid = int(lines["pid"].split()[0])
        ports = [int(lines[name].rsplit(":", 1)[1].split("/")[0]) for name in ("http", "grpc", "metrics")]
        assert listening_hosts(ports) == {port: {"127.0.0.1"} for port in ports}
        [reply] = generate(lines["grpc"], "sim-llm", "cli", {"seed": 1, "max_tokens": 3}, stream=False)
        assert reply.error is None
    finally:
        proc.send_signal(signal.SIGTERM)  # a failed assertion must not leave the server running
    assert proc.wait(30) == 0
    assert not Path(f"/proc/{server_pid}").exists()
    assert not [p for p in _processes_with("localtriton-") if f" {server_pid} " in p.replace("\0", " ")]
    assert os.path.isdir("/dev/shm")
