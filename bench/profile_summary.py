"""`python -m bench.profile_summary FILE... [--cpu-ms-per-job X] [--top 25]`: aggregate py-spy raw
(collapsed) stacks by function.

Each line of a py-spy ``-f raw`` file is ``frame;frame;...;leaf COUNT`` with frames ``func (file:line)``.
Functions are keyed by ``func (file)`` (line numbers dropped). Reported:

- the samples split into: Python code on CPU; a thread waiting for Postgres (psycopg's wait loop: a round
  trip); native (the uvloop loop: epoll wait or C-level I/O; a thread whose target is C; a coroutine
  frame at its ``def`` line, i.e. not running); idle (a thread parked in a queue/condition/selector/lock
  wait, recognised by the leaf's function or source line: py-spy's own idle detection misses many);
- per function, **self** % (the function is the leaf: its own code) and **total** % (on the stack:
  the function and what it calls), of the on-CPU samples; and per deepest app/ or worker/ function
  (which of the project's functions the CPU and the DB waits are spent under);
- per component (psycopg, SQLAlchemy, FastAPI/Starlette, pydantic, Celery/kombu, redis, asyncio, gRPC,
  logging, app/worker code …), by self samples;
- with ``--cpu-ms-per-job`` (the component's measured CPU ms per job from the benchmark's JSON), the
  same shares as ms per job (py-spy samples at a reduced rate under full load: read them as proportions).
"""

from __future__ import annotations

import functools
import re
import sys
from collections import Counter
from pathlib import Path

import typer

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

# Leaves where a thread waits (queue get, condition, selector, sleep): idle, not CPU.
IDLE_LEAVES = (
    "_worker (concurrent/futures/thread.py:81)",
    "Condition.wait",
    "Event.wait",
    "EpollSelector.select",
    "BaseSelector.select",
    "select (",
    "poll (",
    "Queue.get",
    "SimpleQueue.get",
    "_wait_for_tstate_lock",
    "time.sleep",
    "sleep (",
    "WorkerThread.run (anyio/_backends/_asyncio.py:1113)",
    "channel_spin",
    "_next (grpc/_channel.py",
)

COMPONENTS = [
    ("psycopg (DB driver, incl. waiting for Postgres)", ("psycopg/", "psycopg_pool/", "asyncpg/")),
    ("SQLAlchemy", ("sqlalchemy/",)),
    ("pydantic", ("pydantic/", "pydantic_core/")),
    ("FastAPI / Starlette / anyio", ("fastapi/", "starlette/", "anyio/")),
    ("uvicorn / httptools / h11", ("uvicorn/", "httptools/", "h11/")),
    ("Celery / kombu / billiard", ("celery/", "kombu/", "billiard/", "vine/")),
    ("redis client", ("redis/",)),
    ("gRPC / tritonclient / protobuf", ("grpc/", "tritonclient/", "google/protobuf/")),
    ("logging", ("logging/",)),
    ("json", ("json/",)),
    (
        "asyncio / threading / concurrent",
        ("asyncio/", "threading.py", "concurrent/", "selectors.py", "queue.py"),
    ),
    ("app/ (API code)", ("app/",)),
    ("worker/ (worker code)", ("worker/",)),
]


def frame_key(frame: str) -> tuple[str, str]:
    m = FRAME.match(frame)
    if not m:
        return frame, ""
    return f"{m['func']} ({m['file']})", m["file"] or ""


def component(file: str) -> str:
    for name, prefixes in COMPONENTS:
        if any(file.startswith(p) or f"site-packages/{p}" in file for p in prefixes):
            return name
    return "other (stdlib, uuid, datetime, …)"


def is_idle(leaf: str) -> bool:
    return any(marker in leaf for marker in IDLE_LEAVES)


# A thread blocked on a Postgres answer (psycopg's wait loop): a round trip, not CPU.
DB_WAIT_LEAVES = ("Connection.wait (psycopg/", "AsyncConnection.wait (psycopg/", "psycopg/waiting.py")
# The event loop's own native code: with uvloop the whole loop (epoll wait and its C-level I/O
# callbacks) shows as the Python frame that entered it.
LOOP_NATIVE_LEAVES = ("Runner.run (asyncio/runners.py", "run_until_complete (asyncio/base_events.py")
# Wrapper frames on (almost) every stack: left out of the inclusive list.
WRAPPERS = (
    "click/",
    "uvicorn/main.py",
    "uvicorn/_compat.py",
    "uvicorn/server.py",
    "asyncio/runners.py",
    "threading.py",
    "concurrent/futures/thread.py",
    "anyio/_backends/",
    "celery/concurrency/",
    "celery/app/trace.py",
    "celery/bin/",
    "celery/apps/",
    "celery/worker/worker.py",
    "<module>",
    "asyncio/events.py",
    "asyncio/base_events.py",
    "runpy.py",
    "celery/__main__.py",
)
OWN_CODE = ("app/", "worker/")


_SOURCE_DIRS = [Path(p) for p in sys.path if p and Path(p).is_dir()] + [Path.cwd()]


def at_def_line(frame: str) -> bool:
    """A leaf frame whose line is its function's ``def``: a coroutine that is not running (py-spy reads
    the thread's last Python frame while the native uvloop loop runs). Counted as native."""
    return source_line(frame).startswith(("def ", "async def "))


def native_thread(frames: list[str]) -> bool:
    """Only the threading bootstrap on the stack: a thread whose target is C code (gRPC's poller)."""
    return frames[-1].startswith("Thread.run (threading.py") and all("threading.py" in f for f in frames)


IDLE_SOURCE = re.compile(r"(queue\w*\.get\((block=True|timeout=[^)]*)?\)|\.lock\.acquire\(\)|\bwait\()")


@functools.lru_cache(maxsize=4096)
def source_line(frame: str) -> str:
    m = FRAME.match(frame)
    if not m or not m["line"]:
        return ""
    for base in _SOURCE_DIRS:
        path = base / m["file"]
        if path.is_file():
            lines = path.read_text(errors="replace").splitlines()
            n = int(m["line"])
            return lines[n - 1].strip() if 0 < n <= len(lines) else ""
    return ""


def idle_by_source(leaf: str) -> bool:
    """A leaf parked in a C-level blocking call: ``queue.get()``, a lock, a ``wait()``."""
    return bool(IDLE_SOURCE.search(source_line(leaf)))


def own_frame(frames: list[str]) -> str:
    """The deepest frame of the project's own code (app/ or worker/) on the stack."""
    for frame in reversed(frames):
        key, file = frame_key(frame)
        if file.startswith(OWN_CODE) or "/main/app/" in file or "/main/worker/" in file:
            return key
    return "(no app/worker frame)"


def summarize(paths: list[Path], cpu_ms_per_job: float | None, top: int) -> str:
    self_c: Counter[str] = Counter()
    total_c: Counter[str] = Counter()
    comp_c: Counter[str] = Counter()
    own_cpu: Counter[str] = Counter()
    own_db: Counter[str] = Counter()
    idle = db_wait = loop_native = cpu = 0
    for path in paths:
        for raw in path.read_text(errors="replace").splitlines():
            stack, _, count_s = raw.rpartition(" ")
            if not stack or not count_s.isdigit():
                continue
            count = int(count_s)
            # py-spy --subprocesses puts a "process PID:"cmdline"" frame at the root: drop it.
            frames = [f for f in stack.split(";") if not f.startswith("process ")]
            if not frames:  # no Python frame at all: native code (the uvloop loop)
                loop_native += count
                continue
            leaf = frames[-1]
            if any(m in leaf for m in DB_WAIT_LEAVES):
                db_wait += count
                own_db[own_frame(frames)] += count
                continue
            if is_idle(leaf) or idle_by_source(leaf):
                idle += count
                continue
            if any(m in leaf for m in LOOP_NATIVE_LEAVES) or at_def_line(leaf) or native_thread(frames):
                loop_native += count
                continue
            cpu += count
            leaf_key, leaf_file = frame_key(leaf)
            self_c[leaf_key] += count
            comp_c[component(leaf_file)] += count
            own_cpu[own_frame(frames)] += count
            for key, file in {frame_key(f) for f in frames}:
                if not any(w in file or w in key for w in WRAPPERS):
                    total_c[key] += count
    n = idle + db_wait + loop_native + cpu
    out = [
        f"files: {', '.join(str(p) for p in paths)}",
        f"samples: {n}: Python code on CPU {cpu} ({100 * cpu / max(n, 1):.0f} %), "
        f"waiting for Postgres {db_wait} ({100 * db_wait / max(n, 1):.0f} %), "
        f"native (uvloop/epoll, C thread targets, not-running coroutine frames) {loop_native} ({100 * loop_native / max(n, 1):.0f} %), "
        f"idle {idle} ({100 * idle / max(n, 1):.0f} %)",
        "percentages below: of the 'Python code on CPU' samples"
        + (
            f"; ms/job = share x {cpu_ms_per_job} ms/job (the measured CPU, of which the native loop"
            " part is not separated: an upper bound)"
            if cpu_ms_per_job
            else ""
        ),
    ]
    if not cpu:
        return "\n".join(out)

    def fmt(share: float) -> str:
        ms = f"  {share * cpu_ms_per_job:6.2f} ms/job" if cpu_ms_per_job else ""
        return f"{100 * share:5.1f} %{ms}"

    out.append("\nby component (self samples):")
    for name, c in comp_c.most_common():
        out.append(f"  {fmt(c / cpu)}  {name}")
    out.append("\nby the deepest app/ or worker/ function on the stack (CPU samples):")
    for key, c in own_cpu.most_common(top):
        out.append(f"  {fmt(c / cpu)}  {key}")
    out.append(f"\ntop {top} functions by self (leaf) samples:")
    for key, c in self_c.most_common(top):
        out.append(f"  {fmt(c / cpu)}  {key}")
    out.append(f"\ntop {top} functions by total (inclusive) samples (wrappers left out):")
    for key, c in total_c.most_common(top):
        out.append(f"  {fmt(c / cpu)}  {key}")
    if db_wait:
        out.append(
            "\nwaiting for Postgres, by the deepest app/ or worker/ function (% of the DB-wait samples):"
        )
        for key, c in own_db.most_common(top):
            out.append(f"  {100 * c / db_wait:5.1f} %  {key}")
    return "\n".join(out)


def main(
    files: list[Path],
    cpu_ms_per_job: float | None = typer.Option(
        None, help="Measured CPU ms/job of this component: shares as ms/job."
    ),
    top: int = typer.Option(25, help="How many functions to list."),
) -> None:
    print(summarize(files, cpu_ms_per_job, top))


if __name__ == "__main__":
    if len(sys.argv) == 1:
        sys.argv.append("--help")
    typer.run(main)
