"""`python -m bench.schedsim`: why the latency scenario's platform throughput sits at ~half the direct
ceiling although the CPU is not saturated — a discrete-event model of the simulated vLLM scheduler
(``nvidia_triton/localtriton/scheduler.py``), no sleeping, runs in a second.

The scheduler does vLLM's (V0, no chunked prefill) thing: a step that admits new sequences is a
*prefill* step of ``prefill_ms`` that only produces the new sequences' first token — every running
sequence stalls for it; otherwise a decode step of ``decode_ms`` advances all running sequences.
So the cost of a job depends on how arrivals line up:

- **direct** (the ceiling): N clients start together, all finish at the same step and resubmit at
  once: one prefill per "generation" of N jobs, then 63 decode steps — lockstep.
- **platform**: a job reaches Triton after submit → queue → worker claim → gRPC, and the next job of the
  same virtual client only after the completion travelled back (DB write, notice, long poll) and the
  client resubmitted. That delay varies from job to job, the lockstep dissolves, and nearly every
  step admits one or a few new sequences: a 20 ms prefill stall between 15 ms decode steps.

The model: N closed-loop clients; after its job finishes at t, a client's next job arrives at
t + d, d drawn from an exponential distribution with mean ``delay_ms`` (0 = direct). Each step also
costs ``step_overhead_ms + per_seq_overhead_us * running`` of engine CPU (calibrated so that the direct
case matches the measured direct latency: ~1.58 s per job at N = 256).

The "no-stall bound" column is N / (engine time at d = 0 + d) / the d = 0 rate: what the closed loop
alone (Little's law: each client waits d between jobs) would allow if the engine kept its lockstep speed;
the gap between it and "vs d=0" is the prefill-stall effect.
"""

from __future__ import annotations

import heapq
import random

import typer


def simulate(
    n: int = 256,
    jobs: int = 4000,
    tokens: int = 64,
    prefill_ms: float = 20.0,
    decode_ms: float = 15.0,
    delay_ms: float = 0.0,
    step_overhead_ms: float = 0.5,
    per_seq_overhead_us: float = 33.0,
    max_num_seqs: int = 256,
    seed: int = 1,
    gate_ms: float = 0.0,
    mixed_prefill: bool = False,
) -> tuple[float, float, float]:
    """Returns (jobs/s, mean job time in the engine in s, share of steps that were prefills)."""
    rng = random.Random(seed)
    t = 0.0
    arrivals: list[float] = [0.0] * n  # heap of arrival times of the next jobs
    heapq.heapify(arrivals)
    waiting: list[float] = []  # arrival times (FIFO)
    running: list[list[float]] = []  # [tokens done, arrival time]
    done = 0
    started = 0
    steps = prefills = 0
    time_in_engine = 0.0
    last_gate = -1e9
    while done < jobs:
        while arrivals and arrivals[0] <= t:
            waiting.append(heapq.heappop(arrivals))
        if not running and not waiting:
            t = arrivals[0]
            continue
        admitted: list[list[float]] = []
        gate_open = t - last_gate >= gate_ms / 1000
        if waiting and not gate_open and not running:  # idle engine: jump to the gate
            t = last_gate + gate_ms / 1000
            gate_open = True
        if gate_open and waiting:
            last_gate = t
        while gate_open and waiting and len(running) + len(admitted) < max_num_seqs and started < jobs:
            admitted.append([0, waiting.pop(0)])
            started += 1
        overhead = step_overhead_ms / 1000 + per_seq_overhead_us / 1e6 * (len(running) + len(admitted))
        steps += 1
        if admitted and prefill_ms > 0 and mixed_prefill:  # chunked prefill: decodes go on
            prefills += 1
            t += max(prefill_ms, decode_ms) / 1000 + overhead
            for seq in running:
                seq[0] += 1
            for seq in admitted:
                seq[0] = 1
            running.extend(admitted)
        elif admitted and prefill_ms > 0:
            prefills += 1
            t += prefill_ms / 1000 + overhead
            for seq in admitted:
                seq[0] = 1
            running.extend(admitted)
        else:
            running.extend(admitted)
            t += decode_ms / 1000 + overhead
            for seq in running:
                seq[0] += 1
        keep = []
        for seq in running:
            if seq[0] >= tokens:
                done += 1
                time_in_engine += t - seq[1]
                delay = rng.expovariate(1000 / delay_ms) if delay_ms > 0 else 0.0
                heapq.heappush(arrivals, t + delay)
            else:
                keep.append(seq)
        running = keep
    return done / t, time_in_engine / done, prefills / steps


def main(
    n: int = typer.Option(256, help="Clients (jobs in flight)."),
    jobs: int = typer.Option(4000, help="Jobs per case."),
    delays: str = typer.Option("0,5,20,50,100,200,500,1000", help="Mean resubmit delays (ms) to try."),
    gate_ms: float = typer.Option(
        0, help="Admit new sequences at most every gate_ms (a worker holding jobs back)."
    ),
    mixed_prefill: bool = typer.Option(False, help="Chunked prefill (vLLM V1): a prefill step also decodes."),
) -> None:
    base, base_t, _ = simulate(n, jobs)
    print(
        f"N = {n}, 64 tokens, 20 ms prefill, 15 ms/decode step (engine overhead calibrated on direct); "
        f"gate {gate_ms:g} ms, {'chunked (mixed) prefill' if mixed_prefill else 'prefill stalls decodes'}"
    )
    print(
        f"{'mean delay ms':>13} {'jobs/s':>8} {'vs d=0':>7} {'s/job in engine':>16} {'prefill steps':>14} "
        f"{'no-stall bound':>15}"
    )
    for d in (float(x) for x in delays.split(",")):
        rate, t_job, pre = simulate(n, jobs, delay_ms=d, gate_ms=gate_ms, mixed_prefill=mixed_prefill)
        # what the closed loop alone would allow if the engine time stayed at the lockstep value
        bound = n / (base_t + d / 1000) / base
        print(f"{d:13.0f} {rate:8.1f} {rate / base:7.3f} {t_job:16.2f} {100 * pre:13.0f}% {bound:15.3f}")


if __name__ == "__main__":
    typer.run(main)
