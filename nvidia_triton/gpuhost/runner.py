"""Run (or, under DRY_RUN, print) external commands, masking secrets in everything shown."""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

MASK = "***"
# Shorter values would mask ordinary words in the output.
_MIN_SECRET_LEN = 4


@dataclass
class Result:
    returncode: int
    stdout: str = ""
    stderr: str = ""


def vastai_key_file() -> Path:
    """Where `vastai set api-key` keeps the key (so it can be masked even if it is not in the env)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "vastai" / "vast_api_key"


def vast_key_configured() -> bool:
    """Whether vastai has a key: VAST_API_KEY, or a file `vastai set api-key` (or 2FA login) wrote."""
    # vastai reads no file once the variable is set, even to an empty value.
    if "VAST_API_KEY" in os.environ:
        return bool(os.environ["VAST_API_KEY"].strip())
    key_dir = vastai_key_file().parent
    # The legacy ~/.vast_api_key is still read (vastai copies it into its config dir).
    candidates = [vastai_key_file(), key_dir / "vast_tfa_key", Path.home() / ".vast_api_key"]
    for path in candidates:
        with contextlib.suppress(OSError):
            if path.read_text().strip():
                return True
    return False


def known_secrets(extra_env_names: Iterable[str] = ()) -> list[str]:
    names = ["VAST_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", *extra_env_names]
    values = [os.environ.get(n, "") for n in names]
    with contextlib.suppress(OSError):
        values.append(vastai_key_file().read_text().strip())
    return [v for v in values if len(v) >= _MIN_SECRET_LEN]


@dataclass
class Runner:
    """The one place commands run: DRY_RUN and secret masking cannot be forgotten by a caller."""

    dry_run: bool = False
    secrets: list[str] = field(default_factory=list)

    def mask(self, text: str) -> str:
        # Longest first so a secret containing another is masked whole.
        for secret in sorted(self.secrets, key=len, reverse=True):
            text = text.replace(secret, MASK)
        return text

    def say(self, text: str = "", *, err: bool = False) -> None:
        print(self.mask(text), file=sys.stderr if err else sys.stdout, flush=True)

    def show(self, argv: Sequence[str]) -> str:
        return self.mask(shlex.join(argv))

    def run(
        self,
        argv: Sequence[str],
        *,
        capture: bool = True,
        env: Mapping[str, str] | None = None,
        input_text: str | None = None,
        timeout: float | None = None,
    ) -> Result:
        """Run argv; under DRY_RUN print it (masked) and pretend it succeeded with no output."""
        if self.dry_run:
            self.say(f"DRY_RUN: {self.show(argv)}")
            return Result(0)
        full_env = {**os.environ, **(env or {})}
        try:
            proc = subprocess.run(
                list(argv),
                capture_output=capture,
                text=True,
                env=full_env,
                input=input_text,
                timeout=timeout,
                check=False,
            )
        except FileNotFoundError:
            return Result(127, "", f"{argv[0]}: command not found")
        except subprocess.TimeoutExpired:
            return Result(124, "", f"{Path(argv[0]).name} did not finish within {timeout:g} s")
        return Result(proc.returncode, proc.stdout or "", proc.stderr or "")

    def replace_process(self, argv: Sequence[str]) -> int:
        """Run an interactive or long-lived command (ssh session, tunnel) attached to the terminal."""
        if self.dry_run:
            self.say(f"DRY_RUN: {self.show(argv)}")
            return 0
        try:
            return subprocess.call(list(argv))
        except FileNotFoundError:
            self.say(f"{argv[0]}: command not found", err=True)
            return 127
        except KeyboardInterrupt:
            return 130
