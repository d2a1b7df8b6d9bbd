"""deploy / health / model-stats against the real tritonserver with the CPU stand-in for vLLM.

One server for the module: it starts with no model loaded, then the tool's deploy target loads
every production folder of triton_models/ through the repository API and waits for ready.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from gpuhost_testlib import NVIDIA_TRITON, ROOT, TRITON_MODELS, assert_no_secrets, foreign_http, run_tool

launcher = pytest.importorskip("localtriton.launcher")

ALL = sorted(p.name for p in TRITON_MODELS.iterdir() if (p / "config.pbtxt").is_file())


@dataclass
class Deployed:
    repo: Path
    http_url: str
    metrics_url: str
    deploy: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    repo = tmp_path_factory.mktemp("repo")
    for name in ALL:
        shutil.copytree(TRITON_MODELS / name, repo / name)
    # A folder with a misspelt engine argument, to see how a failed load is reported.
    shutil.copytree(TRITON_MODELS / ALL[0], repo / "broken-model")
    args = json.loads((repo / "broken-model" / "1" / "model.json").read_text())
    args["max_num_seqz"] = 8
    (repo / "broken-model" / "1" / "model.json").write_text(json.dumps(args))

    with launcher.LocalTriton(model_repository=repo, models=[]) as server:
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": str(tmp_path_factory.mktemp("home")),
            "PYTHONPATH": str(NVIDIA_TRITON),
            "TRITON_URL": server.http_url,
            "MODELS_DIR": str(repo),
            "MODELS": ",".join(ALL),
            "SKIP_COPY": "1",
            "TIMEOUT": "60",
        }
        proc = run_tool(env, "deploy-models-tritonserver", timeout=120)
        yield Deployed(repo, server.http_url, server.metrics_url, proc)


def tool(d: Deployed, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(NVIDIA_TRITON),
        "TRITON_URL": d.http_url,
        "TRITON_METRICS_URL": d.metrics_url,
        "HF_TOKEN": "hf_should_never_show_1234",
    }
    return run_tool({**base, **env}, *args)


def test_deploy_loads_every_production_folder_and_waits(deployed: Deployed) -> None:
    proc = deployed.deploy
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ALL:
        assert f"loading {name}" in proc.stdout
        assert f"  {name}: ready in " in proc.stdout
    assert proc.stdout.strip().endswith(f"deployed: {', '.join(ALL)}")
    index = httpx.post(f"{deployed.http_url}/v2/repository/index", json={}).json()
    states = {m["name"]: m.get("state") for m in index}
    assert all(states[name] == "READY" for name in ALL)


def test_health_says_healthy(deployed: Deployed) -> None:
    proc = tool(deployed, "check-health-tritonserver", MODELS=",".join(ALL))
    assert proc.returncode == 0, proc.stdout
    lines = proc.stdout.splitlines()
    assert lines[0] == f"server {deployed.http_url}: live=yes ready=yes"
    for name in ALL:
        assert f"  model {name}: ready [READY]" in lines
    assert lines[-1] == "healthy"


def test_health_names_the_model_that_is_not_ready(deployed: Deployed) -> None:
    proc = tool(deployed, "check-health-tritonserver", MODELS=f"{ALL[0]},not-a-model")
    assert proc.returncode == 1
    assert f"  model {ALL[0]}: ready [READY]" in proc.stdout
    assert "  model not-a-model: NOT ready [not loaded]" in proc.stdout
    assert proc.stdout.splitlines()[-1] == "NOT healthy"


def test_health_without_server(deployed: Deployed) -> None:
    proc = tool(deployed, "check-health-tritonserver", TRITON_URL="http://127.0.0.1:9")
    assert proc.returncode == 1
    assert "NOT healthy: cannot reach Triton at http://127.0.0.1:9" in proc.stdout
    assert "ssh-tunnels-tritonserver" in proc.stdout


def test_model_stats_show_counts_latency_and_tokens(deployed: Deployed) -> None:
    model = "Qwen2.5-1.5B-Instruct-AWQ"
    for _ in range(3):
        r = httpx.post(
            f"{deployed.http_url}/v2/models/{model}/generate",
            json={
                "text_input": "one two three four",
                "max_tokens": 5,
                "ignore_eos": True,
                "exclude_input_in_output": True,
            },
            timeout=30,
        )
        assert r.status_code == 200, r.text
    proc = tool(deployed, "check-model-stats-tritonserver")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:6] == ["model", "ver", "ok", "failed", "queue", "ms"]
    (row,) = [line.split() for line in lines if line.startswith(model + " ")]
    assert row[1:4] == ["1", "3", "0"]
    assert float(row[5]) > 0  # mean ms per request
    assert int(row[6]) > 0 and int(row[7]) == 15  # vLLM prompt / generation token totals
    idle = next(line.split() for line in lines if line.startswith("Qwen2.5-14B-Instruct-AWQ "))
    assert idle[2] == "0" and idle[4] == "-"
    assert_no_secrets(proc.stdout, proc.stderr)


def test_model_stats_without_server(deployed: Deployed) -> None:
    proc = tool(deployed, "check-model-stats-tritonserver", TRITON_URL="http://127.0.0.1:9")
    assert proc.returncode == 1
    assert "cannot read statistics from http://127.0.0.1:9" in proc.stdout


def test_model_stats_with_a_metrics_url_that_is_not_prometheus(deployed: Deployed) -> None:
    with foreign_http(200) as url:
        proc = tool(deployed, "check-model-stats-tritonserver", TRITON_METRICS_URL=url)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[0].split()[:3] == ["model", "ver", "ok"]
    assert f"metrics unavailable: {url} is not Prometheus text (check TRITON_METRICS_URL)" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_make_target_reads_triton_url(deployed: Deployed) -> None:
    proc = subprocess.run(
        [
            "make",
            "-s",
            "-C",
            str(NVIDIA_TRITON),
            "check-health-tritonserver",
            f"TRITON_URL={deployed.http_url}",
        ],
        env={"PATH": "/usr/bin:/bin", "HOME": "/tmp", "PYTHON": str(ROOT / ".venv" / "bin" / "python")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[-1] == "healthy"


def test_deploy_reports_a_failed_load(deployed: Deployed) -> None:
    """Last in the module: the failed model leaves the server not ready, as Triton does."""
    proc = tool(
        deployed,
        "deploy-models-tritonserver",
        MODELS="broken-model",
        SKIP_COPY="1",
        MODELS_DIR=str(deployed.repo),
    )
    assert proc.returncode == 1
    assert "broken-model: FAILED to load:" in proc.stdout
    assert "max_num_seqz" in proc.stdout
    # A failed model makes the whole server not ready (Triton's rule): health says which one.
    health = tool(deployed, "check-health-tritonserver")
    assert health.returncode == 1
    assert "ready=NO" in health.stdout and "broken-model: NOT ready [UNAVAILABLE]" in health.stdout
