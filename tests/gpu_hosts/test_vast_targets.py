"""The Vast.ai targets through the real vastai CLI (1.9.1) against a local stand-in for its REST API."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from gpuhost.runner import Runner, known_secrets
from gpuhost.vast import Vast
from gpuhost_testlib import (
    API_KEY,
    CONTRACT,
    HF_TOKEN,
    FakeVast,
    assert_no_secrets,
    instance_row,
    offer,
    run_tool,
)


def test_search_sends_yaml_filters_and_lists_cheapest_first(
    fake_vast: FakeVast, tool_env: dict[str, str]
) -> None:
    fake_vast.offers = [
        offer(301, "RTX 4090", 0.52),
        offer(302, "RTX 3090", 0.21),
        # Violates the yaml (CUDA too old for the 24.12 image): dropped even if the server sends it.
        offer(303, "RTX 4090", 0.10, cuda_max_good=12.2),
        offer(304, "RTX A5000", 0.33),
    ]
    proc = run_tool(tool_env, "search-instance")
    assert proc.returncode == 0, proc.stderr

    (req,) = fake_vast.calls("POST", "/api/v0/bundles/")
    assert req.headers["Authorization"] == f"Bearer {API_KEY}"
    q = req.body
    assert q["gpu_name"] == {"in": ["RTX 4090", "RTX 3090", "RTX A5000"]}
    assert q["num_gpus"] == {"eq": "1"}
    assert q["gpu_ram"] == {"gte": 24000.0}
    assert q["cuda_max_good"] == {"gte": "12.6"}
    assert q["disk_space"] == {"gte": "80"}
    assert q["reliability"] == {"gte": "0.98"}
    assert q["direct_port_count"] == {"gte": "1"}
    assert q["dph_total"] == {"lte": "1"}
    assert q["order"] == [["dph_total", "asc"]]
    assert q["limit"] == 10
    assert q["allocated_storage"] == 80.0

    rows = [line.split()[0] for line in proc.stdout.splitlines()[1:] if line.split()[0].isdigit()]
    assert rows == ["302", "304", "301"]
    assert "make create-instance OFFER_ID=302" in proc.stdout
    assert_no_secrets(proc.stdout, proc.stderr)


def test_search_with_no_match_says_so(fake_vast: FakeVast, tool_env: dict[str, str]) -> None:
    proc = run_tool(tool_env, "search-instance")
    assert proc.returncode == 1
    assert "no offers match" in proc.stdout


def test_create_polls_until_running_and_prints_contract(
    fake_vast: FakeVast, tool_env: dict[str, str]
) -> None:
    proc = run_tool(tool_env, "create-instance", "--offer-id", "301")
    assert proc.returncode == 0, proc.stderr

    (create,) = fake_vast.calls("PUT", "/api/v0/asks/")
    assert create.path == "/api/v0/asks/301/"
    body = create.body
    assert body["image"] == "nvcr.io/nvidia/tritonserver:24.12-vllm-python-py3"
    assert body["disk"] == 80.0
    assert body["label"] == "llm-jobqueue-triton"
    assert body["runtype"] == "ssh_direc ssh_proxy"
    assert body["cancel_unavail"] is True
    # Env in the one --env string, no port published (Triton is reached through the ssh tunnel);
    # the token reaches Vast.ai, nowhere else.
    assert not [name for name in body["env"] if name.startswith("-p")]
    assert body["env"]["HF_TOKEN"] == HF_TOKEN
    assert body["env"]["HF_HOME"] == "/workspace/hf"
    assert "export -p > /root/.container_env" in body["onstart"]

    shows = fake_vast.calls("GET", f"/api/v0/instances/{CONTRACT}/")
    assert len(shows) == 3
    assert shows[0].query["owner"] == ["me"]
    assert "instance 4242: loading" in proc.stderr
    assert "instance 4242: running" in proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == f"CONTRACT_ID={CONTRACT}"
    assert "$0.412/hour" in proc.stdout
    assert_no_secrets(proc.stdout, proc.stderr)


def test_instance_id_is_an_alias_of_offer_id(fake_vast: FakeVast, tool_env: dict[str, str]) -> None:
    proc = run_tool({**tool_env, "INSTANCE_ID": "555", "DRY_RUN": "1"}, "create-instance")
    assert proc.returncode == 0, proc.stderr
    assert " create instance 555 --image " in proc.stdout

    proc = run_tool({**tool_env, "INSTANCE_ID": "555", "OFFER_ID": "556"}, "create-instance")
    assert proc.returncode == 1
    assert "disagree" in proc.stderr
    assert fake_vast.requests == []


def test_failed_create_is_a_clear_error(fake_vast: FakeVast, tool_env: dict[str, str]) -> None:
    fake_vast.create_reply = (
        400,
        {"success": False, "error": "invalid_args", "msg": "offer 301 is no longer available"},
    )
    proc = run_tool(tool_env, "create-instance", "--offer-id", "301")
    assert proc.returncode == 1
    assert "create instance from offer 301 failed: HTTP 400: offer 301 is no longer available" in proc.stderr
    assert not fake_vast.calls("GET", "/api/v0/instances/")
    assert_no_secrets(proc.stdout, proc.stderr)


def test_instance_that_exits_fails_with_next_steps(fake_vast: FakeVast, tool_env: dict[str, str]) -> None:
    fake_vast.statuses = ["exited"]
    proc = run_tool(tool_env, "create-instance", "--offer-id", "301")
    assert proc.returncode == 1
    assert "instance 4242 is 'exited' and will not start" in proc.stderr
    assert "destroy-instance CONTRACT_ID=4242" in proc.stderr


def test_a_passing_api_error_while_waiting_is_retried(fake_vast: FakeVast, tool_env: dict[str, str]) -> None:
    fake_vast.statuses = [500, "running"]
    proc = run_tool(tool_env, "create-instance", "--offer-id", "301")
    assert proc.returncode == 0, proc.stderr
    assert "warning: show instance 4242 failed: HTTP 500: internal error; retrying" in proc.stderr
    assert proc.stdout.strip().endswith("CONTRACT_ID=4242")


def test_wait_times_out(fake_vast: FakeVast, tool_env: dict[str, str]) -> None:
    fake_vast.statuses = ["loading"]
    proc = run_tool({**tool_env, "TIMEOUT": "0.1"}, "create-instance", "--offer-id", "301")
    assert proc.returncode == 1
    assert "instance 4242 still 'loading' after 0.1 s" in proc.stderr
    assert "It is still billed" in proc.stderr


def test_dry_run_prints_create_masked_and_sends_nothing(
    fake_vast: FakeVast, tool_env: dict[str, str]
) -> None:
    proc = run_tool({**tool_env, "DRY_RUN": "1"}, "create-instance", "--offer-id", "301")
    assert proc.returncode == 0, proc.stderr
    assert fake_vast.requests == []
    lines = [line for line in proc.stdout.splitlines() if line.startswith("DRY_RUN: ")]
    assert (
        "create instance 301 --image nvcr.io/nvidia/tritonserver:24.12-vllm-python-py3 --disk 80" in lines[0]
    )
    assert "-e HF_TOKEN=*** -e HF_HOME=/workspace/hf" in lines[0]
    assert lines[1].endswith("show instance '<new_contract>' --raw")
    assert_no_secrets(proc.stdout, proc.stderr)


def test_list_instances_shows_status_and_price(fake_vast: FakeVast, tool_env: dict[str, str]) -> None:
    fake_vast.instances = [
        instance_row(4242, "running"),
        instance_row(4243, "loading", gpu_name="RTX 3090", dph_total=0.2, label=None),
    ]
    proc = run_tool(tool_env, "list-instances")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[1].split()[:5] == ["4242", "running", "RTX", "4090", "0.412"]
    assert lines[2].split()[:5] == ["4243", "loading", "RTX", "3090", "0.200"]
    assert lines[1].split()[-1] == "203.0.113.7:41022"  # the direct ssh address
    assert "running total: $0.412/hour" in proc.stdout
    assert fake_vast.calls("GET", "/api/v1/instances/")
    assert_no_secrets(proc.stdout, proc.stderr)


def test_ssh_url_missing_is_a_clear_error(fake_vast: FakeVast, tool_env: dict[str, str]) -> None:
    # A loading instance has neither direct ports nor an ssh proxy yet.
    fake_vast.instances = [instance_row(4242, "loading", ports={}, ssh_host=None, ssh_port=None)]
    proc = run_tool({**tool_env, "CONTRACT_ID": "4242"}, "ssh-tunnels-tritonserver")
    assert proc.returncode == 1
    assert "no ssh address for instance 4242" in proc.stderr
    assert "error: ssh port not found" in proc.stderr


def test_ssh_url_gives_the_direct_address(
    fake_vast: FakeVast, tool_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_vast.instances = [instance_row(4242, "running")]
    for key, value in tool_env.items():
        monkeypatch.setenv(key, value)
    target = Vast(Runner()).ssh_target(4242)
    assert (target.user, target.host, target.port) == ("root", "203.0.113.7", 41022)
    assert fake_vast.calls("GET", "/api/v1/instances/")


def test_destroy_asks_first(fake_vast: FakeVast, tool_env: dict[str, str]) -> None:
    env = {**tool_env, "CONTRACT_ID": "4242"}
    proc = run_tool(env, "destroy-instance", stdin="")
    assert proc.returncode == 1
    assert "aborted: instance 4242 kept" in proc.stderr
    assert not fake_vast.calls("DELETE", "/api/v0/instances/")

    proc = run_tool(env, "destroy-instance", stdin="n\n")
    assert proc.returncode == 1
    assert not fake_vast.calls("DELETE", "/api/v0/instances/")

    proc = run_tool(env, "destroy-instance", stdin="y\n")
    assert proc.returncode == 0, proc.stderr
    assert [r.path for r in fake_vast.calls("DELETE", "/api/v0/instances/")] == ["/api/v0/instances/4242/"]
    assert "instance 4242 destroyed" in proc.stdout


def test_destroy_with_confirmation_given(fake_vast: FakeVast, tool_env: dict[str, str]) -> None:
    proc = run_tool(tool_env, "destroy-instance", "--contract-id", "4243", "--yes")
    assert proc.returncode == 0, proc.stderr
    assert [r.path for r in fake_vast.calls("DELETE", "/api/v0/instances/")] == ["/api/v0/instances/4243/"]
    # CONFIRM=yes (the make variable) skips the question too; DRY_RUN shows the call it would make.
    proc = run_tool({**tool_env, "CONTRACT_ID": "4242", "CONFIRM": "yes", "DRY_RUN": "1"}, "destroy-instance")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("destroy instance 4242 -y")
    assert len(fake_vast.calls("DELETE", "/api/v0/instances/")) == 1


def test_destroy_failure_is_reported(fake_vast: FakeVast, tool_env: dict[str, str]) -> None:
    fake_vast.destroy_reply = (404, {"success": False, "msg": "no such instance"})
    proc = run_tool({**tool_env, "CONFIRM": "yes"}, "destroy-instance", "--contract-id", "9")
    assert proc.returncode == 1
    assert "destroy instance 9 failed: 404: no such instance" in proc.stderr


def test_container_logs_through_vastai(fake_vast: FakeVast, tool_env: dict[str, str]) -> None:
    env = {**tool_env, "CONTRACT_ID": "4242", "SOURCE": "vast", "TAIL": "50"}
    proc = run_tool(env, "check-logs-tritonserver")
    assert proc.returncode == 0, proc.stderr
    (req,) = fake_vast.calls("PUT", "/api/v0/instances/request_logs/")
    assert req.path == "/api/v0/instances/request_logs/4242/"
    assert req.body == {"tail": "50"}
    assert "container log line 2" in proc.stdout


def test_unreachable_api_is_a_clear_error(tool_env: dict[str, str]) -> None:
    proc = run_tool({**tool_env, "VAST_URL": "http://127.0.0.1:9"}, "list-instances")
    assert proc.returncode == 1
    assert "show instances failed: cannot reach the Vast.ai API" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_key_from_vastai_key_file_is_masked_too(
    tool_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    key_file = Path(tool_env["XDG_CONFIG_HOME"]) / "vastai" / "vast_api_key"
    key_file.parent.mkdir(parents=True)
    key_file.write_text("filekey-9876543210\n")
    monkeypatch.setenv("XDG_CONFIG_HOME", tool_env["XDG_CONFIG_HOME"])
    monkeypatch.delenv("VAST_API_KEY", raising=False)
    runner = Runner(secrets=known_secrets())
    assert runner.mask("GET https://x/?api_key=filekey-9876543210") == "GET https://x/?api_key=***"


def test_config_path_is_reported_for_bad_yaml(tool_env: dict[str, str], tmp_path: Path) -> None:
    data = yaml.safe_load(Path(tool_env["CONFIG"]).read_text())
    data["instance"]["disk_gb"] = "lots"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    proc = run_tool({**tool_env, "CONFIG": str(bad)}, "search-instance")
    assert proc.returncode == 1
    assert "bad.yaml: instance.disk_gb: must be a number >= 20" in proc.stderr
    assert json.dumps(data)  # the test data itself stays valid JSON-able
