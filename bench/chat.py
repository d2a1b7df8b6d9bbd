"""The `chat` scenario: the latency model through `POST /v1/chat/completions` (non-streamed: one
request that answers when the job has ended) against the same conversations rendered with the
model's chat template and sent to Triton directly, i.e. exactly the prompt the platform sends.

Jobs are (prompt, seed) pairs whose rendered conversation generates exactly ``max_tokens`` tokens,
so both modes do the same work; the direct mode is `bench.direct.run_direct` given those prompts."""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cache

from localtriton.engine import simulate

from app.templates import ChatTemplates
from bench.platform import Client, run_clients
from bench.stats import RunResult
from bench.workload import MAX_MODEL_LEN, PROMPTS, SIM_MODELS, Job, JobClock, Phase, Warmup, triton_params


@cache
def _templates() -> ChatTemplates:
    return ChatTemplates([str(SIM_MODELS)])


@dataclass(frozen=True)
class ChatJob(Job):
    """A job whose prompt is its conversation (one user message) rendered by the model's template."""

    model: str = ""

    @property
    def prompt(self) -> str:
        return _rendered(self.model, PROMPTS[self.prompt_index])

    @property
    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": PROMPTS[self.prompt_index]}]


@cache
def _rendered(model: str, text: str) -> str:
    return _templates().render(model, [{"role": "user", "content": text}])


def choose_chat_jobs(model: str, count: int, max_tokens: int) -> list[Job]:
    """``count`` (prompt, seed) pairs whose rendered conversation generates exactly ``max_tokens`` tokens."""
    jobs: list[Job] = []
    seed = 0
    while len(jobs) < count:
        for index in range(len(PROMPTS)):
            job = ChatJob(index, seed, model)
            sim = simulate(job.prompt, triton_params(max_tokens, seed), MAX_MODEL_LEN)
            if sim.finish_reason == "length" and sim.completion_tokens == max_tokens:
                jobs.append(job)
        seed += 1
    return jobs[:count]


def chat_body(phase: Phase, job: ChatJob) -> dict[str, object]:
    """The request: the same sampling parameters as the direct mode's (bench.workload.triton_params)."""
    return {
        "model": phase.model,
        "messages": job.messages,
        "max_tokens": phase.max_tokens,
        "temperature": 1.0,
        "top_p": 1.0,
        "seed": job.seed,
    }


async def run_chat_platform(
    client: Client, phase: Phase, total: int, warmup: Warmup | None = None
) -> RunResult:
    """N virtual clients, each calling /v1/chat/completions one job after another (the call is the
    whole job: created, run and answered; its latency is the job's)."""
    result = RunResult("platform", phase.scenario, phase.model, phase.in_flight, total, poll_mode="openai")
    result.ramp_s = phase.ramp_s
    clock = JobClock(total, warmup)

    async def one_job(i: int) -> None:
        job = phase.jobs[i % len(phase.jobs)]
        assert isinstance(job, ChatJob)
        t0 = time.monotonic()
        r = await client.post("/v1/chat/completions", chat_body(phase, job))
        now = time.monotonic()
        clock.finished(now)
        if r.status_code != 200:
            result.jobs_failed += i >= 0
            result.note_error(f"POST /v1/chat/completions: {r.status_code} {r.text}")
            return
        if i < 0:
            result.warmup_submit_latency_s.append(now - t0)
            return
        clock.last_done = now
        body = r.json()
        tokens = body["usage"]["completion_tokens"]
        result.jobs_completed += 1
        result.job_latency_s.append(now - t0)
        result.tokens += tokens
        if tokens != phase.max_tokens or body["choices"][0]["finish_reason"] != "length":
            result.wrong_length += 1

    await run_clients(phase, clock, result, client.errors, one_job)
    return result
