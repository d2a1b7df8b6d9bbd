"""A thin wrapper over the pinned `vastai` CLI (1.9.1).

The CLI is used, not the REST API directly, so users get the same auth (`vastai set api-key` or
VAST_API_KEY) and endpoint (VAST_URL) handling as when they run vastai themselves. Its quirks
handled here: HTTP errors exit 0 with a JSON error on stderr under --raw, `ssh-url` prints an
error and exits 0, and raw JSON may hold the HF token (extra_env), so it is never echoed.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .config import InstanceDefinition, docker_env, offer_order, offer_query
from .runner import Result, Runner, vast_key_configured

# Statuses after which an instance will not become "running" by waiting.
DEAD_STATUSES = frozenset({"exited", "unknown", "offline"})
NO_KEY = (
    "no Vast.ai API key: run `.venv/bin/vastai set api-key <KEY>` or export VAST_API_KEY=<KEY>"
    " (key from your Vast.ai account page)"
)
# The update nudge would add a network call and a stray stderr line to every command.
_ENV = {"VASTAI_NO_UPDATE_CHECK": "1"}


class VastError(RuntimeError):
    """A vastai call failed; the message is safe to print (secrets masked by the caller)."""


def default_vastai() -> str:
    """The vastai next to this interpreter (the project's venv), else the one on PATH."""
    beside = Path(sys.executable).parent / "vastai"
    if beside.exists():
        return str(beside)
    return shutil.which("vastai") or "vastai"


@dataclass(frozen=True)
class SshTarget:
    user: str
    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> SshTarget:
        parts = urlsplit(url.strip())
        try:
            port = parts.port
        except ValueError:  # not a number, or outside 0-65535
            port = None
        if parts.scheme != "ssh" or not parts.hostname or not port:
            raise VastError(f"not an ssh URL (expected ssh://user@host:port, port 1-65535): {url.strip()!r}")
        return cls(parts.username or "root", parts.hostname, port)

    def url(self) -> str:
        return f"ssh://{self.user}@{self.host}:{self.port}"


@dataclass
class Vast:
    runner: Runner
    vastai: str = ""

    def __post_init__(self) -> None:
        self.vastai = self.vastai or default_vastai()

    # -- plumbing ---------------------------------------------------------
    def _cmd(self, *args: str) -> list[str]:
        return [self.vastai, *args]

    def _run(self, *args: str, timeout: float = 120, keyless: bool = False) -> Result:
        # Without a key vastai still goes to the network and fails with a vaguer message.
        if not keyless and not self.runner.dry_run and not vast_key_configured():
            raise VastError(NO_KEY)
        return self.runner.run(self._cmd(*args), env=_ENV, timeout=timeout)

    def _raw(self, *args: str, what: str, keyless: bool = False) -> Any:
        """Run a vastai command with --raw and return its JSON (None under DRY_RUN)."""
        result = self._run(*args, "--raw", keyless=keyless)
        if self.runner.dry_run:
            return None
        error = _error_from(result.returncode, result.stdout, result.stderr)
        if error:
            raise VastError(f"{what} failed: {self.runner.mask(error)}")
        try:
            return json.loads(result.stdout)
        except json.JSONDecodeError:
            # Never echo the body: it may be an instance row carrying extra_env.
            raise VastError(f"{what} failed: vastai printed something that is not JSON") from None

    # -- commands ---------------------------------------------------------
    def search_offers(self, defn: InstanceDefinition) -> list[dict[str, Any]]:
        offer = defn.offer
        rows = self._raw(
            "search",
            "offers",
            offer_query(offer, defn.instance.disk_gb),
            "-o",
            offer_order(offer),
            "--limit",
            str(offer.limit),
            "--storage",
            f"{defn.instance.disk_gb:g}",
            what="search offers",
            # Vast.ai lists offers to anyone: searching before signing up works.
            keyless=True,
        )
        if rows is None:
            return []
        if not isinstance(rows, list):
            raise VastError("search offers failed: expected a list of offers")
        return sort_offers(filter_offers(rows, defn), defn.offer.order)

    def create_instance(self, offer_id: int, defn: InstanceDefinition, hf_token: str | None) -> int | None:
        spec = defn.instance
        args = [
            "create",
            "instance",
            str(offer_id),
            "--image",
            spec.image,
            "--disk",
            f"{spec.disk_gb:g}",
            "--label",
            spec.label,
            "--ssh",
            "--direct",
            "--env",
            docker_env(spec, hf_token),
            # Fail instead of leaving a stopped instance when the offer was taken meanwhile.
            "--cancel-unavail",
        ]
        if spec.onstart:
            args += ["--onstart-cmd", spec.onstart]
        reply = self._raw(*args, what=f"create instance from offer {offer_id}")
        if reply is None:
            return None
        if not isinstance(reply, dict) or not reply.get("success") or not reply.get("new_contract"):
            msg = reply.get("msg") or reply.get("error") if isinstance(reply, dict) else None
            raise VastError(
                f"create instance from offer {offer_id} failed: {msg or 'no new_contract in the answer'}"
            )
        return int(reply["new_contract"])

    def show_instance(self, contract_id: int) -> dict[str, Any] | None:
        row = self._raw("show", "instance", str(contract_id), what=f"show instance {contract_id}")
        if row is None or (isinstance(row, dict) and "instances" in row and row["instances"] is None):
            return None
        if not isinstance(row, dict):
            raise VastError(f"show instance {contract_id} failed: unexpected answer")
        return row

    def list_instances(self) -> list[dict[str, Any]]:
        rows = self._raw("show", "instances", what="show instances")
        if rows is None:
            return []
        if not isinstance(rows, list):
            raise VastError("show instances failed: expected a list")
        return rows

    def wait_running(
        self,
        contract_id: int | None,
        timeout_s: float,
        interval_s: float,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> dict[str, Any] | None:
        """Poll until actual_status is running; fail fast on statuses that do not recover."""
        if self.runner.dry_run:
            shown = str(contract_id) if contract_id else "<new_contract>"
            self.runner.run(self._cmd("show", "instance", shown, "--raw"))
            return None
        deadline = clock() + timeout_s
        last = None
        errors = 0
        while True:
            assert contract_id is not None
            try:
                row = self.show_instance(contract_id)
                errors = 0
            except VastError as exc:
                # The instance exists and is billed: ride out a passing API error or two.
                errors += 1
                if errors >= 3 or clock() >= deadline:
                    raise
                self.runner.say(f"warning: {exc}; retrying", err=True)
                sleep(interval_s)
                continue
            status = (row or {}).get("actual_status") or "created"
            msg = ((row or {}).get("status_msg") or "").strip()
            if (status, msg) != last:
                self.runner.say(f"instance {contract_id}: {status}" + (f" ({msg})" if msg else ""), err=True)
                last = (status, msg)
            if status == "running" and row is not None:
                return row
            if status in DEAD_STATUSES:
                raise VastError(
                    f"instance {contract_id} is '{status}' and will not start"
                    + (f": {msg}" if msg else "")
                    + f". See `make check-logs-tritonserver CONTRACT_ID={contract_id} SOURCE=vast`, then"
                    f" `make destroy-instance CONTRACT_ID={contract_id}` to stop paying for it."
                )
            if clock() >= deadline:
                raise VastError(
                    f"instance {contract_id} still '{status}' after {timeout_s:g} s (image pull can be slow;"
                    f" raise instance.wait_timeout_s or TIMEOUT=). It is still billed: check it with"
                    f" `make list-instances`, or `make destroy-instance CONTRACT_ID={contract_id}`."
                )
            sleep(interval_s)

    def ssh_target(self, contract_id: int) -> SshTarget:
        result = self._run("ssh-url", str(contract_id), timeout=60)
        if self.runner.dry_run:
            # Placeholders keep the printed ssh/scp lines readable.
            return SshTarget("root", f"<ssh-host-of-{contract_id}>", 0)
        out = result.stdout.strip().splitlines()
        url = out[-1].strip() if out else ""
        error = _error_from(result.returncode, "[]", result.stderr)
        if error and error.startswith(UNREACHABLE):
            raise VastError(f"ssh-url of instance {contract_id} failed: {error}")
        if error or not url.startswith("ssh://"):
            said = self.runner.mask(url or error or "nothing")
            raise VastError(
                f"no ssh address for instance {contract_id} (vastai ssh-url said: {said}). Is it running? "
                f"Check `make list-instances`; a fresh instance needs a minute after 'running'."
            )
        return SshTarget.parse(url)

    def logs(self, contract_id: int, tail: int) -> str:
        result = self._run("logs", str(contract_id), "--tail", str(tail))
        if self.runner.dry_run:
            return ""
        error = _error_from(result.returncode, "[]", result.stderr)
        if error:
            raise VastError(f"logs of instance {contract_id} failed: {self.runner.mask(error)}")
        return result.stdout

    def destroy(self, contract_id: int) -> None:
        # Not --raw: in 1.9.1 `destroy instance --raw` prints nothing even on success.
        result = self._run("destroy", "instance", str(contract_id), "-y")
        if self.runner.dry_run:
            return
        error = _error_from(result.returncode, result.stdout, result.stderr)
        if error is None and "destroying instance" not in result.stdout:
            error = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else "no confirmation"
        if error:
            raise VastError(f"destroy instance {contract_id} failed: {self.runner.mask(error)}")


def _error_from(returncode: int, stdout: str, stderr: str) -> str | None:
    """vastai's failure, if any, as one line. HTTP errors exit 0, so stderr must be read too."""
    err = stderr.strip()
    for line in err.splitlines():
        line = line.strip()
        if line.startswith("{") and '"error"' in line:
            try:
                payload = json.loads(line)
            except json.JSONDecodeError:
                continue
            code = payload.get("status_code")
            return f"HTTP {code}: {payload.get('msg') or 'no detail'}" if code else str(payload.get("msg"))
        if line.startswith("Failed with error"):
            return line.removeprefix("Failed with error ").strip()
    if returncode != 0:
        last = err.splitlines()[-1] if err else f"exit status {returncode}"
        if "ConnectionError" in err or "Max retries exceeded" in err:
            return unreachable_message(last)
        return last
    if not stdout.strip():
        return err.splitlines()[-1] if err else "vastai printed nothing"
    return None


UNREACHABLE = "cannot reach the Vast.ai API"


def unreachable_message(line: str) -> str:
    """requests' one-line ConnectionError, shortened to the host and the cause."""
    host = re.search(r"host='([^']+)', port=(\d+)", line)
    cause = re.search(r"Caused by (\w+)\(", line)
    errno = re.search(r"\[Errno -?\d+\] ([^)\"']+)", line)
    exc = re.match(r"^([\w.]+):", line)
    what = cause[1] if cause else exc[1].rsplit(".", 1)[-1] if exc else "connection error"
    where = f" at {host[1]}:{host[2]}" if host else ""
    why = f": {errno[1].strip()}" if errno else ""
    return f"{UNREACHABLE}{where} ({what}{why})"


def filter_offers(rows: list[dict[str, Any]], defn: InstanceDefinition) -> list[dict[str, Any]]:
    """Re-apply the yaml's filters locally: a defence against a server that ignores one."""
    o = defn.offer
    names = {n.replace("_", " ").lower() for n in o.gpu_names}

    def ok(r: dict[str, Any]) -> bool:
        try:
            return (
                str(r.get("gpu_name", "")).lower() in names
                and float(r.get("gpu_ram") or 0) >= o.min_gpu_ram_gb * 1000
                and float(r.get("cuda_max_good") or 0) >= o.min_cuda_version
                and float(r.get("disk_space") or 0) >= defn.instance.disk_gb
                and float(r.get("reliability") or r.get("reliability2") or 0) >= o.min_reliability
                and (o.max_price_per_hour is None or float(r.get("dph_total") or 0) <= o.max_price_per_hour)
            )
        except (TypeError, ValueError):
            return False

    return [r for r in rows if ok(r)]


def sort_offers(rows: list[dict[str, Any]], order: str) -> list[dict[str, Any]]:
    if order == "reliability":
        return sorted(rows, key=lambda r: (-float(r.get("reliability") or 0), float(r.get("dph_total") or 0)))
    return sorted(rows, key=lambda r: float(r.get("dph_total") or 0))
