"""nvidia_triton/Makefile without the project's venv: every target stops at once naming `make install`."""

from __future__ import annotations

import os
import re
import subprocess

from gpuhost_testlib import NVIDIA_TRITON

MISSING = "/nonexistent/python"


def make(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "MAKEFLAGS", "MAKELEVEL")}
    return subprocess.run(
        ["make", "-s", "-C", str(NVIDIA_TRITON), *args, f"PYTHON={MISSING}"],
        env={**env, "PYTHON": MISSING},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_help_works_without_a_venv_and_every_target_asks_for_make_install() -> None:
    helped = make("help")
    assert helped.returncode == 0, helped.stderr
    targets = re.findall(r"^  ([a-z-]+) ", helped.stdout, flags=re.M)
    assert "search-instance" in targets and "destroy-instance" in targets
    targets.remove("help")

    for target in targets:
        proc = make(target)
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0, target
        assert "make install" in out, (target, out)
        assert MISSING in out, (target, out)
        # Stopped by the guard, before the tool ran: no shell "not found", no Python traceback.
        assert "not found" not in out and "Traceback" not in out, (target, out)
