"""API keys, tenants, idempotent submits and quotas, against the real database and Redis."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
import psycopg
import pytest

from tests.conftest import (
    ADMIN_KEY,
    FAST_MODEL,
    EnqueueRecorder,
    InProcessApi,
    bearer,
    make_api_app,
    make_key,
    serve_in_process,
)

pytestmark = pytest.mark.anyio


async def _context(client: httpx.AsyncClient, content: str = "a prompt") -> str:
    response = await client.post("/contexts/", json={"content": content})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def _send(client: httpx.AsyncClient, context_id: str, **headers: str) -> httpx.Response:
    return await client.post(
        f"/models/send/{FAST_MODEL}/{context_id}", json={"max_tokens": 4}, headers=headers
    )


# ---------------------------------------------------------------- keys


async def test_a_created_key_is_shown_once_and_listed_without_secrets(api_app: InProcessApi) -> None:
    created = await api_app.admin.post("/admin/keys", json={"tenant": "acme", "name": "ci", "scope": "user"})
    assert created.status_code == 201
    body = created.json()
    assert body["key"].startswith("llmq_") and len(body["key"]) >= 5 + 43  # 256 random bits
    assert {body["tenant"], body["name"], body["scope"]} == {"acme", "ci", "user"}
    listed = (await api_app.admin.get("/admin/keys")).json()
    mine = next(k for k in listed if k["id"] == body["id"])
    assert "key" not in mine and "hash" not in mine
    assert body["key"].startswith(mine["prefix"]) and len(mine["prefix"]) < 16
    assert body["key"] not in (await api_app.admin.get("/admin/keys")).text
    # It works, and its use is recorded.
    async with httpx.AsyncClient(
        transport=api_app.http._transport, base_url="http://api.test", headers=bearer(body["key"])
    ) as acme:
        assert (await acme.get("/contexts/")).status_code == 200
    for _ in range(50):
        listed = (await api_app.admin.get("/admin/keys")).json()
        if next(k for k in listed if k["id"] == body["id"])["last_used_at"]:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("last_used_at was never recorded")


async def test_only_hashes_are_stored(api_app: InProcessApi, db: psycopg.AsyncConnection[Any]) -> None:
    created = (await api_app.admin.post("/admin/keys", json={"tenant": "acme", "name": "x"})).json()
    row = await (await db.execute("SELECT * FROM api_key WHERE id = %s", (created["id"],))).fetchone()
    assert row is not None
    assert created["key"] not in repr(row) and created["key"].encode() not in b"".join(
        v for v in row if isinstance(v, bytes)
    )


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "missing API key"),
        ({"authorization": "Basic dXNlcjpwYXNz"}, "malformed Authorization header"),
        ({"authorization": "Bearer"}, "malformed Authorization header"),
        ({"authorization": "Bearer not-a-key"}, "malformed API key"),
        ({"authorization": f"Bearer llmq_{'A' * 43}"}, "unknown or revoked API key"),
    ],
)
async def test_requests_without_a_valid_key_are_401(
    api_app: InProcessApi, headers: dict[str, str], message: str
) -> None:
    for method, path in [("GET", "/contexts/"), ("POST", "/contexts/"), ("GET", f"/results/{uuid.uuid4()}")]:
        response = await api_app.http.request(method, path, headers=headers, json={"content": "x"})
        assert response.status_code == 401, (path, response.text)
        assert response.headers["www-authenticate"] == "Bearer"
        body = response.json()
        assert set(body) == {"error", "detail"} and message in body["error"]


async def test_two_authorization_headers_are_401_whichever_comes_first(api_app: InProcessApi) -> None:
    user, admin = api_app.user.headers["authorization"], bearer(ADMIN_KEY)["authorization"]
    for pair in ((user, admin), (admin, user), (user, user)):
        response = await api_app.http.get("/contexts/", headers=[("authorization", value) for value in pair])
        assert response.status_code == 401, response.text
        assert "more than one Authorization header" in response.json()["error"]


async def test_a_revoked_key_is_refused_at_once_on_this_process(api_app: InProcessApi) -> None:
    created = (await api_app.admin.post("/admin/keys", json={"tenant": "acme", "name": "short-lived"})).json()
    headers = bearer(created["key"])
    assert (await api_app.http.get("/contexts/", headers=headers)).status_code == 200
    revoked = await api_app.admin.delete(f"/admin/keys/{created['id']}")
    assert revoked.status_code == 200 and revoked.json()["revoked_at"]
    refused = await api_app.http.get("/contexts/", headers=headers)
    assert refused.status_code == 401 and "revoked" in refused.json()["error"]
    assert (await api_app.admin.delete(f"/admin/keys/{uuid.uuid4()}")).status_code == 404


async def test_a_user_key_cannot_use_admin_operations(api_app: InProcessApi) -> None:
    for method, path, body in [
        ("POST", "/admin/keys", {"tenant": "x", "name": "y"}),
        ("GET", "/admin/keys", None),
        ("DELETE", f"/admin/keys/{uuid.uuid4()}", None),
        ("PUT", "/admin/tenants/x/limits", {"max_pending": 1}),
    ]:
        response = await api_app.user.request(method, path, json=body)
        assert response.status_code == 403, (path, response.text)
        assert response.json()["error"] == "this operation needs an admin key"


async def test_an_admin_key_made_by_an_admin_is_an_admin(api_app: InProcessApi) -> None:
    created = (
        await api_app.admin.post("/admin/keys", json={"tenant": "ops", "name": "a", "scope": "admin"})
    ).json()
    assert (await api_app.http.get("/admin/keys", headers=bearer(created["key"]))).status_code == 200


# ---------------------------------------------------------------- tenancy


async def test_another_tenants_objects_are_not_found(api_app: InProcessApi) -> None:
    context_id = await _context(api_app.user, "tenant A's secret prompt")
    result_id = (await _send(api_app.user, context_id)).json()["result_id"]
    other = await api_app.client_of("tenant-b")
    async with other:
        for path in (f"/contexts/{context_id}", f"/results/{result_id}", f"/results/{result_id}?wait=1"):
            response = await other.get(path)
            assert response.status_code == 404, path
            assert "secret" not in response.text
        assert (await _send(other, context_id)).status_code == 404  # cannot run A's prompt either
        assert (await other.get("/contexts/")).json()["items"] == []
        assert (await other.get("/results/")).json()["items"] == []
        # The tenant filter is an admin's: a user key naming another tenant is refused, not shown its own.
        for path in ("/results/", "/contexts/", "/results/export"):
            refused = await other.get(path, params={"tenant": api_app.tenant})
            assert refused.status_code == 403, (path, refused.text)
            assert "the tenant filter needs an admin key" in refused.json()["error"]
            assert (await other.get(path, params={"tenant": "tenant-b"})).status_code == 200  # its own
        assert (await other.get("/models/")).status_code == 200  # open to every key
    mine = (await api_app.user.get(f"/results/{result_id}")).json()
    assert mine["tenant"] == api_app.tenant


async def test_admin_lists_across_tenants_with_a_tenant_filter(api_app: InProcessApi) -> None:
    a = await _context(api_app.user, "from A")
    b_client = await api_app.client_of("tenant-b")
    async with b_client:
        b = await _context(b_client, "from B")
        rb = (await _send(b_client, b)).json()["result_id"]
    ra = (await _send(api_app.user, a)).json()["result_id"]
    everything = (await api_app.admin.get("/results/")).json()["items"]
    assert {(r["id"], r["tenant"]) for r in everything} == {(ra, api_app.tenant), (rb, "tenant-b")}
    only_b = (await api_app.admin.get("/results/", params={"tenant": "tenant-b"})).json()["items"]
    assert [r["id"] for r in only_b] == [rb]
    contexts = (await api_app.admin.get("/contexts/", params={"tenant": api_app.tenant})).json()["items"]
    assert [c["id"] for c in contexts] == [a]
    assert (await api_app.admin.get(f"/results/{rb}")).json()["tenant"] == "tenant-b"


# ---------------------------------------------------------------- idempotency


async def test_an_idempotent_submit_returns_the_first_answer(
    api_app: InProcessApi, enqueued: EnqueueRecorder, db: psycopg.AsyncConnection[Any]
) -> None:
    context_id = await _context(api_app.user)
    first = await _send(api_app.user, context_id, **{"Idempotency-Key": "job-1"})
    again = await _send(api_app.user, context_id, **{"Idempotency-Key": "job-1"})
    assert first.status_code == again.status_code == 202
    assert first.json() == again.json()
    assert again.headers["location"] == first.headers["location"] == first.json()["url"]
    assert enqueued.calls == [uuid.UUID(first.json()["result_id"])]
    count = await (await db.execute("SELECT count(*) FROM result")).fetchone()
    assert count == (1,)

    other_body = await api_app.user.post(
        f"/models/send/{FAST_MODEL}/{context_id}",
        json={"max_tokens": 5},
        headers={"Idempotency-Key": "job-1"},
    )
    assert other_body.status_code == 422
    assert "Idempotency-Key 'job-1' was already used with a different request" in other_body.json()["error"]

    # Keys are per tenant: another tenant's same key is another request.
    other = await api_app.client_of("tenant-b")
    async with other:
        b_context = await _context(other)
        assert (await _send(other, b_context, **{"Idempotency-Key": "job-1"})).status_code == 202


async def test_an_idempotent_context_is_created_once(
    api_app: InProcessApi, db: psycopg.AsyncConnection[Any]
) -> None:
    answers = [
        await api_app.user.post("/contexts/", json={"content": "once"}, headers={"Idempotency-Key": "ctx"})
        for _ in range(3)
    ]
    assert [a.status_code for a in answers] == [201, 201, 201]
    assert len({a.json()["id"] for a in answers}) == 1
    assert await (await db.execute("SELECT count(*) FROM context")).fetchone() == (1,)


async def test_concurrent_duplicates_create_exactly_one_job(
    api_app: InProcessApi, enqueued: EnqueueRecorder, db: psycopg.AsyncConnection[Any]
) -> None:
    context_id = await _context(api_app.user)
    answers = await asyncio.gather(
        *(_send(api_app.user, context_id, **{"Idempotency-Key": "race"}) for _ in range(12))
    )
    assert {a.status_code for a in answers} == {202}
    assert len({a.json()["result_id"] for a in answers}) == 1
    assert await (await db.execute("SELECT count(*) FROM result")).fetchone() == (1,)
    assert len(enqueued.calls) == 1


async def test_duplicates_holding_every_pooled_connection_do_not_starve_the_first(
    api_app: InProcessApi, enqueued: EnqueueRecorder, db: psycopg.AsyncConnection[Any]
) -> None:
    # The first request takes its time before its quota check; meanwhile its duplicates take every
    # pooled connection and wait for its key's row. Its pending count must be read on its own one.
    rate = api_app.app.state.runtime.submit_rate
    real_check = rate.check

    async def slow_check(principal: Any, units: int = 1, what: str = "jobs") -> None:
        await asyncio.sleep(0.3)
        await real_check(principal, units, what)

    rate.check = slow_check
    context_id = await _context(api_app.user)
    answers = await asyncio.gather(
        *(_send(api_app.user, context_id, **{"Idempotency-Key": "crowded"}) for _ in range(12))
    )
    assert [a.status_code for a in answers] == [202] * 12, [a.text for a in answers if a.status_code != 202]
    assert len({a.json()["result_id"] for a in answers}) == 1
    assert await (await db.execute("SELECT count(*) FROM result")).fetchone() == (1,)


# ---------------------------------------------------------------- quotas


async def test_pending_jobs_over_the_cap_are_429_and_create_nothing(
    api_app: InProcessApi, db: psycopg.AsyncConnection[Any]
) -> None:
    capped = await api_app.client_of("capped", max_pending=2)
    async with capped:
        context_id = await _context(capped)
        assert [(await _send(capped, context_id)).status_code for _ in range(2)] == [202, 202]
        refused = await _send(capped, context_id)
        assert refused.status_code == 429
        assert refused.headers["retry-after"]
        assert (
            "pending job limit reached: tenant 'capped' has 2 jobs pending (the limit is 2)"
            in refused.json()["error"]
        )
        assert await (await db.execute("SELECT count(*) FROM result WHERE tenant = 'capped'")).fetchone() == (
            2,
        )
        # A finished job frees a place.
        await db.execute(
            "UPDATE result SET status = 'completed' WHERE tenant = 'capped' AND id = (SELECT min(id::text)::uuid FROM result WHERE tenant = 'capped')"
        )
        assert (await _send(capped, context_id)).status_code == 202


@pytest.mark.parametrize("refresh_s", [0, 1])
@pytest.mark.parametrize("idempotent", [False, True])
async def test_concurrent_submits_to_one_process_never_pass_the_pending_cap(
    db: psycopg.AsyncConnection[Any], triton: Any, enqueued: EnqueueRecorder, refresh_s: float, idempotent: bool
) -> None:
    """Requests admitted and not yet committed count against the cap: 30 at once, 5 let in."""
    app = make_api_app(triton.http_url, enqueued, QUOTA_PENDING_REFRESH_S=refresh_s)
    tenant = f"burst-{uuid.uuid4().hex[:8]}"
    async with serve_in_process(app) as http:
        key = await make_key(http, tenant, max_pending=5)
        client = httpx.AsyncClient(transport=http._transport, base_url="http://api.test", headers=bearer(key))
        async with client:
            context_id = await _context(client)
            assert (await _send(client, context_id)).status_code == 202  # the count is known (warm)
            for burst in range(2):
                headers = [{"Idempotency-Key": f"k{burst}-{i}"} if idempotent else {} for i in range(30)]
                answers = await asyncio.gather(*(_send(client, context_id, **h) for h in headers))
                statuses = sorted(a.status_code for a in answers)
                # The first burst fills the 4 places left; the second finds none.
                assert statuses == ([202] * 4 if burst == 0 else []) + [429] * (30 if burst else 26), statuses
    row = await (await db.execute("SELECT count(*) FROM result WHERE tenant = %s", (tenant,))).fetchone()
    assert row == (5,)


async def test_a_repeated_idempotency_key_is_answered_whatever_the_quotas(
    api_app: InProcessApi, enqueued: EnqueueRecorder
) -> None:
    capped = await api_app.client_of("replays", max_pending=1, submit_rate_per_s=1)
    async with capped:
        context_id = await _context(capped)
        first = await _send(capped, context_id, **{"Idempotency-Key": "retry-me"})
        assert first.status_code == 202
        # Over both limits now (1 pending, 1 submit this second), yet a retry creates nothing.
        again = await _send(capped, context_id, **{"Idempotency-Key": "retry-me"})
        assert again.status_code == 202 and again.json() == first.json()
        refused = await _send(capped, context_id, **{"Idempotency-Key": "a-new-one"})
        assert refused.status_code == 429
    assert len(enqueued.calls) == 1


@pytest.mark.parametrize("refresh_s", [0.2, 60])  # a count soon past its refresh time, or fresh for long
async def test_a_client_sending_one_job_at_a_time_is_never_refused(
    db: psycopg.AsyncConnection[Any], triton: Any, enqueued: EnqueueRecorder, refresh_s: float
) -> None:
    # The count this process holds counts its own submit, whose job has ended since.
    app = make_api_app(triton.http_url, enqueued, QUOTA_PENDING_REFRESH_S=refresh_s)
    async with serve_in_process(app) as http:
        key = await make_key(http, f"sequential-{refresh_s}", max_pending=1)
        client = httpx.AsyncClient(transport=http._transport, base_url="http://api.test", headers=bearer(key))
        async with client:
            context_id = await _context(client)
            for attempt in range(4):
                sent = await _send(client, context_id)
                assert sent.status_code == 202, sent.text
                if attempt % 2:  # one that tries again while its job runs is refused, then let in
                    refused = await _send(client, context_id)
                    assert refused.status_code == 429 and "has 1 jobs pending" in refused.json()["error"]
                    assert refused.headers["retry-after"] == "1"
                await db.execute(
                    "UPDATE result SET status = 'completed' WHERE id = %s", (sent.json()["result_id"],)
                )
                if attempt % 2:
                    await asyncio.sleep(0.3)
    assert len(enqueued.calls) == 4


async def test_the_submit_rate_per_key_is_429_with_retry_after(api_app: InProcessApi) -> None:
    limited = await api_app.client_of("rated", submit_rate_per_s=3)
    async with limited:
        context_id = await _context(limited)
        statuses = [(await _send(limited, context_id)).status_code for _ in range(8)]
        assert statuses.count(202) in (3, 4, 5, 6)  # 3 per second (the window may turn once)
        refused = await _send(limited, context_id)
        while refused.status_code == 202:  # landed in a new second: use it up
            refused = await _send(limited, context_id)
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert "submit rate limit reached: at most 3 jobs per second" in refused.json()["error"]


async def _start_of_a_second() -> None:
    """The rate's window is the wall-clock second: start a sequence at its beginning."""
    await asyncio.sleep(1.02 - time.time() % 1)


async def test_contexts_count_against_the_submit_rate_apart_from_jobs(
    api_app: InProcessApi, db: psycopg.AsyncConnection[Any]
) -> None:
    limited = await api_app.client_of("context-rate", submit_rate_per_s=2)
    async with limited:
        await _start_of_a_second()
        created = [await limited.post("/contexts/", json={"content": f"p{i}"}) for i in range(3)]
        assert [r.status_code for r in created] == [201, 201, 429]
        assert "at most 2 contexts per second" in created[2].json()["error"]
        assert created[2].headers["retry-after"] == "1"
        # Jobs have their own count: the same second's sends pass.
        sent = [await _send(limited, created[0].json()["id"]) for _ in range(2)]
        assert [r.status_code for r in sent] == [202, 202]
    count = await (await db.execute("SELECT count(*) FROM context WHERE tenant = 'context-rate'")).fetchone()
    assert count == (2,)


async def test_a_submit_refused_for_pending_jobs_spends_none_of_the_rate(
    api_app: InProcessApi, db: psycopg.AsyncConnection[Any]
) -> None:
    both = await api_app.client_of("refused-free", max_pending=1, submit_rate_per_s=3)
    async with both:
        context_id = await _context(both)
        await _start_of_a_second()
        first = await _send(both, context_id)
        refused = [await _send(both, context_id) for _ in range(3)]
        assert [r.json()["detail"]["limit"] for r in refused] == ["max_pending"] * 3
        await db.execute("UPDATE result SET status = 'completed' WHERE id = %s", (first.json()["result_id"],))
        # Two of the second's three submits are left: the refused ones spent none.
        assert (await _send(both, context_id)).status_code == 202


async def test_an_openai_call_counts_each_of_its_jobs_against_the_rate(
    db: psycopg.AsyncConnection[Any], triton: Any, enqueued: EnqueueRecorder
) -> None:
    # No worker here: an accepted call answers 504 once OPENAI_WAIT_S has passed, its jobs created.
    app = make_api_app(triton.http_url, enqueued, OPENAI_WAIT_S=0.1)
    async with serve_in_process(app) as http:
        key = await make_key(http, "openai-rate", submit_rate_per_s=4)
        limited = httpx.AsyncClient(
            transport=http._transport, base_url="http://api.test", headers=bearer(key)
        )
        async with limited:
            body = {"model": FAST_MODEL, "prompt": ["one", "two"], "n": 3, "max_tokens": 2}
            too_many = await limited.post("/v1/completions", json=body)
            assert too_many.status_code == 400
            message = too_many.json()["error"]["message"]
            assert "submits 6 jobs, more than this API key may submit per second (4)" in message
            await _start_of_a_second()
            calls = [
                await limited.post("/v1/completions", json={**body, "prompt": "one", "n": 2})
                for _ in range(3)
            ]
    assert [c.status_code for c in calls[:2]] == [504, 504]
    assert calls[2].status_code == 429 and "at most 4 jobs per second" in calls[2].json()["error"]["message"]
    assert len(enqueued.calls) == 4


async def test_tenant_limits_are_read_as_set_and_as_applied(api_app: InProcessApi) -> None:
    defaults = api_app.app.state.runtime.settings
    fresh = await api_app.admin.get("/admin/tenants/reader/limits")
    assert fresh.status_code == 200, fresh.text
    assert fresh.json() == {
        "tenant": "reader",
        "max_pending": None,
        "submit_rate_per_s": None,
        "updated_at": None,
        "effective_max_pending": defaults.MAX_PENDING_PER_TENANT,
        "effective_submit_rate_per_s": defaults.SUBMIT_RATE_PER_KEY,
    }
    put = await api_app.admin.put("/admin/tenants/reader/limits", json={"max_pending": 3})
    read = await api_app.admin.get("/admin/tenants/reader/limits")
    assert read.json() == put.json()
    assert read.json()["max_pending"] == 3 and read.json()["effective_max_pending"] == 3
    assert read.json()["effective_submit_rate_per_s"] == defaults.SUBMIT_RATE_PER_KEY
    assert read.json()["updated_at"] is not None
    assert (await api_app.user.get("/admin/tenants/reader/limits")).status_code == 403
    assert (await api_app.admin.get("/admin/tenants/-bad/limits")).status_code == 422


async def test_tenant_limits_apply_to_every_key_of_the_tenant(api_app: InProcessApi) -> None:
    put = await api_app.admin.put("/admin/tenants/small/limits", json={"max_pending": 1})
    assert put.status_code == 200 and put.json()["max_pending"] == 1
    small = await api_app.client_of("small")
    async with small:
        context_id = await _context(small)
        assert (await _send(small, context_id)).status_code == 202
        assert (await _send(small, context_id)).status_code == 429


@pytest.mark.parametrize(
    ("path", "method", "body", "field"),
    [
        ("/admin/keys", "POST", {"tenant": "acme", "name": "x", "max_pending": True}, "max_pending"),
        (
            "/admin/keys",
            "POST",
            {"tenant": "acme", "name": "x", "submit_rate_per_s": "5"},
            "submit_rate_per_s",
        ),
        ("/admin/keys", "POST", {"tenant": "acme", "name": "row\nforged"}, "name"),
        ("/admin/keys", "POST", {"tenant": "acme", "name": "\u202eevil"}, "name"),
        ("/admin/keys", "POST", {"tenant": "acme", "name": "   "}, "name"),
        ("/admin/tenants/acme/limits", "PUT", {"max_pending": True}, "max_pending"),
        ("/admin/tenants/acme/limits", "PUT", {"submit_rate_per_s": 2.0}, "submit_rate_per_s"),
    ],
)
async def test_admin_bodies_are_as_strict_as_the_send_body(
    api_app: InProcessApi, path: str, method: str, body: dict[str, Any], field: str
) -> None:
    """`true` is not a count nor "5" a number; a key's name cannot carry control characters."""
    response = await api_app.admin.request(method, path, json=body)
    assert response.status_code == 422, response.text
    assert field in response.text


async def test_the_bootstrap_admin_key_counts_against_its_tenants_limits(api_app: InProcessApi) -> None:
    """ADMIN_API_KEY is tenant `default`'s: that tenant's limits apply to it as to its other keys."""
    context_id = await _context(api_app.admin)
    put = await api_app.admin.put("/admin/tenants/default/limits", json={"submit_rate_per_s": 1})
    try:
        assert put.status_code == 200
        assert (await _send(api_app.admin, context_id)).status_code == 202
        refused = await _send(api_app.admin, context_id)
        assert refused.status_code == 429 and "jobs per second" in refused.json()["error"]
    finally:
        await api_app.admin.put("/admin/tenants/default/limits", json={})


async def test_the_bootstrap_admin_key_is_refused_in_production() -> None:
    from pydantic import ValidationError

    from app.config import DEV_ADMIN_API_KEY, Settings

    with pytest.raises(ValidationError, match="ADMIN_API_KEY is the development key"):
        Settings(
            APP_ENV="production",
            DATABASE_URL="postgresql+psycopg://app:s3cret-Password@db/llmq",
            ADMIN_API_KEY=DEV_ADMIN_API_KEY,
        )
    assert ADMIN_KEY != DEV_ADMIN_API_KEY


async def test_concurrent_submits_under_the_rate_are_all_accepted(api_app: InProcessApi) -> None:
    # Many submits arriving at once share one allowance request (none is refused for the others).
    many = await api_app.client_of("burst", submit_rate_per_s=400)
    async with many:
        context_id = await _context(many)
        answers = await asyncio.gather(*(_send(many, context_id) for _ in range(40)))
    assert [a.status_code for a in answers] == [202] * 40
