"""Start the real tritonserver (from the nvidia-pytriton wheel) with the project's CPU vLLM backend.

Simulated models run in any Python-backend stub. When a requested model names a real model
(``localtriton.engine_env``), every stub of the server runs in the engine virtualenv instead (its
``bin`` first on ``PATH``, its libpython on ``LD_LIBRARY_PATH``, the stub built for its Python), so
real and simulated models are served side by side.
"""

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
REAL_MODEL = "smollm2-135m-instruct"  # the built-in model served by the real vLLM engine
BACKEND_SOURCE = PACKAGE_DIR / "backend" / "vllm" / "model.py"  # + the modules next to it
SHM_DIR = Path("/dev/shm")
SHM_PREFIX_STEM = "localtriton"
STUB_NAME = "triton_python_backend_stub"
# Triton has no authentication and explicit model control: its endpoints stay on loopback unless
# an address is asked for (`LocalTriton(host=...)`, `python -m localtriton serve --host`).
DEFAULT_HOST = "127.0.0.1"
WILDCARD_HOSTS = {"0.0.0.0", "::"}


class LocalTritonError(RuntimeError):
    """tritonserver failed to start or a model failed to load; the message has the log tail."""


class EngineNotReadyError(LocalTritonError):
    """A real model was requested but the engine virtualenv or the prepared model is missing.

    ``unsupported`` is True when this machine cannot run the engine at all (not Linux x86_64, ...).
    """

    def __init__(self, message: str, unsupported: bool = False) -> None:
        super().__init__(message)
        self.unsupported = unsupported


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


def build_backend_dir(dest: Path, python_version: str | None = None) -> Path:
    """python/ (backend lib, utils, stub for the stub's Python) + vllm/ (our backend's modules).

    ``python_version`` ("3.11") is the Python the stubs run: this interpreter's by default, the
    engine virtualenv's when real models are served.
    """
    server_dir, _ = pytriton_paths()
    python_dir = dest / "python"
    python_dir.mkdir(parents=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy2(server_dir / "backends" / "python" / name, python_dir / name)
    version = python_version or f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = server_dir / "python_backend_stubs" / version / STUB_NAME
    if not stub.is_file():
        raise LocalTritonError(f"nvidia-pytriton has no Python backend stub for Python {version}")
    shutil.copy2(stub, python_dir / STUB_NAME)
    (dest / "vllm").mkdir()
    for source in sorted(BACKEND_SOURCE.parent.glob("*.py")):
        shutil.copy2(source, dest / "vllm" / source.name)
    return dest


def server_env(
    prefill_ms: float | None, decode_ms: float | None, engine: dict[str, str] | None = None
) -> dict[str, str]:
    """tritonserver's environment; ``engine`` (the engine venv's stamp) runs the stubs in that venv."""
    _, libs = pytriton_paths()
    env = dict(os.environ)
    # The stub must load its interpreter's libpython (not the system one: its stdlib differs)
    # and the wheel's bundled libraries (libcudart etc.).
    libdir = engine["libdir"] if engine else str(sysconfig.get_config_var("LIBDIR"))
    lib_paths = [libdir, str(libs)]
    if env.get("LD_LIBRARY_PATH"):
        lib_paths.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(lib_paths)
    # The stub finds site-packages (numpy, this project, vLLM) through `python3` on PATH.
    bin_dir = str(Path(engine["python"]).parent) if engine else str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
    env.pop("PYTHONHOME", None)
    env["LOCALTRITON_TOOLS_DIR"] = str(TOOLS_DIR)
    if engine:
        # vLLM starts its EngineCore with `spawn`: the stub is not a Python, this one is.
        env["LOCALTRITON_ENGINE_PYTHON"] = engine["python"]
        # Without a UTF-8 locale the embedded interpreter reads files as ASCII (torch's templates
        # then fail to load).
        env["PYTHONUTF8"] = "1"
        if "utf" not in (env.get("LC_ALL") or env.get("LANG") or "").lower():
            env["LC_ALL"] = "C.UTF-8"
        env.pop("VIRTUAL_ENV", None)
        env.pop("PYTHONPATH", None)  # the project venv's packages must not shadow the engine's
    else:
        env.pop("LOCALTRITON_ENGINE_PYTHON", None)
    for name, value in (("SIM_PREFILL_MS", prefill_ms), ("SIM_DECODE_MS", decode_ms)):
        env.pop(name, None)  # only an explicit override may beat config.pbtxt
        if value is not None:
            env[name] = repr(float(value))
    return env


def repository_models(repository: Path, real: bool = False) -> list[str]:
    """The repository's models; without ``real``, only the simulated ones (the default to serve)."""
    from localtriton import engine_env  # not at import time: `python -m localtriton.engine_env`

    names = sorted(p.name for p in repository.iterdir() if (p / "config.pbtxt").is_file())
    if real:
        return names
    real_ones = engine_env.real_models_in(repository, names)
    return [n for n in names if n not in real_ones]


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (stubs and the vLLM engine processes they spawn)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        kids = child_pids(todo.pop())
        out.extend(kids)
        todo.extend(kids)
    return out


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


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


def remove_orphan_engine_shm(since: float) -> list[Path]:
    """Remove Python multiprocessing shm (vLLM's message queues) created since ``since`` that no
    process maps any more: what a killed engine process leaves behind."""
    candidates = [p for pattern in ("psm_*", "sem.mp-*") for p in SHM_DIR.glob(pattern) if _mtime(p) >= since]
    if not candidates:
        return []
    mapped: set[str] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        with contextlib.suppress(OSError):
            mapped.update(line.split()[-1] for line in maps.read_text().splitlines() if "/dev/shm/" in line)
    removed = [p for p in candidates if str(p) not in mapped]
    for path in removed:
        with contextlib.suppress(OSError):
            path.unlink()
    return removed


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


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
        ready_timeout: float | None = None,
        exit_timeout: int = 5,
        host: str = DEFAULT_HOST,
        only_listed_models: bool = False,
    ) -> None:
        """``models`` None serves the repository's simulated models; name real ones to serve them.

        ``ready_timeout`` defaults to 60 s, or 300 s when a real model is served (engine start).
        ``host`` is the address HTTP, gRPC and metrics bind to: loopback unless another is asked for.
        ``only_listed_models`` serves a repository of ``models`` alone (links in the run dir), so
        Triton's repository index does not list the others (e.g. a real model that is not loaded).
        """
        from localtriton import engine_env

        self.model_repository = Path(model_repository or BUILTIN_REPOSITORY).resolve()
        self.models = list(models) if models is not None else repository_models(self.model_repository)
        # {name: weights folder} of the requested models served by the real vLLM engine
        self.real_models = engine_env.real_models_in(self.model_repository, self.models)
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.prefill_ms = prefill_ms
        self.decode_ms = decode_ms
        self.log_file = log_file
        self.ready_timeout = ready_timeout or (300.0 if self.real_models else 60.0)
        # tritonserver 2.51 can keep a model referenced after many gRPC streams were cancelled by
        # their clients (e.g. breaking out of grpc.aio stream_infer): don't wait its default 30 s.
        self.exit_timeout = exit_timeout
        self.host = host
        self.only_listed_models = only_listed_models
        # What tritonserver is given: a subset of model_repository in the run dir when only_listed_models.
        self.served_repository = self.model_repository
        self.pid: int | None = None
        self.shm_prefix = f"{SHM_PREFIX_STEM}-{uuid.uuid4().hex[:12]}-"
        self._proc: subprocess.Popen[bytes] | None = None
        self._run_dir: Path | None = None
        self._started_at = 0.0
        self._log_path: Path | None = None
        self._log_handle: IO[bytes] | None = None
        self._stub_pids: set[int] = set()  # remembered: a crashed server's stubs get re-parented
        # (pid, start time) of the stubs' own children (vLLM's EngineCore): killed if left behind
        self._engine_pids: set[tuple[int, str]] = set()
        self.engine: dict[str, str] | None = None  # the engine venv's stamp when real models are served

    @property
    def connect_host(self) -> str:
        """Where clients reach the server: loopback when it listens on every interface."""
        return DEFAULT_HOST if self.host in WILDCARD_HOSTS else self.host

    @property
    def http_url(self) -> str:
        return f"http://{self.connect_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.connect_host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.connect_host}:{self.metrics_port}/metrics"

    def command(self, backend_dir: Path) -> list[str]:
        server_dir, _ = pytriton_paths()
        cmd = [
            str(server_dir / "bin" / "tritonserver"),
            f"--model-repository={self.served_repository}",
            f"--backend-directory={backend_dir}",
            "--model-control-mode=explicit",
            *(f"--load-model={m}" for m in self.models),
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}",
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
        if self.real_models:
            from localtriton import engine_env

            try:
                stamp = engine_env.require_engine(self.real_models)
            except engine_env.EngineEnvError as exc:
                names = ", ".join(sorted(self.real_models))
                raise EngineNotReadyError(f"cannot serve {names}: {exc}", exc.unsupported) from exc
            self.engine = {
                "python": str(engine_env.venv_python()),
                "libdir": str(stamp["libdir"]),
                "python_version": str(stamp["python"]),
            }
        parent = os.environ.get("LOCALTRITON_RUN_DIR")
        if parent:
            Path(parent).mkdir(parents=True, exist_ok=True)
        self._run_dir = Path(tempfile.mkdtemp(prefix="localtriton-", dir=parent or None))
        self._started_at = time.time() - 1
        self._log_path = self.log_file or self._run_dir / "tritonserver.log"
        atexit.register(self.stop)
        try:
            if self.only_listed_models:
                self.served_repository = self._link_listed_models(self._run_dir / "models")
            backend_dir = build_backend_dir(
                self._run_dir / "backends", self.engine["python_version"] if self.engine else None
            )
            self._log_handle = open(self._log_path, "ab")  # noqa: SIM115 - lives as long as the server
            self._proc = subprocess.Popen(
                self.command(backend_dir),
                env=server_env(self.prefill_ms, self.decode_ms, self.engine),
                stdout=self._log_handle,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self._run_dir,
                start_new_session=True,  # Ctrl-C in a terminal goes to us; we stop the server
            )
            self.pid = self._proc.pid
            self._wait_ready()
            self._stub_pids.update(p for p in child_pids(self.pid) if _is_stub(p))
            self._remember_engine_pids()
        except BaseException:
            self.stop()  # no stray server, stubs or shm when the start fails
            raise
        return self

    def _link_listed_models(self, dest: Path) -> Path:
        dest.mkdir()
        for name in self.models:
            source = self.model_repository / name
            if not source.is_dir():
                raise LocalTritonError(f"no model {name!r} in {self.model_repository}")
            (dest / name).symlink_to(source, target_is_directory=True)
        return dest

    def _remember_engine_pids(self) -> None:
        for stub in self._stub_pids:
            for pid in descendants(stub):
                started = _start_time(pid)
                if started is not None:
                    self._engine_pids.add((pid, started))

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
            engine_pids = set(self._engine_pids)
            for stub in stubs:
                engine_pids.update((d, t) for d in descendants(stub) if (t := _start_time(d)) is not None)
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
            # vLLM's engine processes (children of a stub) end with their stub normally; not when
            # the stub was killed: end the ones we saw, if they are still the same processes.
            kill_pids([p for p, t in engine_pids if _start_time(p) == t])
            self._stub_pids.clear()
            self._engine_pids.clear()
        remove_shm(self.shm_prefix)
        if self.engine is not None and self._started_at:
            remove_orphan_engine_shm(self._started_at)
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        if self._run_dir is not None:
            shutil.rmtree(self._run_dir, ignore_errors=True)
            self._run_dir = None
        self.served_repository = self.model_repository
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
