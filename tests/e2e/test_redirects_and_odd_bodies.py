"""Answers built from what a client sent, through a real uvicorn: the trailing-slash redirect's
Location is the path as sent, percent-encoded (it was built from the decoded path: a 500 for a
character a header cannot carry, a dropped connection for an encoded CR LF, another resource for an
encoded `?`); a number past Python's 4300-digit bound is a 422 naming the problem."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import FAST_MODEL


@pytest.mark.parametrize(
    ("sent", "location"),
    [
        ("/contexts/%E2%82%AC/", "/contexts/%E2%82%AC"),
        ("/contexts/%FF/", "/contexts/%FF"),
        ("/contexts/%0d%0aX:%20y/", "/contexts/%0d%0aX:%20y"),
        ("/contexts/%00/", "/contexts/%00"),
        ("/results/%3Fstatus=failed/", "/results/%3Fstatus=failed"),
        ("/results/%23x/stream/", "/results/%23x/stream"),
        ("/results?limit=%E2%82%AC", "/results/?limit=%E2%82%AC"),
    ],
)
def test_the_slash_redirect_points_at_the_path_as_sent(api: httpx.Client, sent: str, location: str) -> None:
    moved = api.get(sent, follow_redirects=False)
    assert moved.status_code == 307, moved.text
    assert moved.headers["location"] == location and "x" not in moved.headers
    followed = api.get(location, follow_redirects=False)
    assert 400 <= followed.status_code < 500 and followed.json()["error"], followed.text


def test_a_number_of_thousands_of_digits_is_a_422_saying_so(api: httpx.Client) -> None:
    context_id = api.post("/contexts/", json={"content": "hi"}).json()["id"]
    body = b'{"max_tokens": 4, "seed": ' + b"9" * 5000 + b"}"
    for path in (f"/models/send/{FAST_MODEL}/{context_id}", "/contexts/"):
        answer = api.post(path, content=body, headers={"content-type": "application/json"})
        assert answer.status_code == 422, answer.text
        assert "more than 4300 digits" in answer.json()["error"]
