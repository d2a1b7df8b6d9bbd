"""Start the real tritonserver (from the nvidia-pytriton wheel) with the simulated vLLM backend."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import IO

import httpx

PACKAGE_DIR = Path(__file__).resolve().parent
TOOLS_DIR = PACKAGE_DIR.parent  # nvidia_triton/: where `localtriton` is importable from
BUILTIN_REPOSITORY = PACKAGE_DIR / "models"
BACKEND_SOURCE = PACKAGE_DIR / "backend" / "vllm" / "model.py"
SHM_DIR = Path("/dev/shm")
SHM_PREFIX_STEM = "localtriton"
STUB_NAME = "triton_python_backend_stub"


class LocalTritonError(RuntimeError):
    """tritonserver failed to start or a model failed to load; the message has the log tail."""


def pytriton_paths() -> tuple[Path, Path]:
    """(pytriton/tritonserver dir, nvidia_pytriton.libs dir) of the installed wheel."""
    import pytriton  # imported lazily: only the launcher needs the wheel

    server_dir = Path(pytriton.__file__).resolve().parent / "tritonserver"
    libs = Path(pytriton.__file__).resolve().parent.parent / "nvidia_pytriton.libs"
    if not (server_dir / "bin" / "tritonserver").is_file():
        raise LocalTritonError(f"no tritonserver binary under {server_dir}: install nvidia-pytriton==0.7.0")
    return server_dir, libs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_backend_dir(dest: Path) -> Path:
    """python/ (backend lib, utils, stub for this Python) + vllm/model.py (our simulator)."""
    server_dir, _ = pytriton_paths()
    python_dir = dest / "python"
    python_dir.mkdir(parents=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy2(server_dir / "backends" / "python" / name, python_dir / name)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = server_dir / "python_backend_stubs" / version / STUB_NAME
    if not stub.is_file():
        raise LocalTritonError(f"nvidia-pytriton has no Python backend stub for Python {version}")
    shutil.copy2(stub, python_dir / STUB_NAME)
    (dest / "vllm").mkdir()
    shutil.copy2(BACKEND_SOURCE, dest / "vllm" / "model.py")
    return dest


def server_env(prefill_ms: float | None, decode_ms: float | None) -> dict[str, str]:
    _, libs = pytriton_paths()
    env = dict(os.environ)
    # The stub must load this interpreter's libpython (not the system one: its stdlib differs)
    # and the wheel's bundled libraries (libcudart etc.).
    lib_paths = [str(sysconfig.get_config_var("LIBDIR")), str(libs)]
    if env.get("LD_LIBRARY_PATH"):
        lib_paths.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(lib_paths)
    # The stub finds site-packages (numpy, this project) through `python3` on PATH.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["LOCALTRITON_TOOLS_DIR"] = str(TOOLS_DIR)
    for name, value in (("SIM_PREFILL_MS", prefill_ms), ("SIM_DECODE_MS", decode_ms)):
        env.pop(name, None)  # only an explicit override may beat config.pbtxt
        if value is not None:
            env[name] = repr(float(value))
    return env


def repository_models(repository: Path) -> list[str]:
    return sorted(p.name for p in repository.iterdir() if (p / "config.pbtxt").is_file())


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (the python backend stubs of a tritonserver)."""
    children: list[int] = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def kill_pids(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def remove_shm(prefix: str) -> None:
    for path in SHM_DIR.glob(f"{prefix}*"):
        with contextlib.suppress(OSError):
            path.unlink()


class LocalTriton:
    """A tritonserver serving a model repository through the simulated vLLM backend."""

    def __init__(
        self,
        model_repository: Path | None = None,
        models: list[str] | None = None,
        http_port: int = 0,
        grpc_port: int = 0,
        metrics_port: int = 0,
        prefill_ms: float | None = None,
        decode_ms: float | None = None,
        log_file: Path | None = None,
        ready_timeout: float = 60.0,
        exit_timeout: int = 5,
    ) -> None:
        self.model_repository = Path(model_repository or BUILTIN_REPOSITORY).resolve()
        self.models = list(models) if models is not None else repository_models(self.model_repository)
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.prefill_ms = prefill_ms
        self.decode_ms = decode_ms
        self.log_file = log_file
        self.ready_timeout = ready_timeout
        # tritonserver 2.51 can keep a model referenced after many gRPC streams were cancelled by
        # their clients (e.g. breaking out of grpc.aio stream_infer): don't wait its default 30 s.
        self.exit_timeout = exit_timeout
        self.pid: int | None = None
        self.shm_prefix = f"{SHM_PREFIX_STEM}-{uuid.uuid4().hex[:12]}-"
        self._proc: subprocess.Popen[bytes] | None = None
        self._run_dir: Path | None = None
        self._log_path: Path | None = None
        self._log_handle: IO[bytes] | None = None
        self._stub_pids: set[int] = set()  # remembered: a crashed server's stubs get re-parented

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def command(self, backend_dir: Path) -> list[str]:
        server_dir, _ = pytriton_paths()
        cmd = [
            str(server_dir / "bin" / "tritonserver"),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backend_dir}",
            "--model-control-mode=explicit",
            *(f"--load-model={m}" for m in self.models),
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            "--allow-metrics=true",
            f"--exit-timeout-secs={self.exit_timeout}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            "--log-verbose=0",
        ]
        return cmd

    def start(self) -> LocalTriton:
        if self._proc is not None:
            raise LocalTritonError("already started")
        parent = os.environ.get("LOCALTRITON_RUN_DIR")
        if parent:
            Path(parent).mkdir(parents=True, exist_ok=True)
        self._run_dir = Path(tempfile.mkdtemp(prefix="localtriton-", dir=parent or None))
        self._log_path = self.log_file or self._run_dir / "tritonserver.log"
        atexit.register(self.stop)
        try:
            backend_dir = build_backend_dir(self._run_dir / "backends")
            self._log_handle = open(self._log_path, "ab")  # noqa: SIM115 - lives as long as the server
            self._proc = subprocess.Popen(
                self.command(backend_dir),
                env=server_env(self.prefill_ms, self.decode_ms),
                stdout=self._log_handle,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self._run_dir,
                start_new_session=True,  # Ctrl-C in a terminal goes to us; we stop the server
            )
            self.pid = self._proc.pid
            self._wait_ready()
            self._stub_pids.update(p for p in child_pids(self.pid) if _is_stub(p))
        except BaseException:
            self.stop()  # no stray server, stubs or shm when the start fails
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        pending = ["/v2/health/ready", *(f"/v2/models/{m}/ready" for m in self.models)]
        with httpx.Client(base_url=self.http_url, timeout=2.0) as client:
            while pending:
                assert self._proc is not None
                code = self._proc.poll()
                if code is not None:
                    raise LocalTritonError(f"tritonserver exited with code {code}:\n{self.log_tail()}")
                if time.monotonic() > deadline:
                    raise LocalTritonError(
                        f"tritonserver not ready after {self.ready_timeout:.0f}s (waiting for {pending[0]}):\n"
                        f"{self.log_tail()}"
                    )
                try:
                    ready = client.get(pending[0]).status_code == 200
                except httpx.HTTPError:
                    ready = False
                if ready:
                    pending.pop(0)
                else:
                    time.sleep(0.1)

    def exited(self) -> bool:
        return self._proc is None or self._proc.poll() is not None

    def log_tail(self, lines: int = 40) -> str:
        if self._log_path is None or not self._log_path.is_file():
            return ""
        text = self._log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the server, its stubs, shm regions and run dir. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None:
            stubs = self._stub_pids | set(child_pids(proc.pid))
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            # Stubs of a crashed server ignore SIGTERM and get re-parented: kill the ones we saw.
            kill_pids([p for p in stubs if _is_stub(p)])
            self._stub_pids.clear()
        remove_shm(self.shm_prefix)
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        if self._run_dir is not None:
            shutil.rmtree(self._run_dir, ignore_errors=True)
            self._run_dir = None
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)

    def __enter__(self) -> LocalTriton:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _is_stub(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip().startswith(STUB_NAME[:15])
    except OSError:
        return False


def cleanup_stale() -> tuple[list[int], list[Path]]:
    """Kill orphaned stubs (re-parented after their server died) and remove our stale shm regions.

    Only touches stubs whose shm region prefix is ours and whose tritonserver is gone.
    """
    killed: list[int] = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        pid = int(cmdline.parent.name)
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if not argv or not argv[0].endswith(STUB_NAME.encode()):
            continue
        if not any(SHM_PREFIX_STEM.encode() in a for a in argv) or _server_alive(pid):
            continue
        kill_pids([pid])
        killed.append(pid)
    live_prefixes = {a for pid in _server_pids() for a in _shm_prefixes_of(pid)}
    removed = [
        p
        for p in SHM_DIR.glob(f"{SHM_PREFIX_STEM}-*")
        if not any(p.name.startswith(x) for x in live_prefixes)
    ]
    for path in removed:
        with contextlib.suppress(OSError):
            path.unlink()
    return killed, removed


def _server_pids() -> list[int]:
    pids = []
    for comm in Path("/proc").glob("[0-9]*/comm"):
        with contextlib.suppress(OSError):
            if comm.read_text().strip() == "tritonserver":
                pids.append(int(comm.parent.name))
    return pids


def _shm_prefixes_of(pid: int) -> list[str]:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []
    marker = "shm-region-prefix-name="
    return [a.split(marker, 1)[1] for a in argv if marker in a]


def _server_alive(stub_pid: int) -> bool:
    try:
        ppid = int(Path(f"/proc/{stub_pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return False
    return ppid in _server_pids()
