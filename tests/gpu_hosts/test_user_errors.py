"""Wrong variables, options, URLs and keys: one `error:` line naming what to fix, never a traceback."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from gpuhost_testlib import (
    API_KEY,
    TRITON_MODELS,
    FakeVast,
    foreign_http,
    run_make,
    run_tool,
    write_config,
)


def tool_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    """What the tool itself printed on stderr (make's own `make: ***` line left out)."""
    return [line for line in proc.stderr.splitlines() if line and not line.startswith("make")]


@pytest.mark.parametrize(
    ("target", "variables", "message"),
    [
        ("destroy-instance", ["CONTRACT_ID=abc"], "CONTRACT_ID must be an integer, got 'abc'"),
        ("ssh-instance", ["CONTRACT_ID=abc"], "CONTRACT_ID must be an integer, got 'abc'"),
        ("run-tritonserver", ["CONTRACT_ID=abc"], "CONTRACT_ID must be an integer, got 'abc'"),
        ("ssh-tunnels-tritonserver", ["CONTRACT_ID=abc"], "CONTRACT_ID must be an integer, got 'abc'"),
        ("deploy-models-tritonserver", ["CONTRACT_ID=abc"], "CONTRACT_ID must be an integer, got 'abc'"),
        ("check-logs-tritonserver", ["CONTRACT_ID=abc"], "CONTRACT_ID must be an integer, got 'abc'"),
        ("create-instance", ["OFFER_ID=abc"], "OFFER_ID must be an integer, got 'abc'"),
        ("create-instance", ["OFFER_ID=5", "TIMEOUT=abc"], "TIMEOUT must be a number, got 'abc'"),
        ("check-logs-tritonserver", ["CONTRACT_ID=1", "TAIL=abc"], "TAIL must be an integer, got 'abc'"),
        (
            "check-logs-tritonserver",
            ["CONTRACT_ID=1", "FOLLOW=maybe"],
            "FOLLOW must be 1/0, yes/no or true/false, got 'maybe'",
        ),
        ("list-instances", ["DRY_RUN=maybe"], "DRY_RUN must be 1/0, yes/no or true/false, got 'maybe'"),
    ],
)
def test_badly_typed_make_variable_is_one_line(
    fake_vast: FakeVast, tool_env: dict[str, str], target: str, variables: list[str], message: str
) -> None:
    proc = run_make(tool_env, target, *variables)
    assert proc.returncode != 0
    assert tool_lines(proc) == [f"error: {message}"], proc.stderr
    assert fake_vast.requests == []


def test_typed_option_on_the_command_line_names_the_option(tool_env: dict[str, str]) -> None:
    proc = run_tool(tool_env, "destroy-instance", "--contract-id", "x")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --contract-id must be an integer, got 'x'"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nosuch"], "error: No such command 'nosuch' (see `python -m gpuhost --help`)"),
        (
            ["create-instance", "--bogus"],
            "error: No such option: --bogus (see `python -m gpuhost create-instance --help`)",
        ),
    ],
)
def test_usage_errors_are_one_line(tool_env: dict[str, str], args: list[str], message: str) -> None:
    proc = run_tool(tool_env, *args)
    assert proc.returncode == 2
    assert proc.stderr.strip() == message


def test_bare_invocation_shows_help_without_traceback(tool_env: dict[str, str]) -> None:
    proc = run_tool(tool_env)
    assert proc.returncode in (0, 2)
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "check-health-tritonserver" in proc.stdout + proc.stderr


@pytest.mark.parametrize("url", ["ssh://root@h:99999", "ssh://root@h:abc"])
def test_bad_ssh_url_port_names_the_variable(tool_env: dict[str, str], url: str) -> None:
    proc = run_tool({**tool_env, "DRY_RUN": "1", "SSH_URL": url}, "ssh-instance")
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"error: SSH_URL: not an ssh URL (expected ssh://user@host:port, port 1-65535): {url!r}"
    )


@pytest.mark.parametrize("target", ["check-config", "ssh-instance"])
def test_unparsable_ssh_opts_names_the_variable(tool_env: dict[str, str], target: str) -> None:
    proc = run_tool({**tool_env, "SSH_URL": "ssh://root@h:22", "SSH_OPTS": "'unterminated"}, target)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        'error: SSH_OPTS: no closing quotation in "\'unterminated" (quote it as for a shell)'
    )


@pytest.mark.parametrize(
    ("status", "answer"), [(200, "HTTP 200 OK (text/html)"), (401, "HTTP 401 Unauthorized")]
)
def test_health_on_a_server_that_is_not_triton(tool_env: dict[str, str], status: int, answer: str) -> None:
    with foreign_http(status) as url:
        proc = run_tool({**tool_env, "TRITON_URL": url}, "check-health-tritonserver")
    assert proc.returncode == 1
    assert proc.stdout.startswith(f"NOT healthy: {url} is not a Triton server: GET /v2 answered {answer}")
    assert "check TRITON_URL" in proc.stdout
    assert "no models loaded" not in proc.stdout and "live=" not in proc.stdout
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("status", [200, 401])
def test_stats_on_a_server_that_is_not_triton(tool_env: dict[str, str], status: int) -> None:
    with foreign_http(status) as url:
        env = {**tool_env, "TRITON_URL": url, "TRITON_METRICS_URL": f"{url}/metrics"}
        proc = run_tool(env, "check-model-stats-tritonserver")
    assert proc.returncode == 1
    assert proc.stdout.startswith(f"cannot read statistics: {url} is not a Triton server: GET /v2 answered")
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("status", [200, 401])
def test_deploy_to_a_server_that_is_not_triton_fails(tool_env: dict[str, str], status: int) -> None:
    with foreign_http(status) as url:
        env = {**tool_env, "TRITON_URL": url, "SKIP_COPY": "1", "TIMEOUT": "5"}
        proc = run_tool(env, "deploy-models-tritonserver")
    assert proc.returncode == 1
    assert f"FAILED: {url} is not a Triton server" in proc.stdout
    assert "ready in" not in proc.stdout and "deployed:" not in proc.stdout


def test_unreachable_api_message_is_short_and_whole(tool_env: dict[str, str]) -> None:
    proc = run_tool({**tool_env, "VAST_URL": "http://127.0.0.1:9"}, "list-instances")
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        "error: show instances failed: cannot reach the Vast.ai API at 127.0.0.1:9 "
        "(NewConnectionError: Connection refused)"
    )


def test_unreachable_message_from_a_dns_failure() -> None:
    from gpuhost.vast import unreachable_message

    line = (
        "requests.exceptions.ConnectionError: HTTPSConnectionPool(host='console.vast.ai', port=443): Max "
        "retries exceeded with url: /api/v1/instances/?select_filters=%7B%7D&order_by=%5B%7B%22col%22 "
        "(Caused by NameResolutionError(\"HTTPSConnection(host='console.vast.ai', port=443): Failed to "
        "resolve 'console.vast.ai' ([Errno -2] Name or service not known)\"))"
    )
    assert unreachable_message(line) == (
        "cannot reach the Vast.ai API at console.vast.ai:443 (NameResolutionError: Name or service not known)"
    )
    assert unreachable_message("requests.exceptions.ConnectionError: boom") == (
        "cannot reach the Vast.ai API (ConnectionError)"
    )


@pytest.mark.parametrize("args", [["list-instances"], ["create-instance", "--offer-id", "301"]])
def test_missing_api_key_is_said_before_any_call(
    fake_vast: FakeVast, tool_env: dict[str, str], args: list[str]
) -> None:
    env = {k: v for k, v in tool_env.items() if k != "VAST_API_KEY"}
    proc = run_tool(env, *args)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: no Vast.ai API key: run `.venv/bin/vastai set api-key <KEY>` or export VAST_API_KEY=<KEY>"
        " (key from your Vast.ai account page)"
    )
    assert fake_vast.requests == []


def test_key_file_counts_as_a_key_and_search_needs_none(
    fake_vast: FakeVast, tool_env: dict[str, str]
) -> None:
    env = {k: v for k, v in tool_env.items() if k != "VAST_API_KEY"}
    proc = run_tool(env, "search-instance")
    assert "API key" not in proc.stderr
    assert fake_vast.calls("POST", "/api/v0/bundles/")

    key_file = Path(env["XDG_CONFIG_HOME"]) / "vastai" / "vast_api_key"
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key_file.write_text(API_KEY + "\n")
    proc = run_tool(env, "list-instances")
    assert proc.returncode == 0, proc.stderr
    (req,) = fake_vast.calls("GET", "/api/v1/instances/")
    assert req.headers["Authorization"] == f"Bearer {API_KEY}"


def test_ssh_lookup_says_when_the_api_is_unreachable(tool_env: dict[str, str]) -> None:
    env = {**tool_env, "VAST_URL": "http://127.0.0.1:9", "CONTRACT_ID": "4242"}
    proc = run_tool(env, "run-tritonserver")
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        "error: ssh-url of instance 4242 failed: cannot reach the Vast.ai API at 127.0.0.1:9 "
        "(NewConnectionError: Connection refused)"
    )


def test_check_config_refuses_a_model_without_folder(tool_env: dict[str, str], tmp_path: Path) -> None:
    config = write_config(tmp_path / "nomodel.yaml", triton__models=["NoSuchModel"])
    proc = run_tool({**tool_env, "CONFIG": str(config)}, "check-config")
    assert proc.returncode == 1
    have = ", ".join(sorted(p.name for p in TRITON_MODELS.iterdir() if (p / "config.pbtxt").is_file()))
    assert proc.stderr.strip() == (
        f"error: nomodel.yaml: triton.models: no model folder 'NoSuchModel' in {TRITON_MODELS} (have: {have})"
    )
    assert run_tool(tool_env, "check-config").returncode == 0
