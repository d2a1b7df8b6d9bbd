"""The interaction log: a tenant's finished jobs as JSON lines (one object per prompt and response,
with its parameters), read a page at a time so that any period can be exported."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from app.auth import Principal
from app.db import Database
from app.models import TERMINAL_STATUSES
from app.repositories import results as repo
from app.sse import one_line


def _line(row: dict[str, Any]) -> bytes:
    params = dict(row["params"])
    images = params.pop("image", None)
    openai = params.get("openai")
    record: dict[str, Any] = {
        "id": str(row["id"]),
        "timestamp": row["created_at"].isoformat(),
        "finished_at": row["finished_at"].isoformat() if row["finished_at"] else None,
        "tenant": row["tenant"],
        "model": row["model"],
        "status": row["status"],
    }
    if isinstance(openai, dict) and params.get("chat"):
        # /v1/chat/completions stores the conversation as its context (images by reference).
        record["messages"] = json.loads(row["content"])
    else:
        record["prompt"] = row["content"]
    if row["prompt"] is not None:
        record["rendered_prompt"] = row["prompt"]
    record.update(
        {
            "response": row["output"],
            "error": row["error"],
            "finish_reason": row["finish_reason"],
            "parameters": params,
            "images": len(images) if images else 0,
            "tokens": {"prompt": row["prompt_tokens"], "completion": row["completion_tokens"]},
            "context_id": str(row["context_id"]),
        }
    )
    return one_line(json.dumps(record, ensure_ascii=False)).encode() + b"\n"


async def lines(
    db: Database,
    principal: Principal,
    *,
    tenant: str | None,
    statuses: list[str] | None,
    model: str | None,
    since: datetime | None,
    until: datetime | None,
    page_size: int,
    max_bytes: int,
    by: str = "created_at",
) -> AsyncIterator[bytes]:
    """JSON lines, oldest first by `by` (created_at or finished_at); one connection per page (none
    held while the client reads)."""
    after = None
    chosen = statuses or sorted(s.value for s in TERMINAL_STATUSES)
    while True:
        async with db.connection() as conn:
            rows, more = await repo.export_page(
                conn,
                statuses=chosen,
                tenant=principal.listing_tenant(tenant),
                model=model,
                since=since,
                until=until,
                after=after,
                limit=page_size,
                max_bytes=max_bytes,
                by=by,
            )
        if rows:
            yield b"".join(_line(row) for row in rows)
        if not more:
            return
        after = (rows[-1][by], rows[-1]["id"])
