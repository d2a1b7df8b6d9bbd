"""OpenAI-compatible calls on durable jobs.

A call is validated and turned into a `Call` (its prompts, rendered through the model's chat
template for chat, and each job's parameters); `create_jobs` records one context per prompt and one
result row per choice in one transaction (or replays them for a repeated Idempotency-Key) and rings
the doorbell after the commit; `wait_final` waits for the rows to be final (the jobs go on if the
client leaves); `chat_completion` / `completion` turn the final rows into OpenAI's objects, or
`job_error` into the error that says why a job did not complete. A streamed call (the SSE path)
uses the same `create_jobs` and the same final rows.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel

from app.auth import Principal
from app.config import Settings
from app.db import AsyncConnection, Database
from app.errors import STOPPING, AppError, InvalidInput, ServiceUnavailable, stream_error
from app.images import image_base64
from app.notify import ResultWaiter
from app.repositories import results as results_repo
from app.schemas_openai import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChatMessage,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Usage,
    storable_json,
)
from app.services import idempotency
from app.services import results as results_service
from app.services.results import Enqueue
from app.templates import ChatTemplates

Endpoint = Literal["chat.completions", "completions"]

# OpenAI's documented default for /v1/completions (chat has OPENAI_DEFAULT_MAX_TOKENS).
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
MAX_JOBS_PER_CALL = 64
# Fields that may come with the value that changes nothing; any other value is refused.
_NO_OP_VALUES: dict[str, tuple[Any, ...]] = {
    "logprobs": (False, None),
    "top_logprobs": (0, None),
    "echo": (False, None),
    "best_of": (1, None),
    "suffix": (None, ""),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none"),
    "function_call": (None, "none"),
    "logit_bias": (None, {}),
    "modalities": (None, ["text"]),
    "response_format": (None, {"type": "text"}),
    "reasoning_effort": (None,),
    "prediction": (None,),
    "audio": (None,),
    "web_search_options": (None,),
}
# Accepted and not used: they do not change the answer.
_IGNORED = frozenset(
    {"store", "service_tier", "parallel_tool_calls", "prompt_cache_key", "safety_identifier"}
)
# Job parameters that are this module's record, not sampling parameters.
OPENAI_KEY = "openai"


@dataclass(frozen=True)
class Prompt:
    content: str  # the context stored: the prompt, or for chat the conversation as JSON
    rendered: str | None = None  # what the model gets when it is not `content` (the chat template's output)


@dataclass(frozen=True)
class Call:
    """A validated call: what its jobs are made of."""

    endpoint: Endpoint
    model: str
    prompts: list[Prompt]
    n: int
    params: dict[str, Any]  # every job's parameters; the choice index (and seed) are set per job
    request: ChatCompletionRequest | CompletionRequest = field(repr=False)
    include_usage: bool = False  # stream_options.include_usage: for the streamed answer's usage chunk

    def fingerprint(self) -> bytes:
        """What an Idempotency-Key is bound to (only computed when a call has one)."""
        return idempotency.fingerprint(
            f"POST /v1/{self.endpoint.replace('.', '/')}", self.request.model_dump_json()
        )

    def job_params(self, index: int, choice: int) -> dict[str, Any]:
        params = {**self.params, OPENAI_KEY: {**self.params[OPENAI_KEY], "index": index}}
        if params.get("seed") is not None and choice:
            # n choices with one seed would be n copies of one text: each choice its own seed.
            params["seed"] = (params["seed"] + choice) % 2**63
        return params


class JobsCreated(BaseModel):
    """A call's jobs, in choice order (prompt by prompt, n choices each): what an Idempotency-Key replays."""

    result_ids: list[uuid.UUID]


# ---------------------------------------------------------------- validation


def refuse_unsupported(body: ChatCompletionRequest | CompletionRequest) -> None:
    """A field that would change the answer and is not supported is refused by name, not ignored."""
    for name, value in (body.model_extra or {}).items():
        if name in _IGNORED:
            try:  # not used, but kept with the call (its Idempotency-Key's fingerprint): storable
                storable_json(value)
            except ValueError as exc:
                raise InvalidInput(f"{name}: {exc}", status_code=400, detail={"field": name}) from None
            continue
        # By type too: 0 == False, and `logprobs: 0` asks completions for the sampled tokens' logprobs.
        if name in _NO_OP_VALUES and any(
            value == no_op and type(value) is type(no_op) for no_op in _NO_OP_VALUES[name]
        ):
            continue
        shown = json.dumps(value)[:80]
        raise InvalidInput(
            f"'{name}' is not supported by this server (it would change the answer); "
            f"remove it (got {name}={shown})",
            status_code=400,
            detail={"field": name},
            code="unsupported_parameter",
        )


def _sampling(
    body: ChatCompletionRequest | CompletionRequest,
    max_tokens: int,
    settings: Settings,
    max_tokens_field: str = "max_tokens",
) -> dict[str, Any]:
    if max_tokens > settings.MAX_TOKENS_LIMIT:
        raise InvalidInput(
            f"{max_tokens_field} must be at most {settings.MAX_TOKENS_LIMIT}, got {max_tokens}",
            status_code=400,
            detail={"field": max_tokens_field},
        )
    n = body.n or 1
    if n > settings.OPENAI_MAX_N:
        raise InvalidInput(
            f"n must be at most {settings.OPENAI_MAX_N}, got {n}", status_code=400, detail={"field": "n"}
        )
    params: dict[str, Any] = {
        "max_tokens": max_tokens,
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "top_p": 1.0 if body.top_p is None else body.top_p,
        "stop": body.stop_list(),
    }
    for name in ("seed", "presence_penalty", "frequency_penalty", "ignore_eos"):
        value = getattr(body, name)
        if value is not None:
            params[name] = value
    record: dict[str, Any] = {"n": n}
    if body.user is not None:
        record["user"] = body.user
    if body.metadata:
        record["metadata"] = body.metadata
    params[OPENAI_KEY] = record
    if body.stream:
        params["stream"] = True  # the worker streams from Triton: the answer's chunks come as generated
    return params


def _check_size(text: str, what: str, settings: Settings) -> None:
    size = len(text.encode("utf-8"))
    if size > settings.MAX_CONTENT_BYTES:  # a 400, as OpenAI answers a string over its limit
        raise InvalidInput(
            f"{what} is {size} bytes, over the limit of {settings.MAX_CONTENT_BYTES} bytes",
            status_code=400,
            detail={"field": "messages" if what == "the conversation" else "prompt"},
            code="string_above_max_length",
        )


async def chat_call(body: ChatCompletionRequest, settings: Settings, templates: ChatTemplates) -> Call:
    """Validate a chat call and render its prompt through the model's chat template."""
    chat = templates.model(body.model)
    if chat is None:
        raise InvalidInput(
            f"model '{body.model}' has no chat template (chat_template.jinja in its model folder): "
            "use /v1/completions with a raw prompt",
            status_code=400,
            detail={"field": "model"},
            code="no_chat_template",
        )
    if body.max_tokens and body.max_completion_tokens and body.max_tokens != body.max_completion_tokens:
        raise InvalidInput(
            "max_tokens and max_completion_tokens differ: send one of them",
            status_code=400,
            detail={"field": "max_completion_tokens"},
        )
    kwargs = body.chat_template_kwargs or {}
    if "messages" in kwargs:
        raise InvalidInput(
            "chat_template_kwargs must not set 'messages'",
            status_code=400,
            detail={"field": "chat_template_kwargs.messages"},
        )
    images: list[str] = []
    for_template: list[dict[str, Any]] = []
    for_record: list[dict[str, Any]] = []
    hosts = frozenset(h.strip().lower() for h in settings.OPENAI_IMAGE_HOSTS.split(",") if h.strip())
    for i, message in enumerate(body.messages):
        template_message, record_message = await _message(
            message, f"messages.{i}", images, chat.vision, body.model, settings, hosts
        )
        for_template.append(template_message)
        for_record.append(record_message)
    conversation = json.dumps(for_record, ensure_ascii=False)
    _check_size(conversation, "the conversation", settings)
    prompt = templates.render(body.model, for_template, **kwargs)
    _check_size(prompt, "the rendered prompt", settings)
    max_tokens = body.max_completion_tokens or body.max_tokens or settings.OPENAI_DEFAULT_MAX_TOKENS
    field_name = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    params = _sampling(body, max_tokens, settings, field_name)
    params["chat"] = True
    if kwargs:
        params[OPENAI_KEY]["chat_template_kwargs"] = kwargs
    if images:
        params["image"] = images  # forwarded to the backend's `image` input by the worker
    return Call(
        endpoint="chat.completions",
        model=body.model,
        prompts=[Prompt(conversation, prompt)],
        n=params[OPENAI_KEY]["n"],
        params=params,
        request=body,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
    )


async def _message(
    message: ChatMessage,
    where: str,
    images: list[str],
    vision: bool,
    model: str,
    settings: Settings,
    hosts: frozenset[str],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The message as the template gets it, and as it is recorded (images by reference: their
    data is in the job's `image` parameter)."""
    role = "system" if message.role == "developer" else message.role
    parts: list[tuple[str, str, str]] = []  # (kind, text or image URL, field)
    if isinstance(message.content, list):
        for j, part in enumerate(message.content):
            if part.type == "text":
                parts.append(("text", part.text, f"{where}.content.{j}"))
            else:
                parts.append(("image", part.image_url.url, f"{where}.content.{j}.image_url.url"))
    if message.image:
        if not isinstance(message.content, list):
            parts.insert(0, ("text", message.content or "", f"{where}.content"))
        parts.append(("image", message.image, f"{where}.image"))
    base: dict[str, Any] = {"role": role}
    if message.name is not None:
        base["name"] = message.name
    if not parts:
        return {**base, "content": message.content}, {**base, "content": message.content}
    template_parts: list[dict[str, Any]] = []
    record_parts: list[dict[str, Any]] = []
    for kind, value, field_name in parts:
        if kind == "text":
            template_parts.append({"type": "text", "text": value})
            record_parts.append({"type": "text", "text": value})
            continue
        if not vision:
            raise InvalidInput(
                f"model '{model}' does not take images (its model folder declares no vision input); "
                f"remove the image at {field_name}",
                status_code=400,
                detail={"field": field_name},
                code="images_not_supported",
            )
        images.append(
            await image_base64(
                value, field_name, max_bytes=settings.OPENAI_MAX_IMAGE_BYTES, allowed_hosts=hosts
            )
        )
        template_parts.append({"type": "image"})
        record_parts.append({"type": "image_url", "image_url": {"url": f"image:{len(images) - 1}"}})
    return {**base, "content": template_parts}, {**base, "content": record_parts}


def completion_call(body: CompletionRequest, settings: Settings) -> Call:
    prompts = body.prompt if isinstance(body.prompt, list) else [body.prompt]
    for prompt in prompts:
        _check_size(prompt, "a prompt", settings)
    params = _sampling(body, body.max_tokens or COMPLETIONS_DEFAULT_MAX_TOKENS, settings)
    n = params[OPENAI_KEY]["n"]
    if n * len(prompts) > MAX_JOBS_PER_CALL:
        raise InvalidInput(
            f"{len(prompts)} prompts times n={n} is {n * len(prompts)} jobs, over the limit of "
            f"{MAX_JOBS_PER_CALL} per call",
            status_code=400,
            detail={"field": "n"},
        )
    return Call(
        endpoint="completions",
        model=body.model,
        prompts=[Prompt(p) for p in prompts],
        n=n,
        params=params,
        request=body,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
    )


# ---------------------------------------------------------------- jobs


async def _insert(conn: AsyncConnection, principal: Principal, call: Call) -> JobsCreated:
    result_ids: list[uuid.UUID] = []
    for p, prompt in enumerate(call.prompts):
        jobs = [(uuid.uuid4(), call.job_params(p * call.n + choice, choice)) for choice in range(call.n)]
        await results_repo.insert_with_context(
            conn,
            tenant=principal.tenant,
            content=prompt.content,
            model=call.model,
            jobs=jobs,
            prompt=prompt.rendered,
        )
        result_ids += [result_id for result_id, _ in jobs]
    return JobsCreated(result_ids=result_ids)


async def create_jobs(
    db: Database,
    enqueue: Enqueue,
    principal: Principal,
    call: Call,
    idempotency_key: str | None,
    waiter: ResultWaiter | None = None,
    admit: Callable[[int, AsyncConnection | None], Awaitable[None]] | None = None,
) -> tuple[list[uuid.UUID], bool]:
    """The call's result ids in choice order, and whether they were created now (False: replayed for
    a repeated Idempotency-Key). `admit(jobs, conn)` (the quotas) is asked only when jobs are
    about to be created, so a replay is answered whatever the quota. Rings the doorbell once the rows
    are committed (after telling `waiter` the jobs are this process's, so that waiting for them needs
    no read of their rows)."""
    jobs_count = len(call.prompts) * call.n
    if idempotency_key is None:
        if admit is not None:
            await admit(jobs_count, None)
        async with db.connection() as conn:
            if len(call.prompts) == 1:  # one statement: atomic without a transaction's round trips
                jobs = await _insert(conn, principal, call)
            else:
                async with conn.transaction():
                    jobs = await _insert(conn, principal, call)
        created = True
    else:

        async def create(conn: AsyncConnection) -> tuple[int, JobsCreated]:
            if admit is not None:
                await admit(jobs_count, conn)  # on the key's transaction: no second connection
            return 200, await _insert(conn, principal, call)

        _, answer, created = await idempotency.first_answer(
            db, principal, idempotency.check_key(idempotency_key), call.fingerprint(), create
        )
        jobs = JobsCreated.model_validate(answer)
    if created:
        for result_id in jobs.result_ids:
            if waiter is not None:
                waiter.created(result_id, principal.tenant)
            enqueue(result_id)
    return jobs.result_ids, created


async def wait_final(
    db: Database,
    waiter: ResultWaiter,
    principal: Principal,
    result_ids: list[uuid.UUID],
    wait_s: float,
    *,
    keyed: bool = False,
) -> list[dict[str, Any]]:
    """The final rows (as GET /results/{id} shows them), once every job has ended; a 504 naming
    them past `wait_s` (the jobs go on). `keyed`: the call came with an Idempotency-Key."""
    bodies = await asyncio.gather(
        *(results_service.final_within(db, waiter, principal, rid, wait_s) for rid in result_ids)
    )
    if any(body is None for body in bodies) and waiter.stopping:
        raise ServiceUnavailable(
            f"{STOPPING.split(';')[0]}; {jobs_go_on(result_ids, keyed)}", headers=_headers(result_ids)
        )
    if any(body is None for body in bodies):
        raise AppError(
            f"the job(s) did not finish within {wait_s:g} s; {jobs_go_on(result_ids, keyed)}",
            status_code=504,
            code="job_timeout",
            headers=_headers(result_ids),
        )
    rows: list[dict[str, Any]] = [json.loads(body) for body in bodies if body is not None]
    failed = next((row for row in rows if row["status"] != "completed"), None)
    if failed is not None:
        raise job_error(failed, result_ids)
    return rows


def jobs_go_on(result_ids: list[uuid.UUID], keyed: bool) -> str:
    """What a caller whose jobs exist can do, when its call cannot answer with them."""
    again = ", or send the request again with the same Idempotency-Key" if keyed else ""
    return f"the job(s) go on: poll GET /results/{{id}} for {', '.join(map(str, result_ids))}{again}"


def jobs_exist_error(error: AppError, result_ids: list[uuid.UUID], keyed: bool) -> AppError:
    """`error` (an outage, this process stopping) as a call whose jobs exist answers it: its cause,
    then that the jobs go on (never "nothing was changed", nor a Last-Event-ID /v1 does not have),
    and the SDK told not to retry, which would create them again. One saying so already is kept."""
    if (error.headers or {}).get("x-should-retry") == "false":
        return error
    return AppError(
        f"{error.message.split(';')[0]}; {jobs_go_on(result_ids, keyed)}",
        status_code=error.status_code,
        code=error.code,
        headers=_headers(result_ids),
    )


def after_creation(exc: Exception, result_ids: list[uuid.UUID], *, keyed: bool) -> Exception:
    """The exception a call raises once its jobs exist: an outage's as `jobs_exist_error` says it,
    others as they are."""
    error = stream_error(exc)
    return exc if error is None else jobs_exist_error(error, result_ids, keyed)


def _headers(result_ids: list[uuid.UUID]) -> dict[str, str]:
    # The jobs exist: a retry by the client would create new ones, so the SDK is told not to.
    return {"X-Result-Id": ",".join(map(str, result_ids)), "x-should-retry": "false"}


def job_error(row: dict[str, Any], result_ids: list[uuid.UUID]) -> AppError:
    """Why a job did not complete, with the status code its cause deserves."""
    error = row.get("error") or "no reason recorded"
    message = f"job {row['id']} {row['status']}: {error}"
    headers = _headers(result_ids)
    if row["status"] == "cancelled":
        return AppError(message, status_code=409, code="job_cancelled", headers=headers)
    if error.startswith("internal worker error"):
        return AppError(message, status_code=500, code="internal_error", headers=headers)
    if error.startswith("deadline exceeded"):
        return AppError(message, status_code=504, code="job_deadline_exceeded", headers=headers)
    if error.startswith(("gave up after", "Triton gRPC error")):
        return AppError(message, status_code=502, code="backend_unavailable", headers=headers)
    # The engine refused the request itself (e.g. longer than the model's context): the caller's to fix.
    lowered = error.lower()
    if "maximum context length" in lowered or "maximum model length" in lowered:
        return AppError(message, status_code=400, code="context_length_exceeded", headers=headers)
    return AppError(message, status_code=400, code="generation_refused", headers=headers)


# ---------------------------------------------------------------- answers


def usage(call: Call, rows: list[dict[str, Any]]) -> Usage:
    # The prompt counts once per prompt, as OpenAI counts it, however many choices it has.
    prompt_tokens = sum(rows[p * call.n].get("prompt_tokens") or 0 for p in range(len(call.prompts)))
    completion_tokens = sum(row.get("completion_tokens") or 0 for row in rows)
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def _created(rows: list[dict[str, Any]]) -> int:
    return int(datetime.fromisoformat(rows[0]["created_at"]).timestamp())


def chat_completion(call: Call, rows: list[dict[str, Any]]) -> ChatCompletion:
    """The `chat.completion` of a call's final rows (in choice order)."""
    return ChatCompletion(
        id=str(rows[0]["id"]),
        created=_created(rows),
        model=call.model,
        choices=[
            ChatChoice(
                index=i,
                message=AssistantMessage(content=row.get("output") or ""),
                finish_reason=row.get("finish_reason") or "stop",
                result_id=str(row["id"]),
            )
            for i, row in enumerate(rows)
        ],
        usage=usage(call, rows),
    )


def completion(call: Call, rows: list[dict[str, Any]]) -> Completion:
    """The `text_completion` of a call's final rows (in choice order)."""
    return Completion(
        id=str(rows[0]["id"]),
        created=_created(rows),
        model=call.model,
        choices=[
            CompletionChoice(
                index=i,
                text=row.get("output") or "",
                finish_reason=row.get("finish_reason") or "stop",
                result_id=str(row["id"]),
            )
            for i, row in enumerate(rows)
        ],
        usage=usage(call, rows),
    )
