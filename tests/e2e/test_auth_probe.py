"""From outside, against the real API server: every operation of the OpenAPI document refuses a
request without a valid key, and another tenant's key finds nothing; keys never reach a log."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import ADMIN_KEY, FAST_MODEL, ROOT, bearer
from tests.e2e.helpers import create_context, send, wait_for_result

PUBLIC = {("GET", "/health"), ("GET", "/health/ready")}


def _new_key(api_server: str, tenant: str, scope: str = "user") -> dict[str, Any]:
    response = httpx.post(
        f"{api_server}/admin/keys",
        json={"tenant": tenant, "name": "probe", "scope": scope},
        headers=bearer(ADMIN_KEY),
    )
    assert response.status_code == 201, response.text
    return dict(response.json())


def _fill(template: str, ids: dict[str, str]) -> str:
    return re.sub(r"\{([a-z_]+)\}", lambda m: ids.get(m.group(1), str(uuid.uuid4())), template)


def test_every_operation_refuses_missing_wrong_and_revoked_keys_and_other_tenants(
    api: httpx.Client, api_server: str
) -> None:
    # Tenant "e2e" (the api fixture's key) owns a finished job.
    secret = f"the e2e tenant's secret prompt {uuid.uuid4()}"
    context_id = create_context(api, secret)
    result_id = send(api, FAST_MODEL, context_id, {"max_tokens": 4})
    assert wait_for_result(api, result_id)["status"] == "completed"
    ids = {
        "context_id": context_id,
        "result_id": result_id,
        "model_name": FAST_MODEL,
        "key_id": str(uuid.uuid4()),
    }

    revoked = _new_key(api_server, "e2e")
    assert (
        httpx.delete(f"{api_server}/admin/keys/{revoked['id']}", headers=bearer(ADMIN_KEY)).status_code == 200
    )
    stranger = _new_key(api_server, f"stranger-{uuid.uuid4().hex[:6]}")["key"]

    spec = httpx.get(f"{api_server}/openapi.json").json()
    operations = [(m.upper(), p) for p, item in spec["paths"].items() for m in item]
    assert ("POST", "/models/send/{model_name}/{context_id}") in operations
    assert ("POST", "/admin/keys") in operations
    time.sleep(1.2)  # KEY_CACHE_TTL_S=1 in the test server: the revocation is seen by now
    probed = 0
    for method, template in operations:
        path = _fill(template, ids)
        body = {"content": "x"} if method in ("POST", "PUT") else None
        if (method, template) in PUBLIC:
            assert httpx.request(method, f"{api_server}{path}").status_code in (200, 503)
            continue
        for headers in (
            {},
            bearer("llmq_" + "x" * 43),
            bearer(revoked["key"]),
            {"authorization": "Token abc"},
        ):
            refused = httpx.request(method, f"{api_server}{path}", headers=headers, json=body)
            assert refused.status_code == 401, (method, path, headers, refused.text)
            assert refused.headers["www-authenticate"] == "Bearer"
            if path.startswith("/v1/"):  # OpenAI's error shape, which the SDK reads
                assert refused.json()["error"]["code"] == "invalid_api_key"
            else:
                assert set(refused.json()) == {"error", "detail"}
        # Another tenant's key: nothing of tenant e2e, whatever the operation.
        answer = httpx.request(method, f"{api_server}{path}", headers=bearer(stranger), json=body)
        assert answer.status_code in (200, 201, 202, 400, 403, 404, 422), (method, path, answer.text)
        assert secret not in answer.text, (method, path)
        # The only mention of e2e's ids is a 404 naming the id the caller sent.
        shown = answer.text.replace(f"{result_id} not found", "").replace(f"{context_id} not found", "")
        assert result_id not in shown and context_id not in shown, (method, path, answer.text)
        if template in ("/contexts/{context_id}", "/results/{result_id}"):
            assert answer.status_code == 404
        if template.startswith("/admin/"):
            assert answer.status_code == 403
        probed += 1
    assert probed >= 10


def _revoke_from_the_command_line(key_id: str, e2e_env: dict[str, str]) -> None:
    """As an operator would: another process, straight in the database."""
    subprocess.run(
        [sys.executable, "-m", "app.cli", "keys", "revoke", key_id],
        cwd=ROOT,
        env={**e2e_env, "PATH": str(Path(sys.executable).parent)},
        check=True,
        capture_output=True,
    )


def test_a_revocation_reaches_another_api_process_within_seconds(
    api_server: str, e2e_env: dict[str, str]
) -> None:
    created = _new_key(api_server, "e2e")
    headers = bearer(created["key"])
    assert (
        httpx.get(f"{api_server}/contexts/", headers=headers).status_code == 200
    )  # cached by the server now
    _revoke_from_the_command_line(created["id"], e2e_env)
    revoked_at = time.monotonic()
    while httpx.get(f"{api_server}/contexts/", headers=headers).status_code == 200:
        assert time.monotonic() - revoked_at < 5, "the server still accepts a revoked key"
        time.sleep(0.1)
    assert httpx.get(f"{api_server}/contexts/", headers=headers).status_code == 401


def test_a_key_revoked_elsewhere_is_refused_once_the_cache_time_has_passed(
    api_server: str, e2e_env: dict[str, str]
) -> None:
    """Past KEY_CACHE_TTL_S (1 s here) not even the first requests are answered from the cache:
    a burst after an idle spell creates nothing."""
    created = _new_key(api_server, "e2e")
    headers = bearer(created["key"])
    assert httpx.get(f"{api_server}/contexts/", headers=headers).status_code == 200  # cached now
    _revoke_from_the_command_line(created["id"], e2e_env)
    time.sleep(1.5)

    def create(i: int) -> int:
        body = {"content": f"after the revocation {i}"}
        return httpx.post(f"{api_server}/contexts/", json=body, headers=headers).status_code

    with ThreadPoolExecutor(max_workers=20) as pool:
        statuses = list(pool.map(create, range(20)))
    assert statuses == [401] * 20


def test_no_key_appears_in_any_log(
    api: httpx.Client, api_server: str, logs_dir: Path, e2e_user_key: str
) -> None:
    created = _new_key(api_server, "e2e")
    # Requests that fail in every way a key can: a bad key is logged nowhere either.
    httpx.get(f"{api_server}/contexts/", headers=bearer(created["key"][:-3] + "zzz"))
    httpx.post(f"{api_server}/admin/keys", json={"tenant": "t", "name": "n"}, headers=bearer(e2e_user_key))
    wait_for_result(api, send(api, FAST_MODEL, create_context(api, "log check"), {"max_tokens": 2}))
    logs = {p.name: p.read_text(errors="replace") for p in logs_dir.rglob("*.log")}
    assert {"api.log", "worker.log"} <= set(logs)
    for secret in (ADMIN_KEY, e2e_user_key, created["key"], created["key"][:-3] + "zzz"):
        for name, text in logs.items():
            assert secret not in text, f"an API key is in {name}"
            assert secret[5:25] not in text, f"part of an API key is in {name}"
