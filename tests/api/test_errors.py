"""The last-resort answer to a bug: a 500 in the error shape whose reference finds its traceback in
the API's log (an operator cannot match one to the other by time alone under load)."""

from __future__ import annotations

import logging
import re
from typing import Any

import pytest

from tests.conftest import EnqueueRecorder, failing_on_demand

pytestmark = pytest.mark.anyio


async def test_a_500_names_a_reference_its_log_line_carries(
    triton: Any, enqueued: EnqueueRecorder, caplog: pytest.LogCaptureFixture
) -> None:
    async with failing_on_demand(triton.http_url, enqueued) as http:
        with caplog.at_level(logging.ERROR, logger="app.errors"):
            answers = [await http.get(path, headers={"x-fail": "1"}) for path in ("/contexts/", "/v1/models")]
    messages = [answers[0].json()["error"], answers[1].json()["error"]["message"]]
    refs = []
    for answer, message in zip(answers, messages, strict=True):
        assert answer.status_code == 500
        match = re.search(r"\(ref ([0-9a-f]{12}) in the API's log\)", message)
        assert match, message
        refs.append(match.group(1))
    logged = [r.getMessage() for r in caplog.records if "unhandled error" in r.getMessage()]
    assert [ref for ref in refs if any(ref in line for line in logged)] == refs and refs[0] != refs[1]
