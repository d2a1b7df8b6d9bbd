"""Triton admin over HTTP: health, per-model statistics + vLLM token metrics, load-and-wait."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from .runner import Runner

TUNNEL_HINT = "is the tunnel up? run `make ssh-tunnels-tritonserver CONTRACT_ID=…` in another terminal"


def not_triton(client: httpx.Client, base: str) -> str | None:
    """Why the server at base is not Triton, or None: Triton answers GET /v2 with its metadata JSON."""
    resp = client.get(f"{base}/v2")
    meta = _json(resp)
    if resp.status_code == 200 and isinstance(meta, dict) and {"name", "version"} <= meta.keys():
        return None
    ctype = resp.headers.get("content-type", "no content type").split(";")[0]
    status = f"HTTP {resp.status_code} {resp.reason_phrase}".strip()
    return (
        f"{base} is not a Triton server: GET /v2 answered {status} ({ctype}), not Triton's server "
        "metadata; check TRITON_URL"
    )


def _json(resp: httpx.Response) -> Any:
    """The body as JSON, or None when it is not JSON."""
    try:
        return resp.json()
    except ValueError:
        return None


@dataclass
class Health:
    healthy: bool
    lines: list[str] = field(default_factory=list)


def check_health(base_url: str, models: Sequence[str] = (), timeout: float = 5.0) -> Health:
    """Live + ready + every listed model (or every model in the repository index) ready."""
    base = base_url.rstrip("/")
    lines: list[str] = []
    try:
        with httpx.Client(timeout=timeout) as client:
            foreign = not_triton(client, base)
            if foreign:
                return Health(False, [f"NOT healthy: {foreign}"])
            live = client.get(f"{base}/v2/health/live").status_code == 200
            ready = client.get(f"{base}/v2/health/ready").status_code == 200
            lines.append(f"server {base}: live={'yes' if live else 'NO'} ready={'yes' if ready else 'NO'}")
            index_resp = client.post(f"{base}/v2/repository/index", json={})
            index = _json(index_resp) if index_resp.status_code == 200 else []
            states: dict[str, dict[str, Any]] = {
                m["name"]: m
                for m in (index if isinstance(index, list) else [])
                if isinstance(m, dict) and "name" in m
            }
            # Without MODELS: every model Triton tried to load, except those unloaded on purpose.
            wanted = list(models) or sorted(
                n for n, m in states.items() if m.get("state") and m.get("reason") != "unloaded"
            )
            models_ok = True
            for name in wanted:
                ok = client.get(f"{base}/v2/models/{name}/ready").status_code == 200
                info = states.get(name, {})
                state = info.get("state") or ("READY" if ok else "not loaded")
                reason = f" ({info['reason']})" if info.get("reason") else ""
                lines.append(f"  model {name}: {'ready' if ok else 'NOT ready'} [{state}]{reason}")
                models_ok = models_ok and ok
            if not wanted:
                lines.append("  no models loaded (run `make deploy-models-tritonserver`)")
    except httpx.HTTPError as exc:
        return Health(
            False, [f"NOT healthy: cannot reach Triton at {base}: {type(exc).__name__} ({TUNNEL_HINT})"]
        )
    healthy = live and ready and models_ok
    lines.append("healthy" if healthy else "NOT healthy")
    return Health(healthy, lines)


# -- statistics -------------------------------------------------------------------------------


def _avg_ms(stat: dict[str, Any]) -> float | None:
    count = int(stat.get("count", 0))
    return int(stat.get("ns", 0)) / count / 1e6 if count else None


def _fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def vllm_metrics(metrics_text: str) -> dict[str, dict[str, float]]:
    """Per model: prompt/generation token totals and mean TTFT / per-token / end-to-end latency."""
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(metrics_text):
        if not family.name.startswith("vllm:"):
            continue
        for sample in family.samples:
            model = sample.labels.get("model", "?")
            slot = out.setdefault(model, {})
            slot[sample.name] = slot.get(sample.name, 0.0) + float(sample.value)
    return out


def format_stats(stats: dict[str, Any], metrics: dict[str, dict[str, float]]) -> list[str]:
    header = (
        f"{'model':34} {'ver':>3} {'ok':>8} {'failed':>6} {'queue ms':>9} {'infer ms':>9} "
        f"{'prompt tok':>11} {'gen tok':>10} {'ttft ms':>8} {'tpot ms':>8}"
    )
    lines = [header, "-" * len(header)]
    for m in stats.get("model_stats", []):
        name = m.get("name", "?")
        inf = m.get("inference_stats", {})
        ok = int(inf.get("success", {}).get("count", 0))
        failed = int(inf.get("fail", {}).get("count", 0))
        vm = metrics.get(name, {})

        def mean(prefix: str, vm: dict[str, float] = vm) -> str:
            count = vm.get(f"{prefix}_count", 0.0)
            return f"{vm.get(f'{prefix}_sum', 0.0) / count * 1000:.1f}" if count else "-"

        prompt = vm.get("vllm:prompt_tokens_total")
        gen = vm.get("vllm:generation_tokens_total")
        lines.append(
            f"{name:34} {m.get('version', ''):>3} {ok:>8} {failed:>6} {_fmt_ms(_avg_ms(inf.get('queue', {}))):>9} "
            f"{_fmt_ms(_avg_ms(inf.get('success', {}))):>9} "
            f"{'-' if prompt is None else int(prompt):>11} {'-' if gen is None else int(gen):>10} "
            f"{mean('vllm:time_to_first_token_seconds'):>8} {mean('vllm:time_per_output_token_seconds'):>8}"
        )
    if len(lines) == 2:
        lines.append("(no models loaded)")
    lines.append(
        "ok/failed: requests; queue/infer ms: mean per request; prompt/gen tok: vLLM token totals; "
        "ttft/tpot: mean time to first token / per output token (vLLM)"
    )
    return lines


def model_stats(base_url: str, metrics_url: str, timeout: float = 5.0) -> tuple[list[str], bool]:
    """Readable stats table; the bool is False when Triton itself could not be read."""
    base = base_url.rstrip("/")
    try:
        with httpx.Client(timeout=timeout) as client:
            foreign = not_triton(client, base)
            if foreign:
                return [f"cannot read statistics: {foreign}"], False
            resp = client.get(f"{base}/v2/models/stats")
            resp.raise_for_status()
            stats = _json(resp)
            if not isinstance(stats, dict):
                return [f"cannot read statistics from {base}: /v2/models/stats is not JSON"], False
            notes: list[str] = []
            try:
                mresp = client.get(metrics_url)
                mresp.raise_for_status()
                metrics = vllm_metrics(mresp.text)
                if not metrics:
                    notes.append('no vllm:* metrics (is REPORT_CUSTOM_METRICS "true" in config.pbtxt?)')
            except httpx.HTTPError as exc:
                metrics = {}
                notes.append(f"metrics unavailable at {metrics_url}: {type(exc).__name__}")
            except ValueError:
                # prometheus_client's parser rejects anything that is not the text format.
                metrics = {}
                notes.append(
                    f"metrics unavailable: {metrics_url} is not Prometheus text (check TRITON_METRICS_URL)"
                )
    except httpx.HTTPError as exc:
        return [f"cannot read statistics from {base}: {type(exc).__name__} ({TUNNEL_HINT})"], False
    return [*format_stats(stats, metrics), *notes], True


# -- deploy --------------------------------------------------------------------------------------


def load_models(
    base_url: str,
    models: Sequence[str],
    runner: Runner,
    *,
    timeout_s: float = 1800.0,
    poll_s: float = 2.0,
    clock: Callable[[], float] = time.monotonic,
) -> bool:
    """Load each model through the repository API, then wait for /ready. True if all are ready."""
    base = base_url.rstrip("/")
    if runner.dry_run:
        for name in models:
            runner.say(f"DRY_RUN: POST {base}/v2/repository/models/{name}/load")
            runner.say(f"DRY_RUN: GET {base}/v2/models/{name}/ready (until 200, up to {timeout_s:g} s)")
        return True
    all_ok = True
    # The load call blocks while vLLM downloads and warms up: only the connect must be quick.
    with httpx.Client(timeout=httpx.Timeout(timeout_s, connect=10.0)) as client:
        try:
            foreign = not_triton(client, base)
        except httpx.HTTPError as exc:
            runner.say(f"FAILED: cannot reach Triton at {base}: {type(exc).__name__} ({TUNNEL_HINT})")
            return False
        if foreign:
            runner.say(f"FAILED: {foreign}")
            return False
        for name in models:
            start = clock()
            runner.say(f"loading {name} …")
            try:
                resp = client.post(f"{base}/v2/repository/models/{name}/load", json={})
            except httpx.HTTPError as exc:
                runner.say(
                    f"  {name}: FAILED: cannot reach Triton at {base}: {type(exc).__name__} ({TUNNEL_HINT})"
                )
                return False
            if resp.status_code != 200:
                runner.say(f"  {name}: FAILED to load: {_error_text(resp)}")
                all_ok = False
                continue
            ready = False
            while clock() - start < timeout_s:
                try:
                    ready = client.get(f"{base}/v2/models/{name}/ready").status_code == 200
                except httpx.HTTPError:
                    ready = False
                if ready:
                    break
                time.sleep(poll_s)
            if ready:
                runner.say(f"  {name}: ready in {clock() - start:.1f} s")
            else:
                runner.say(f"  {name}: NOT ready after {timeout_s:g} s (see `make check-logs-tritonserver`)")
                all_ok = False
    return all_ok


def _error_text(resp: httpx.Response) -> str:
    body = _json(resp)
    if isinstance(body, dict) and "error" in body:
        return str(body["error"])
    return resp.text.strip()[:500] or f"HTTP {resp.status_code}"
