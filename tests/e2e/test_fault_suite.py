"""The reduced fault suite (`python -m bench.faults --quick`), as CI runs it: its own Postgres cluster,
Redis, Triton, two workers and the API under load while workers, Redis, Triton, Postgres and the API
are killed or stopped. It must lose no accepted job and finish none twice; the timing targets are
reported in its output (`--targets report`), not asserted here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

ALL = ["worker-kill", "redis", "triton", "postgres", "api-kill", "malformed", "rolling"]


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_quick_fault_suite_loses_nothing_and_finishes_nothing_twice(tmp_path: Path) -> None:
    out = tmp_path / "faults.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.faults", "--quick", "--json-out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=840,
    )
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert [s["name"] for s in report["scenarios"]] == ALL
    for s in report["scenarios"]:
        assert s["accepted"] > 0, s
        assert s["lost"] == 0 and s["twice"] == 0, s
        assert s["completed"] + s["failed"] == s["accepted"], s
    # Generations are counted from Triton's own trace: every accepted job reached the engine.
    assert all(s["generations"] >= s["completed"] for s in report["scenarios"])
