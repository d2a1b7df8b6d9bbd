"""The ssh/scp steps against a real OpenSSH server on loopback (skipped when sshd is not installed).

The "instance" is this machine: deploy copies triton_models/ over scp into a folder that a local
tritonserver (CPU stand-in for vLLM) serves, then loads the model through the repository API.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from gpuhost_testlib import NVIDIA_TRITON, TRITON_MODELS, assert_no_secrets, run_tool, write_config

SSHD = shutil.which("sshd") or next((p for p in ("/usr/sbin/sshd",) if os.path.exists(p)), None)
pytestmark = pytest.mark.skipif(
    SSHD is None or not all(shutil.which(t) for t in ("ssh", "scp", "ssh-keygen")),
    reason="OpenSSH server not installed (apt-get install openssh-server)",
)


@dataclass
class Sshd:
    url: str
    opts: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    assert SSHD is not None
    d = tmp_path_factory.mktemp("sshd")
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    # sshd refuses to start without its privilege separation directory.
    privsep = Path("/run/sshd")
    if not privsep.is_dir():
        try:
            privsep.mkdir(mode=0o755, parents=True)
        except OSError:
            pytest.skip("sshd needs /run/sshd and it cannot be created")
    port = _free_port()
    config = d / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\nPidFile {d / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPubkeyAuthentication yes\nUsePAM no\nStrictModes no\n"
        "PermitRootLogin prohibit-password\nSubsystem sftp internal-sftp\n"
    )
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.skip(f"sshd did not start: {proc.stderr.read() if proc.stderr else ''}")
            time.sleep(0.05)
    opts = f"-i {d / 'client_key'} -o IdentitiesOnly=yes -o BatchMode=yes -o UserKnownHostsFile={d / 'known_hosts'}"
    yield Sshd(f"ssh://{getpass.getuser()}@127.0.0.1:{port}", opts)
    proc.terminate()
    proc.wait(10)


def env_for(tmp_path: Path, sshd: Sshd, **overrides: object) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "PYTHONPATH": str(NVIDIA_TRITON),
        "SSH_URL": sshd.url,
        "SSH_OPTS": sshd.opts,
        "HF_TOKEN": "hf_never_printed_987654",
        "CONFIG": str(write_config(tmp_path / "instance.yaml", **overrides)),
    }


def test_deploy_copies_over_scp_then_loads(sshd: Sshd, tmp_path: Path) -> None:
    launcher = pytest.importorskip("localtriton.launcher")
    remote_repo = tmp_path / "remote" / "triton_models"
    remote_repo.mkdir(parents=True)
    model = "Qwen2.5-1.5B-Instruct-AWQ"
    env = env_for(tmp_path, sshd, triton__model_repository=str(remote_repo))
    with launcher.LocalTriton(model_repository=remote_repo, models=[]) as server:
        proc = run_tool(
            {**env, "TRITON_URL": server.http_url, "MODELS": model, "TIMEOUT": "60"},
            "deploy-models-tritonserver",
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"copied {model} to 127.0.0.1:{remote_repo}" in proc.stdout
        assert f"  {model}: ready in " in proc.stdout
        assert httpx.get(f"{server.http_url}/v2/models/{model}/ready").status_code == 200
    copied = remote_repo / model
    assert (copied / "config.pbtxt").read_text() == (TRITON_MODELS / model / "config.pbtxt").read_text()
    assert (copied / "1" / "model.json").read_text() == (
        TRITON_MODELS / model / "1" / "model.json"
    ).read_text()
    assert_no_secrets(proc.stdout, proc.stderr)


def test_logs_over_ssh(sshd: Sshd, tmp_path: Path) -> None:
    log = tmp_path / "triton.log"
    log.write_text("".join(f"line {i}\n" for i in range(10)))
    env = env_for(tmp_path, sshd, triton__log_file=str(log))
    proc = run_tool({**env, "TAIL": "3"}, "check-logs-tritonserver")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["line 7", "line 8", "line 9"]


def test_ssh_failure_is_reported(sshd: Sshd, tmp_path: Path) -> None:
    env = env_for(tmp_path, sshd)
    # Port 9 (discard): nothing listens there.
    bad_url = sshd.url.rsplit(":", 1)[0] + ":9"
    proc = run_tool(
        {**env, "SSH_URL": bad_url, "MODELS": "Qwen2.5-14B-Instruct-AWQ"}, "deploy-models-tritonserver"
    )
    assert proc.returncode == 1
    assert "error: ssh failed (exit 255)" in proc.stderr
