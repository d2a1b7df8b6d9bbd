"""ssh / scp command lines for a Vast.ai instance, and the remote shell snippets they run.

Plain OpenSSH is used (not `vastai copy`, which shells out to rsync that the image may lack).
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import PurePosixPath

from .config import TritonSpec
from .vast import SshTarget

# accept-new: the first connection to a fresh instance must not stop at a yes/no prompt,
# yet a changed key on a known host still fails. ServerAlive keeps tunnels from hanging.
BASE_OPTS = [
    "-o",
    "StrictHostKeyChecking=accept-new",
    "-o",
    "ServerAliveInterval=30",
    "-o",
    "ServerAliveCountMax=4",
]
TRITON_PORTS = (8000, 8001, 8002)
# Written by the yaml's onstart: the image's environment, which ssh sessions do not inherit.
CONTAINER_ENV = "/root/.container_env"


def ssh_argv(target: SshTarget, extra_opts: Sequence[str] = (), remote_cmd: str | None = None) -> list[str]:
    argv = ["ssh", "-p", str(target.port), *BASE_OPTS, *extra_opts, f"{target.user}@{target.host}"]
    if remote_cmd is not None:
        argv.append(remote_cmd)
    return argv


def tunnel_argv(
    target: SshTarget,
    extra_opts: Sequence[str] = (),
    ports: Sequence[int] = TRITON_PORTS,
    local_port_offset: int = 0,
) -> list[str]:
    """`ssh -N -L …` forwarding Triton's ports to 127.0.0.1 only (never to the whole LAN)."""
    forwards: list[str] = []
    for port in ports:
        forwards += ["-L", f"127.0.0.1:{port + local_port_offset}:localhost:{port}"]
    return [
        "ssh",
        "-N",
        # Exit at once if a local port is taken instead of running a tunnel that forwards nothing.
        "-o",
        "ExitOnForwardFailure=yes",
        *forwards,
        "-p",
        str(target.port),
        *BASE_OPTS,
        *extra_opts,
        f"{target.user}@{target.host}",
    ]


def scp_argv(
    target: SshTarget, sources: Sequence[str], dest_dir: str, extra_opts: Sequence[str] = ()
) -> list[str]:
    return [
        "scp",
        "-r",
        "-P",
        str(target.port),
        *BASE_OPTS,
        *extra_opts,
        *sources,
        f"{target.user}@{target.host}:{dest_dir.rstrip('/')}/",
    ]


def _env_prelude() -> str:
    return f"if [ -f {CONTAINER_ENV} ]; then . {CONTAINER_ENV}; fi; export PATH=/opt/tritonserver/bin:$PATH"


def start_tritonserver_cmd(triton: TritonSpec, load_models: Sequence[str] = ()) -> str:
    """Start tritonserver in the background unless it runs already; fail with its log if it dies at once."""
    repo = shlex.quote(triton.model_repository)
    log = shlex.quote(triton.log_file)
    loads = " ".join(f"--load-model={shlex.quote(m)}" for m in load_models)
    server = (
        f"tritonserver --model-repository={repo} --model-control-mode=explicit {loads}".rstrip()
        + " --http-port=8000 --grpc-port=8001 --metrics-port=8002"
        # Triton has no authentication: only the ssh tunnel reaches it, never the host's network.
        + " --http-address=127.0.0.1 --grpc-address=127.0.0.1 --metrics-address=127.0.0.1"
    )
    return (
        f"{_env_prelude()}; mkdir -p {repo} $(dirname {log}); "
        "if pgrep -x tritonserver >/dev/null; then echo 'tritonserver is already running'; exit 0; fi; "
        f"nohup {server} > {log} 2>&1 < /dev/null & "
        "sleep 5; "
        'if pgrep -x tritonserver >/dev/null; then echo "tritonserver started (pid $(pgrep -x tritonserver))"; '
        f"else echo 'tritonserver exited at once; end of its log:'; tail -n 40 {log}; exit 1; fi"
    )


def mkdir_cmd(path: str) -> str:
    return f"mkdir -p {shlex.quote(path)}"


def tail_log_cmd(log_file: str, lines: int, follow: bool) -> str:
    flag = "-F" if follow else ""
    return f"tail -n {int(lines)} {flag} {shlex.quote(log_file)}".replace("  ", " ")


def remote_model_dir(triton: TritonSpec) -> str:
    return str(PurePosixPath(triton.model_repository))
