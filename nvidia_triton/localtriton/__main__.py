"""CLI: ``python -m localtriton serve`` / ``python -m localtriton cleanup``."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType

import typer

from localtriton.launcher import (
    BUILTIN_REPOSITORY,
    DEFAULT_HOST,
    REAL_MODEL,
    LocalTriton,
    LocalTritonError,
    cleanup_stale,
    repository_models,
)

cli = typer.Typer(help="Run tritonserver with the simulated vLLM backend (no GPU).", no_args_is_help=True)


@cli.command()
def serve(
    http_port: int = typer.Option(8000, help="HTTP port (0 = any free port)"),
    grpc_port: int = typer.Option(8001, help="gRPC port (0 = any free port)"),
    metrics_port: int = typer.Option(8002, help="metrics port (0 = any free port)"),
    host: str = typer.Option(
        DEFAULT_HOST,
        help="address HTTP, gRPC and metrics listen on; Triton has no authentication, so another than "
        "loopback exposes model load/unload and generation to that network",
    ),
    repository: Path | None = typer.Option(None, help="model repository (default: built-in sim models)"),
    model: list[str] | None = typer.Option(
        None, help="model to load (repeatable; default: the simulated models, plus the real one with --real)"
    ),
    real: bool = typer.Option(
        False,
        "--real",
        help=f"also serve {REAL_MODEL} with the real vLLM engine (needs `engine_env install`)",
    ),
    prefill_ms: float | None = typer.Option(None, help="override the prefill step latency of every model"),
    decode_ms: float | None = typer.Option(None, help="override the per-token decode latency of every model"),
    log_file: Path | None = typer.Option(None, help="tritonserver log (default: inside the run dir)"),
    ready_timeout: float | None = typer.Option(
        None, help="seconds to wait for the server and models (default 60, 300 with a real model)"
    ),
) -> None:
    """Start tritonserver, print its URLs and run until Ctrl-C or SIGTERM."""
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    models = list(model) if model else None
    if real:
        base = models or repository_models(repository or BUILTIN_REPOSITORY)
        models = [*base, REAL_MODEL] if REAL_MODEL not in base else base
    server = LocalTriton(
        model_repository=repository,
        models=models,
        http_port=http_port,
        grpc_port=grpc_port,
        metrics_port=metrics_port,
        host=host,
        prefill_ms=prefill_ms,
        decode_ms=decode_ms,
        log_file=log_file,
        ready_timeout=ready_timeout,
    )
    try:
        server.start()
    except LocalTritonError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from exc
    try:
        typer.echo(f"models:  {', '.join(server.models)}")
        typer.echo(f"http:    {server.http_url}")
        typer.echo(f"grpc:    {server.grpc_url}")
        typer.echo(f"metrics: {server.metrics_url}")
        typer.echo(f"pid:     {server.pid}  (Ctrl-C to stop)", err=False)
        while not stop.wait(1.0):
            if server.exited():
                typer.echo(f"tritonserver exited:\n{server.log_tail()}", err=True)
                raise typer.Exit(1)
    finally:
        typer.echo("stopping...", err=True)
        server.stop()


@cli.command()
def cleanup() -> None:
    """Kill orphaned backend stubs and remove stale /dev/shm regions left by crashed runs."""
    killed, removed = cleanup_stale()
    typer.echo(f"killed {len(killed)} orphaned stub(s) {killed}; removed {len(removed)} shm region(s)")


if __name__ == "__main__":
    cli()
