"""The exact ssh / scp command lines of the ssh targets, under DRY_RUN (nothing runs, nothing is sent)."""

from __future__ import annotations

import shlex

from gpuhost_testlib import TRITON_MODELS, FakeVast, assert_no_secrets, run_tool

SSH = "ssh -p 41022 -o StrictHostKeyChecking=accept-new -o ServerAliveInterval=30 -o ServerAliveCountMax=4"


def dry(tool_env: dict[str, str], *args: str, **env: str) -> list[str]:
    proc = run_tool({**tool_env, "DRY_RUN": "1", "SSH_URL": "ssh://root@203.0.113.7:41022", **env}, *args)
    assert proc.returncode == 0, proc.stderr
    assert_no_secrets(proc.stdout, proc.stderr)
    return proc.stdout.splitlines()


def commands(lines: list[str]) -> list[list[str]]:
    return [shlex.split(line.removeprefix("DRY_RUN: ")) for line in lines if line.startswith("DRY_RUN: ")]


def test_ssh_instance(fake_vast: FakeVast, tool_env: dict[str, str]) -> None:
    (cmd,) = commands(dry(tool_env, "ssh-instance", SSH_OPTS="-i /keys/vast"))
    assert shlex.join(cmd) == f"{SSH} -i /keys/vast root@203.0.113.7"
    assert fake_vast.requests == []


def test_tunnels_print_triton_urls_and_forward_to_loopback(
    fake_vast: FakeVast, tool_env: dict[str, str]
) -> None:
    lines = dry(tool_env, "ssh-tunnels-tritonserver")
    assert "TRITON_URL=http://127.0.0.1:8000" in lines
    assert "TRITON_GRPC_URL=127.0.0.1:8001" in lines
    (cmd,) = commands(lines)
    assert cmd[:4] == ["ssh", "-N", "-o", "ExitOnForwardFailure=yes"]
    forwards = [cmd[i + 1] for i, a in enumerate(cmd) if a == "-L"]
    assert forwards == [f"127.0.0.1:{p}:localhost:{p}" for p in (8000, 8001, 8002)]
    assert cmd[-1] == "root@203.0.113.7"
    assert cmd[cmd.index("-p") + 1] == "41022"


def test_run_tritonserver_remote_command(fake_vast: FakeVast, tool_env: dict[str, str]) -> None:
    (cmd,) = commands(dry(tool_env, "run-tritonserver", LOAD_MODELS="Qwen2.5-7B-Instruct-AWQ"))
    assert shlex.join(cmd[:-1]) == f"{SSH} root@203.0.113.7"
    remote = cmd[-1]
    assert ". /root/.container_env" in remote
    assert "export PATH=/opt/tritonserver/bin:$PATH" in remote
    assert (
        "nohup tritonserver --model-repository=/workspace/triton_models --model-control-mode=explicit "
        "--load-model=Qwen2.5-7B-Instruct-AWQ --http-port=8000 --grpc-port=8001 --metrics-port=8002 "
        "--http-address=127.0.0.1 --grpc-address=127.0.0.1 --metrics-address=127.0.0.1 "
        "> /workspace/triton.log 2>&1 < /dev/null &"
    ) in remote
    assert "if pgrep -x tritonserver" in remote  # a second run does not start a second server


def test_deploy_copies_then_loads(fake_vast: FakeVast, tool_env: dict[str, str]) -> None:
    lines = dry(
        tool_env, "deploy-models-tritonserver", MODELS="Qwen2.5-1.5B-Instruct-AWQ,Qwen2.5-7B-Instruct-AWQ"
    )
    mkdir, scp = commands(lines[:2])
    assert shlex.join(mkdir) == f"{SSH} root@203.0.113.7 'mkdir -p /workspace/triton_models'"
    assert scp == [
        "scp",
        "-r",
        "-P",
        "41022",
        "-o",
        "StrictHostKeyChecking=accept-new",
        "-o",
        "ServerAliveInterval=30",
        "-o",
        "ServerAliveCountMax=4",
        str(TRITON_MODELS / "Qwen2.5-1.5B-Instruct-AWQ"),
        str(TRITON_MODELS / "Qwen2.5-7B-Instruct-AWQ"),
        "root@203.0.113.7:/workspace/triton_models/",
    ]
    assert lines[2:] == [
        "DRY_RUN: POST http://127.0.0.1:8000/v2/repository/models/Qwen2.5-1.5B-Instruct-AWQ/load",
        "DRY_RUN: GET http://127.0.0.1:8000/v2/models/Qwen2.5-1.5B-Instruct-AWQ/ready (until 200, up to 1800 s)",
        "DRY_RUN: POST http://127.0.0.1:8000/v2/repository/models/Qwen2.5-7B-Instruct-AWQ/load",
        "DRY_RUN: GET http://127.0.0.1:8000/v2/models/Qwen2.5-7B-Instruct-AWQ/ready (until 200, up to 1800 s)",
    ]


def test_deploy_defaults_to_yaml_models_and_rejects_unknown(
    fake_vast: FakeVast, tool_env: dict[str, str]
) -> None:
    lines = dry(tool_env, "deploy-models-tritonserver", SKIP_COPY="1")
    assert lines == [
        "DRY_RUN: POST http://127.0.0.1:8000/v2/repository/models/DeepSeek-R1-Distill-Qwen-1.5B/load",
        "DRY_RUN: GET http://127.0.0.1:8000/v2/models/DeepSeek-R1-Distill-Qwen-1.5B/ready (until 200, up to 1800 s)",
    ]
    proc = run_tool({**tool_env, "DRY_RUN": "1", "MODELS": "Llama-9000"}, "deploy-models-tritonserver")
    assert proc.returncode == 1
    assert "no model folder 'Llama-9000'" in proc.stderr


def test_deploy_warns_when_models_overcommit_one_gpu(fake_vast: FakeVast, tool_env: dict[str, str]) -> None:
    proc = run_tool(
        {
            **tool_env,
            "DRY_RUN": "1",
            "SKIP_COPY": "1",
            "MODELS": "DeepSeek-R1-Distill-Qwen-1.5B Qwen2.5-14B-Instruct-AWQ",
        },
        "deploy-models-tritonserver",
    )
    assert proc.returncode == 0
    assert "ask for 1.93 of one GPU's memory" in proc.stderr


def test_logs_over_ssh(fake_vast: FakeVast, tool_env: dict[str, str]) -> None:
    (cmd,) = commands(dry(tool_env, "check-logs-tritonserver", TAIL="50", FOLLOW="1"))
    assert cmd[-1] == "tail -n 50 -F /workspace/triton.log"


def test_dry_run_without_ssh_url_prints_the_lookup(fake_vast: FakeVast, tool_env: dict[str, str]) -> None:
    proc = run_tool({**tool_env, "DRY_RUN": "1", "CONTRACT_ID": "4242"}, "ssh-instance")
    assert proc.returncode == 0, proc.stderr
    first, second = commands(proc.stdout.splitlines())
    assert first[1:] == ["ssh-url", "4242"]
    assert second[-1] == "root@<ssh-host-of-4242>"
    assert fake_vast.requests == []


def test_ssh_targets_need_a_contract(fake_vast: FakeVast, tool_env: dict[str, str]) -> None:
    proc = run_tool(tool_env, "run-tritonserver")
    assert proc.returncode == 1
    assert "CONTRACT_ID is required" in proc.stderr


def test_make_forwards_variables(fake_vast: FakeVast, tool_env: dict[str, str]) -> None:
    """The Makefile only calls the tool: variables given to make reach it, secrets stay hidden."""
    import subprocess

    from gpuhost_testlib import NVIDIA_TRITON, ROOT

    env = {**tool_env, "PYTHON": str(ROOT / ".venv" / "bin" / "python")}
    proc = subprocess.run(
        ["make", "-s", "-C", str(NVIDIA_TRITON), "create-instance", "INSTANCE_ID=77", "DRY_RUN=1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "create instance 77 --image" in proc.stdout
    assert "HF_TOKEN=***" in proc.stdout
    assert_no_secrets(proc.stdout, proc.stderr)
    helped = subprocess.run(["make", "-s", "-C", str(NVIDIA_TRITON), "help"], capture_output=True, text=True)
    for target in (
        "search-instance",
        "create-instance",
        "list-instances",
        "ssh-instance",
        "run-tritonserver",
        "ssh-tunnels-tritonserver",
        "deploy-models-tritonserver",
        "check-health-tritonserver",
        "check-logs-tritonserver",
        "check-model-stats-tritonserver",
        "destroy-instance",
    ):
        assert f"  {target} " in helped.stdout


def test_remote_snippets_are_valid_shell() -> None:
    """What run-tritonserver and the yaml's onstart run on the instance at least parses in bash and sh."""
    import subprocess

    from gpuhost.config import load
    from gpuhost.remote import start_tritonserver_cmd, tail_log_cmd
    from gpuhost_testlib import NVIDIA_TRITON

    d = load(NVIDIA_TRITON / "vastai_instance_definition.yaml")
    # No authentication in Triton: it listens on the instance's loopback, for the ssh tunnel.
    for flag in ("--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1"):
        assert flag in start_tritonserver_cmd(d.triton, ["a"])
    for script in (
        start_tritonserver_cmd(d.triton, ["a", "b"]),
        d.instance.onstart,
        tail_log_cmd("/x", 5, True),
    ):
        for shell in ("bash", "sh"):
            proc = subprocess.run([shell, "-n", "-c", script], capture_output=True, text=True)
            assert proc.returncode == 0, (shell, script, proc.stderr)
