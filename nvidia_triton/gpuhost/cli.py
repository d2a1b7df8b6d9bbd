"""`python -m gpuhost <target>`: one subcommand per Makefile target, same names.

Options also come from the environment (the Makefile exports its variables), so
`make create-instance OFFER_ID=123` and `gpuhost create-instance --offer-id 123` are the same.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from . import remote
from .config import DEFAULT_CONFIG, ConfigError, InstanceDefinition, load, missing_model_folder
from .runner import Runner, known_secrets
from .vast import SshTarget, Vast, VastError

MODELS_DIR = Path(__file__).resolve().parents[2] / "triton_models"

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, pretty_exceptions_enable=False)


@dataclass
class Ctx:
    config: Path
    runner: Runner
    vast: Vast
    direct_ssh: SshTarget | None
    ssh_opts: list[str]
    models_dir: Path
    _defn: InstanceDefinition | None = None

    @property
    def defn(self) -> InstanceDefinition:
        if self._defn is None:
            self._defn = load(self.config)
            # The HF token may live under another name; mask that value too.
            self.runner.secrets += known_secrets([self._defn.instance.hf_token_env])
        return self._defn

    def say(self, text: str = "", err: bool = False) -> None:
        self.runner.say(text, err=err)

    def target(self, contract_id: int | None) -> SshTarget:
        if self.direct_ssh is not None:
            return self.direct_ssh
        return self.vast.ssh_target(need_contract(contract_id))


def need_contract(contract_id: int | None) -> int:
    if contract_id is None:
        raise ConfigError(
            "CONTRACT_ID is required: the instance id printed by create-instance (see list-instances)"
        )
    return contract_id


def split_models(value: str | None, fallback: list[str]) -> list[str]:
    if not value:
        return list(fallback)
    return [m for m in value.replace(",", " ").split() if m]


ContractOpt = Annotated[
    int | None, typer.Option("--contract-id", envvar="CONTRACT_ID", help="instance id from create-instance")
]
ModelsOpt = Annotated[
    str | None, typer.Option("--models", envvar="MODELS", help="model folders, comma or space separated")
]
TritonUrlOpt = Annotated[str, typer.Option("--triton-url", envvar="TRITON_URL", help="Triton HTTP base URL")]


@app.callback()
def main(
    ctx: typer.Context,
    config: Annotated[Path, typer.Option(envvar="CONFIG", help="instance definition yaml")] = DEFAULT_CONFIG,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", envvar="DRY_RUN", help="print every command instead of running it")
    ] = False,
    vastai: Annotated[str, typer.Option(envvar="VASTAI", help="vastai CLI to run")] = "",
    ssh_url: Annotated[
        str, typer.Option(envvar="SSH_URL", help="ssh://user@host:port; skips the `vastai ssh-url` lookup")
    ] = "",
    ssh_opts: Annotated[
        str, typer.Option(envvar="SSH_OPTS", help="extra ssh/scp options, e.g. '-i ~/.ssh/vast'")
    ] = "",
    models_dir: Annotated[
        Path, typer.Option(envvar="MODELS_DIR", help="local Triton model repository")
    ] = MODELS_DIR,
) -> None:
    runner = Runner(dry_run=dry_run, secrets=known_secrets())
    ctx.obj = Ctx(
        config, runner, Vast(runner, vastai), parse_ssh_url(ssh_url), parse_ssh_opts(ssh_opts), models_dir
    )


def parse_ssh_url(value: str) -> SshTarget | None:
    if not value.strip():
        return None
    try:
        return SshTarget.parse(value)
    except VastError as exc:
        raise ConfigError(f"SSH_URL: {exc}") from None


def parse_ssh_opts(value: str) -> list[str]:
    try:
        return shlex.split(value)
    except ValueError as exc:
        raise ConfigError(f"SSH_OPTS: {str(exc).lower()} in {value!r} (quote it as for a shell)") from None


def _c(ctx: typer.Context) -> Ctx:
    obj: Ctx = ctx.obj
    return obj


def _fail(c: Ctx, message: str, code: int = 1) -> typer.Exit:
    c.say(f"error: {message}", err=True)
    return typer.Exit(code)


@app.command("check-config")
def check_config(ctx: typer.Context) -> None:
    """Validate vastai_instance_definition.yaml and show the offer query it makes."""
    from .config import offer_query

    c = _c(ctx)
    d = c.defn
    # Only deploy would notice otherwise, after the instance is rented.
    missing = missing_model_folder(c.models_dir, d.triton.models)
    if missing:
        raise ConfigError(f"{d.source.name}: triton.models: {missing}")
    c.say(f"{d.source}: ok")
    c.say(f"offer query: {offer_query(d.offer, d.instance.disk_gb)}")
    c.say(f"image: {d.instance.image}, disk {d.instance.disk_gb:g} GB, ports {d.instance.ports}")
    c.say(f"models: {', '.join(d.triton.models)}")


@app.command("search-instance")
def search_instance(ctx: typer.Context) -> None:
    """List offers matching the yaml, cheapest first."""
    c = _c(ctx)
    offers = c.vast.search_offers(c.defn)
    if c.runner.dry_run:
        return
    if not offers:
        c.say("no offers match vastai_instance_definition.yaml (loosen offer.* or raise max_price_per_hour)")
        raise typer.Exit(1)
    c.say(
        f"{'OFFER_ID':>10} {'$/hour':>7} {'GPU':14} {'#':>2} {'VRAM GB':>7} {'CUDA':>5} {'disk GB':>7} "
        f"{'rel.':>6} {'net Mb/s':>8}  location"
    )
    for o in offers:
        c.say(
            f"{o.get('id', '?'):>10} {float(o.get('dph_total') or 0):>7.3f} {o.get('gpu_name', '?')!s:14} "
            f"{o.get('num_gpus', '?'):>2} {float(o.get('gpu_ram') or 0) / 1000:>7.1f} "
            f"{o.get('cuda_max_good', '?'):>5} {float(o.get('disk_space') or 0):>7.0f} "
            f"{float(o.get('reliability') or 0):>6.3f} {float(o.get('inet_down') or 0):>8.0f}  "
            f"{o.get('geolocation') or ''}"
        )
    c.say(f"next: make create-instance OFFER_ID={offers[0].get('id')}")


@app.command("create-instance")
def create_instance(
    ctx: typer.Context,
    offer_id: Annotated[
        int | None, typer.Option(envvar="OFFER_ID", help="offer id from search-instance")
    ] = None,
    instance_id: Annotated[
        int | None, typer.Option(envvar="INSTANCE_ID", help="alias of --offer-id (older docs)")
    ] = None,
    timeout: Annotated[
        float | None, typer.Option(envvar="TIMEOUT", help="seconds to wait for running")
    ] = None,
) -> None:
    """Rent an offer, wait until the instance runs, print its id (the CONTRACT_ID of later targets)."""
    c = _c(ctx)
    if offer_id is not None and instance_id is not None and offer_id != instance_id:
        raise _fail(c, f"OFFER_ID={offer_id} and INSTANCE_ID={instance_id} disagree: give one")
    offer = offer_id if offer_id is not None else instance_id
    if offer is None:
        raise _fail(c, "OFFER_ID is required (see `make search-instance`)")
    d = c.defn
    hf_token = os.environ.get(d.instance.hf_token_env) or None
    if not hf_token:
        c.say(f"note: {d.instance.hf_token_env} is not set: gated models will not download", err=True)
    contract = c.vast.create_instance(offer, d, hf_token)
    if contract is not None:
        c.say(f"created instance {contract} from offer {offer}; waiting for it to run …", err=True)
    row = c.vast.wait_running(
        contract,
        timeout if timeout is not None else d.instance.wait_timeout_s,
        d.instance.poll_interval_s,
    )
    if row is None:
        return
    c.say(
        f"instance {contract} is running: {row.get('gpu_name', '?')}, ${float(row.get('dph_total') or 0):.3f}/hour"
    )
    c.say(f"next: make run-tritonserver CONTRACT_ID={contract}")
    # Last line alone so scripts can take it with `tail -n 1`.
    c.say(f"CONTRACT_ID={contract}")


@app.command("list-instances")
def list_instances(ctx: typer.Context) -> None:
    """Your instances with status and $/hour."""
    c = _c(ctx)
    rows = c.vast.list_instances()
    if c.runner.dry_run:
        return
    if not rows:
        c.say("no instances")
        return
    c.say(f"{'CONTRACT_ID':>11} {'status':10} {'GPU':14} {'$/hour':>7}  {'label':22} ssh")
    total = 0.0
    for r in rows:
        dph = float(r.get("dph_total") or 0)
        total += dph if r.get("actual_status") == "running" else 0.0
        ssh = ssh_address(r)
        c.say(
            f"{r.get('id', '?'):>11} {r.get('actual_status') or r.get('cur_state') or '?'!s:10} "
            f"{r.get('gpu_name', '?')!s:14} {dph:>7.3f}  {r.get('label') or '-'!s:22} {ssh}"
        )
    c.say(f"running total: ${total:.3f}/hour")


def ssh_address(row: dict[str, Any]) -> str:
    """Direct address when the host maps port 22 (what `vastai ssh-url` picks), else the proxy."""
    direct = (row.get("ports") or {}).get("22/tcp")
    if direct and row.get("public_ipaddr"):
        return f"{row['public_ipaddr']}:{direct[0].get('HostPort')}"
    return f"{row.get('ssh_host')}:{row.get('ssh_port')}" if row.get("ssh_host") else "-"


@app.command("ssh-instance")
def ssh_instance(ctx: typer.Context, contract_id: ContractOpt = None) -> None:
    """Open an interactive shell on the instance."""
    c = _c(ctx)
    raise typer.Exit(c.runner.replace_process(remote.ssh_argv(c.target(contract_id), c.ssh_opts)))


@app.command("run-tritonserver")
def run_tritonserver(
    ctx: typer.Context,
    contract_id: ContractOpt = None,
    models: Annotated[
        str | None, typer.Option(envvar="LOAD_MODELS", help="models to load at start (default: none)")
    ] = None,
) -> None:
    """Start tritonserver (explicit model control) on the instance, logging to triton.log_file."""
    c = _c(ctx)
    cmd = remote.start_tritonserver_cmd(c.defn.triton, split_models(models, []))
    result = c.runner.run(remote.ssh_argv(c.target(contract_id), c.ssh_opts, cmd), timeout=120)
    if result.stdout:
        c.say(result.stdout.rstrip())
    if result.returncode != 0:
        raise _fail(
            c, f"starting tritonserver failed (exit {result.returncode}): {result.stderr.strip()[-500:]}"
        )
    if not c.runner.dry_run:
        c.say(f"next: make ssh-tunnels-tritonserver CONTRACT_ID={contract_id or '…'} (keep it open)")


@app.command("ssh-tunnels-tritonserver")
def ssh_tunnels(ctx: typer.Context, contract_id: ContractOpt = None) -> None:
    """Forward 8000/8001/8002 to 127.0.0.1 and print the platform's settings for it."""
    c = _c(ctx)
    argv = remote.tunnel_argv(c.target(contract_id), c.ssh_opts)
    c.say("# the platform's settings for this tunnel (the defaults; the tunnel runs until Ctrl-C):")
    c.say("TRITON_URL=http://127.0.0.1:8000")
    c.say("TRITON_GRPC_URL=127.0.0.1:8001")
    c.say("TRITON_METRICS_URL=http://127.0.0.1:8002/metrics")
    raise typer.Exit(c.runner.replace_process(argv))


def _gpu_budget(c: Ctx, models: list[str]) -> None:
    """Warn when the models' gpu_memory_utilization add up to more than one GPU."""
    total = 0.0
    for name in models:
        with contextlib.suppress(OSError, ValueError):
            total += float(
                json.loads((c.models_dir / name / "1" / "model.json").read_text()).get(
                    "gpu_memory_utilization", 0.9
                )
            )
    if total > 1.0:
        c.say(
            f"warning: {', '.join(models)} ask for {total:.2f} of one GPU's memory (gpu_memory_utilization); "
            "the later loads will fail unless the instance has several GPUs",
            err=True,
        )


@app.command("deploy-models-tritonserver")
def deploy_models(
    ctx: typer.Context,
    contract_id: ContractOpt = None,
    models: ModelsOpt = None,
    triton_url: TritonUrlOpt = "http://127.0.0.1:8000",
    skip_copy: Annotated[
        bool, typer.Option(envvar="SKIP_COPY", help="only load (folders already there)")
    ] = False,
    timeout: Annotated[float, typer.Option(envvar="TIMEOUT", help="seconds to wait per model")] = 1800.0,
) -> None:
    """Copy triton_models/<MODELS> to the instance, load each through the repository API, wait for ready."""
    c = _c(ctx)
    names = split_models(models, c.defn.triton.models)
    missing = missing_model_folder(c.models_dir, names)
    if missing:
        raise _fail(c, missing)
    _gpu_budget(c, names)
    if not skip_copy:
        target = c.target(contract_id)
        repo = remote.remote_model_dir(c.defn.triton)
        steps = [
            remote.ssh_argv(target, c.ssh_opts, remote.mkdir_cmd(repo)),
            remote.scp_argv(target, [str(c.models_dir / n) for n in names], repo, c.ssh_opts),
        ]
        for argv in steps:
            result = c.runner.run(argv, timeout=600)
            if result.returncode != 0:
                raise _fail(c, f"{argv[0]} failed (exit {result.returncode}): {result.stderr.strip()[-500:]}")
        if not c.runner.dry_run:
            c.say(f"copied {', '.join(names)} to {target.host}:{repo}")
    from . import triton  # httpx + prometheus_client: only the HTTP targets pay for the import

    ok = triton.load_models(triton_url, names, c.runner, timeout_s=timeout)
    if not ok:
        raise typer.Exit(1)
    if not c.runner.dry_run:
        c.say(f"deployed: {', '.join(names)}")


@app.command("check-health-tritonserver")
def check_health(
    ctx: typer.Context, triton_url: TritonUrlOpt = "http://127.0.0.1:8000", models: ModelsOpt = None
) -> None:
    """Say whether Triton is healthy; exit 0 if it is, 1 if not."""
    c = _c(ctx)
    if c.runner.dry_run:
        c.say(f"DRY_RUN: GET {triton_url.rstrip('/')}/v2/health/ready")
        return
    from . import triton  # httpx + prometheus_client: only the HTTP targets pay for the import

    health = triton.check_health(triton_url, split_models(models, []))
    for line in health.lines:
        c.say(line)
    raise typer.Exit(0 if health.healthy else 1)


@app.command("check-logs-tritonserver")
def check_logs(
    ctx: typer.Context,
    contract_id: ContractOpt = None,
    tail: Annotated[int, typer.Option(envvar="TAIL", help="lines to show")] = 200,
    follow: Annotated[bool, typer.Option(envvar="FOLLOW", help="keep following (ssh source)")] = False,
    source: Annotated[
        str,
        typer.Option(envvar="SOURCE", help="ssh: tritonserver's log file; vast: container stdout (onstart)"),
    ] = "ssh",
) -> None:
    """Show the tritonserver log (or the container's own log with SOURCE=vast)."""
    c = _c(ctx)
    if source == "vast":
        text = c.vast.logs(need_contract(contract_id), tail)
        if text:
            c.say(text.rstrip())
        return
    if source != "ssh":
        raise _fail(c, f"SOURCE must be 'ssh' or 'vast', not {source!r}")
    cmd = remote.tail_log_cmd(c.defn.triton.log_file, tail, follow)
    raise typer.Exit(c.runner.replace_process(remote.ssh_argv(c.target(contract_id), c.ssh_opts, cmd)))


@app.command("check-model-stats-tritonserver")
def check_model_stats(
    ctx: typer.Context,
    triton_url: TritonUrlOpt = "http://127.0.0.1:8000",
    metrics_url: Annotated[
        str, typer.Option(envvar="TRITON_METRICS_URL", help="Prometheus metrics URL")
    ] = "http://127.0.0.1:8002/metrics",
) -> None:
    """Per-model request counts and latencies (/v2/models/stats) plus vLLM token metrics."""
    c = _c(ctx)
    if c.runner.dry_run:
        c.say(f"DRY_RUN: GET {triton_url.rstrip('/')}/v2/models/stats")
        c.say(f"DRY_RUN: GET {metrics_url}")
        return
    from . import triton  # httpx + prometheus_client: only the HTTP targets pay for the import

    lines, ok = triton.model_stats(triton_url, metrics_url)
    for line in lines:
        c.say(line)
    raise typer.Exit(0 if ok else 1)


@app.command("destroy-instance")
def destroy_instance(
    ctx: typer.Context,
    contract_id: ContractOpt = None,
    yes: Annotated[bool, typer.Option("--yes", help="do not ask (CONFIRM=yes does the same)")] = False,
) -> None:
    """Destroy the instance and its disk (billing stops). Asks first unless --yes / CONFIRM=yes."""
    c = _c(ctx)
    cid = need_contract(contract_id)
    confirmed = yes or os.environ.get("CONFIRM", "").lower() in ("yes", "y", "1", "true")
    # Under DRY_RUN nothing is destroyed, so there is nothing to confirm.
    if not confirmed and not c.runner.dry_run:
        c.say(f"Destroy instance {cid}? Its disk (model cache, logs) is deleted. [y/N] ", err=True)
        try:
            answer = sys.stdin.readline().strip().lower()
        except (OSError, KeyboardInterrupt):
            answer = ""
        if answer not in ("y", "yes"):
            c.say(f"aborted: instance {cid} kept (pass CONFIRM=yes to skip the question)", err=True)
            raise typer.Exit(1)
    c.vast.destroy(cid)
    if not c.runner.dry_run:
        c.say(f"instance {cid} destroyed")


# The pinned typer raises its own click copy's exceptions, older ones click's: handle both by
# their public bases (typer.TyperException is the base of typer's vendored ClickException).
_USAGE_ERRORS: tuple[type[Exception], ...] = (typer.TyperException,)
_ABORTS: tuple[type[BaseException], ...] = (typer.Abort,)
with contextlib.suppress(ImportError):
    import click

    _USAGE_ERRORS += (click.ClickException,)
    _ABORTS += (click.exceptions.Abort,)

_KINDS = {
    "integer": "an integer",
    "number": "a number",
    "float": "a number",
    "boolean": "1/0, yes/no or true/false",
}


def _option_value(opts: list[str], argv: list[str]) -> str | None:
    """The value given on the command line to one of opts (--opt value or --opt=value)."""
    for i, arg in enumerate(argv):
        for opt in opts:
            if arg == opt and i + 1 < len(argv):
                return argv[i + 1]
            if arg.startswith(opt + "="):
                return arg[len(opt) + 1 :]
    return None


def bad_value_message(exc: Exception, argv: list[str]) -> str | None:
    """`CONTRACT_ID must be an integer, got 'abc'`: the make variable when the value came from one."""
    param = getattr(exc, "param", None)
    if param is None:
        return None
    opts = list(getattr(param, "opts", None) or [])
    envvar = getattr(param, "envvar", None)
    envvar = envvar[0] if isinstance(envvar, list | tuple) and envvar else envvar
    value = _option_value(opts, argv)
    if value is None and isinstance(envvar, str) and envvar in os.environ:
        name, value = envvar, os.environ[envvar]
    else:
        name = opts[0] if opts else str(getattr(param, "name", "?"))
    detail = str(getattr(exc, "message", "") or exc)
    kind = re.search(r"valid (integer|number|float|boolean)", detail.lower())
    if kind is None or value is None:
        return f"{name}: {detail}"
    return f"{name} must be {_KINDS[kind[1]]}, got {value!r}"


def usage_message(exc: Exception, argv: list[str]) -> str:
    bad = bad_value_message(exc, argv)
    if bad:
        return bad
    fmt = getattr(exc, "format_message", None)
    text = str(fmt() if callable(fmt) else exc).rstrip(".")
    command = getattr(getattr(exc, "ctx", None), "command_path", None)
    return f"{text} (see `{command} --help`)" if command else text


def run() -> None:
    argv = sys.argv[1:]
    try:
        code = app(args=argv, standalone_mode=False)
    except (ConfigError, VastError) as exc:
        # Masking again: messages can quote vastai's output.
        runner = Runner(secrets=known_secrets())
        runner.say(f"error: {exc}", err=True)
        sys.exit(1)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except _ABORTS:
        sys.exit(1)
    except _USAGE_ERRORS as exc:
        # No command at all: the help is the answer, not an error line.
        if type(exc).__name__ == "NoArgsIsHelpError" and hasattr(exc, "show"):
            exc.show()
        else:
            Runner(secrets=known_secrets()).say(f"error: {usage_message(exc, argv)}", err=True)
        sys.exit(int(getattr(exc, "exit_code", 2)))
    sys.exit(code if isinstance(code, int) else 0)
