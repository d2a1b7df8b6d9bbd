"""The suite's table and verdict."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from bench.faults.measure import ANSWER_TARGET_S, RECOVERY_TARGET_S, Figures, guarantee_broken, secs


def _refused(f: Figures) -> str:
    total = sum(f.refused.values())
    if not total:
        return "0"
    return f"{total} (" + ", ".join(f"{k}: {v}" for k, v in sorted(f.refused.items())) + ")"


def table(all_figures: list[Figures], title: str) -> Table:
    t = Table(title=title, title_justify="left")
    for name, justify in [
        ("scenario", "left"),
        ("submitted", "right"),
        ("accepted", "right"),
        ("refused", "left"),
        ("completed", "right"),
        ("failed", "right"),
        ("lost", "right"),
        ("finished twice", "right"),
        ("all terminal after", "right"),
        ("slowest recovery (jobs hit)", "right"),
        ("slowest answer", "right"),
        ("generations (jobs >1)", "right"),
    ]:
        t.add_column(name, justify=justify)  # type: ignore[arg-type]
    for f in all_figures:
        lost = f"[red]{f.lost}[/]" if f.lost else "0"
        twice = f"[red]{f.twice}[/]" if f.twice else "0"
        gens = "-" if f.generations is None else f"{f.generations} ({f.regenerated})"
        answer = "-"
        if f.name == "postgres":
            answer = secs(f.slowest_answer_s) + (
                f" ({f.slow_answers} > {ANSWER_TARGET_S:.0f} s)" if f.slow_answers else ""
            )
        if f.name == "malformed":
            answer = f"{f.extra_requests} sent: {f.errors_5xx} 5xx, {f.no_answer} unanswered"
        t.add_row(
            f.title,
            str(f.submitted),
            str(f.accepted),
            _refused(f),
            str(f.completed),
            f"[yellow]{f.failed}[/]" if f.failed else "0",
            lost,
            twice,
            secs(f.drained_after_s),
            f"{secs(f.recovery_s)} ({f.affected})" if f.affected else "-",
            answer,
            gens,
        )
    return t


def verdict(console: Console, all_figures: list[Figures], *, targets_fail: bool) -> int:
    """Prints what was missed; the exit status: 1 if a job was lost or finished twice, 2 if only a
    target was missed (and targets count), else 0."""
    for f in all_figures:
        lines = [*(f"event: {e}" for e in f.events), *(f"failed: {e}" for e in f.fail_errors), *f.notes]
        if lines:
            console.print(f"[bold]{f.title}[/]")
            for line in lines:
                console.print(f"  {line}", highlight=False)
    broken = [(f.title, b) for f in all_figures for b in guarantee_broken(f)]
    missed = [(f.title, m) for f in all_figures for m in f.targets_missed]
    console.print()
    if broken:
        console.print("[bold red]GUARANTEE BROKEN[/] (0 lost and 0 finished twice, in every scenario):")
        for title, line in broken:
            console.print(f"  [red]{title}: {line}[/]")
    else:
        console.print("[bold green]guarantee kept[/]: 0 lost, 0 finished twice in every scenario")
    if missed:
        how = "failing the run" if targets_fail else "reported only, not failing the run (--targets report)"
        console.print(f"[bold yellow]targets missed[/] ({how}):")
        for _, line in missed:
            console.print(f"  [yellow]{line}[/]")
    else:
        console.print(
            f"[green]targets met[/]: worker kill ≤ {RECOVERY_TARGET_S:.0f} s + run time, Triton down 0 failed, "
            f"Postgres down every answer ≤ {ANSWER_TARGET_S:.0f} s, malformed input answered without 5xx "
            "(for the scenarios run)"
        )
    if broken:
        return 1
    return 2 if missed and targets_fail else 0
