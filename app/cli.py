"""Operator commands (need database access): `python -m app.cli keys create --tenant acme --name ci`."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, time
from typing import NoReturn, TypeVar

import psycopg
import psycopg.errors
import typer
from pydantic import TypeAdapter, ValidationError

from app.config import settings_or_exit
from app.db import AsyncConnection, connection_kwargs, conninfo
from app.errors import AppError
from app.notify import RECENT_TTL_S, publish_purge
from app.schemas import ApiKeyCreate, TenantLimitsIn, TenantLimitsOut, TenantName
from app.services import keys as service
from app.services import retention

T = TypeVar("T")

cli = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
keys = typer.Typer(no_args_is_help=True, help="API keys: create (shown once), list, revoke.")
cli.add_typer(keys, name="keys")
tenants = typer.Typer(no_args_is_help=True, help="Tenants' quotas: show, set.")
cli.add_typer(tenants, name="tenants")
results = typer.Typer(no_args_is_help=True, help="Results: purge the old ones (retention).")
cli.add_typer(results, name="results")


def _run(action: Callable[[AsyncConnection], Awaitable[T]]) -> T:
    settings = settings_or_exit()

    async def run() -> T:
        async with await psycopg.AsyncConnection.connect(
            conninfo(settings), **connection_kwargs(settings, "llmq-cli")
        ) as conn:
            return await action(conn)

    try:
        return asyncio.run(run())
    except AppError as exc:
        _fail(exc.message)
    except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn) as exc:
        _fail(
            f"the database has no schema, or an older one ({str(exc).strip().splitlines()[0]}): "
            "run `alembic upgrade head`"
        )
    except psycopg.Error as exc:  # its first line names the server, never the password
        _fail(
            f"database error: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
        )


def _fail(message: str) -> NoReturn:
    """An operator's mistake or an unreachable database: one line on stderr, exit status 1."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


@keys.command("create")
def create(
    tenant: str = typer.Option(..., help="The tenant the key acts for."),
    name: str = typer.Option(..., help="What the key is for (shown in listings)."),
    scope: str = typer.Option("user", help="user (its tenant only) or admin (every tenant)."),
    max_pending: int | None = typer.Option(None, help="Override the tenant's pending-jobs cap."),
    submit_rate_per_s: int | None = typer.Option(None, help="Override the submit rate."),
    as_json: bool = typer.Option(
        False, "--json", help="Print one JSON object (id, key, tenant, name, scope) for scripts."
    ),
) -> None:
    """Create a key and print it: it is shown this once, only its hash is stored."""
    try:
        spec = ApiKeyCreate.model_validate(
            {
                "tenant": tenant,
                "name": name,
                "scope": scope,
                "max_pending": max_pending,
                "submit_rate_per_s": submit_rate_per_s,
            }
        )
    except ValidationError as exc:
        _fail(
            "; ".join(f"--{'.'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in exc.errors())
        )
    created = _run(lambda conn: service.create_key(conn, spec))
    if as_json:
        typer.echo(created.model_dump_json(include={"id", "key", "tenant", "name", "scope"}))
        return
    typer.echo(f"id:     {created.id}\ntenant: {created.tenant}\nscope:  {created.scope}")
    typer.echo(f"key:    {created.key}\n(shown once: store it now)")


@keys.command("list")
def list_keys() -> None:
    """Every key, without secrets."""
    found = _run(service.list_keys)
    if not found:
        typer.echo("no keys (create one with: keys create --tenant … --name …)")
        return
    typer.echo(
        f"{'id':<36}  {'prefix':<12}  {'tenant':<20} {'scope':<5} {'max_pending':>11} "
        f"{'submit_rate_per_s':>17} {'state':<24} name"
    )
    for key in found:
        state = f"revoked {key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else "active"
        # Blank: the key has none of its own, its tenant's (`tenants show`) applies.
        pending = "" if key.max_pending is None else str(key.max_pending)
        rate = "" if key.submit_rate_per_s is None else str(key.submit_rate_per_s)
        typer.echo(
            f"{key.id}  {key.prefix}…  {key.tenant:<20} {key.scope:<5} {pending:>11} {rate:>17} "
            f"{state:<24} {key.name}"
        )


@keys.command("revoke")
def revoke(key_id: uuid.UUID) -> None:
    """Revoke a key (every API process refuses it within KEY_CACHE_TTL_S)."""
    revoked, before = _run(lambda conn: service.revoke_key(conn, key_id))
    if before:
        typer.echo(
            f"{revoked.id} ({revoked.tenant}, {revoked.name}) was already revoked at {revoked.revoked_at:%Y-%m-%d %H:%M:%S %Z}"
        )
    else:
        typer.echo(f"revoked {revoked.id} ({revoked.tenant}, {revoked.name})")


def _echo_limits(limits: TenantLimitsOut) -> None:
    def line(label: str, value: int | None, effective: int, setting: str) -> str:
        source = f"set for {limits.tenant}" if value is not None else f"the {setting} setting"
        return f"{label:<18} {effective}  ({source})"

    typer.echo(f"tenant:            {limits.tenant}")
    typer.echo(
        line("max pending:", limits.max_pending, limits.effective_max_pending, "MAX_PENDING_PER_TENANT")
    )
    typer.echo(
        line(
            "submit rate (/s):",
            limits.submit_rate_per_s,
            limits.effective_submit_rate_per_s,
            "SUBMIT_RATE_PER_KEY",
        )
    )
    typer.echo("(a key's own limits, shown by `keys list`, win over these)")


def _tenant(tenant: str) -> str:
    try:
        return TypeAdapter(TenantName).validate_python(tenant)
    except ValidationError as exc:
        _fail(f"tenant: {exc.errors()[0]['msg']}")


@tenants.command("show")
def show_limits(tenant: str) -> None:
    """A tenant's quotas: what is set for it, and what its keys without their own get."""
    settings = settings_or_exit()
    name = _tenant(tenant)
    _echo_limits(_run(lambda conn: service.tenant_limits(conn, name, settings)))


@tenants.command("set")
def set_limits(
    tenant: str,
    max_pending: int | None = typer.Option(
        None, help="Jobs pending at once (omitted: the setting's default)."
    ),
    submit_rate_per_s: int | None = typer.Option(
        None, help="Jobs submitted per second per key (omitted: the default)."
    ),
) -> None:
    """Set both of a tenant's quotas at once, as PUT /admin/tenants/{tenant}/limits does."""
    settings = settings_or_exit()
    name = _tenant(tenant)
    try:
        limits = TenantLimitsIn.model_validate(
            {"max_pending": max_pending, "submit_rate_per_s": submit_rate_per_s}
        )
    except ValidationError as exc:
        _fail(
            "; ".join(f"--{'.'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in exc.errors())
        )
    _echo_limits(_run(lambda conn: service.set_tenant_limits(conn, name, limits, settings)))
    typer.echo("API processes apply them within KEY_CACHE_TTL_S")


BEFORE_EXAMPLES = "2026-11-01, 2026-11-01T00:00:00Z, 2026-11-01T00:00:00.5+00:00"


def _instant(value: str) -> datetime:
    """An ISO 8601 time with its zone (fractional seconds too), or a date alone: its midnight UTC."""
    text = value.strip()
    try:
        if len(text) == 10:
            return datetime.combine(date.fromisoformat(text), time(), tzinfo=UTC)
        at = datetime.fromisoformat(text)
    except ValueError:
        _fail(f"--before: {value!r} is neither a date nor a time (e.g. {BEFORE_EXAMPLES})")
    if at.tzinfo is None:
        _fail(f"--before: {value!r} has no zone; add one (Z, +00:00) or give a date alone (midnight UTC)")
    return at


@results.command("purge")
def purge_results(
    before: str = typer.Option(
        ...,
        help=f"A time with its zone, or a date alone (its midnight UTC): {BEFORE_EXAMPLES}",
    ),
    tenant: str | None = typer.Option(None, help="One tenant's only (default: every tenant's)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Count what would be deleted, delete nothing."),
) -> None:
    """Delete the ended results created before --before, then the contexts created before it that no
    result refers to (a context stored and never sent included). Pending jobs and theirs stay, and so
    does a context a job is sent on meanwhile. API processes are told to forget the rows they keep."""
    cut = _instant(before)
    name = None if tenant is None else _tenant(tenant)
    try:
        done = _run(lambda conn: retention.purge(conn, cut, name, dry_run=dry_run))
    finally:  # a purge stopped part way has deleted rows too
        why = None if dry_run else publish_purge(settings_or_exit(), cut)
    scope = f"tenant {name}'s" if name else "every tenant's"
    verb = "would delete" if dry_run else "deleted"
    typer.echo(
        f"{verb} {done.results} results and {done.contexts} contexts ({scope}, created before {cut.isoformat()})"
    )
    if why is not None:
        typer.echo(
            f"warning: API processes not told to forget purged results ({why}): "
            f"they may answer from memory for {RECENT_TTL_S:g} s more",
            err=True,
        )


if __name__ == "__main__":
    cli()
