"""HEAD is answered as the GET of the same URL without its body, through the real server: health
checks of uptime monitors, and streamed answers that stop at their head instead of running on."""

from __future__ import annotations

import time

import httpx

from tests.conftest import SLOW_MODEL
from tests.e2e.helpers import create_context, send


def test_head_answers_the_gets_status_and_headers_without_the_body(api: httpx.Client, api_server: str) -> None:
    for path in ("/health", "/health/ready"):
        got, head = httpx.get(api_server + path), httpx.head(api_server + path)
        assert (head.status_code, head.content) == (got.status_code, b"")
        assert head.headers["content-type"] == got.headers["content-type"]
        assert head.headers["content-length"] == got.headers["content-length"]
    context_id = create_context(api, "head me")
    got, head = api.get(f"/contexts/{context_id}"), api.head(f"/contexts/{context_id}")
    assert (head.status_code, head.content, head.headers["content-length"]) == (
        200,
        b"",
        got.headers["content-length"],
    )
    # The same rules as the GET: no key, 401; another tenant's or no such object, 404.
    unauthenticated = httpx.head(f"{api_server}/contexts/{context_id}")
    assert unauthenticated.status_code == 401 and unauthenticated.headers["www-authenticate"] == "Bearer"
    assert api.head("/contexts/00000000-0000-0000-0000-000000000000").status_code == 404
    # A method the path does not take: 405, whose Allow names HEAD beside GET.
    refused = httpx.delete(api_server + "/health")
    assert refused.status_code == 405 and refused.headers["allow"] == "GET, HEAD"


def test_head_of_a_streamed_answer_ends_at_its_head(api: httpx.Client) -> None:
    # A job of ~4.5 s: the GET of its stream would last as long; its HEAD is answered at once.
    result_id = send(api, SLOW_MODEL, create_context(api, "stream"), {"max_tokens": 300, "ignore_eos": True})
    for path in (f"/results/{result_id}/stream", "/results/export"):
        t0 = time.monotonic()
        head = api.head(path, timeout=10)
        assert head.status_code == 200 and head.content == b"", path
        assert time.monotonic() - t0 < 3.0, path  # not the job's 4.5 s
    assert api.head(f"/results/{result_id}/stream").headers["content-type"].startswith("text/event-stream")
