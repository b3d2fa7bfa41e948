"""Printing a benchmark's figures next to their goals (shared by the benchmarks)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TextIO


def report(
    results: Mapping[str, Mapping[str, float]],
    goals: Mapping[str, float],
    out: TextIO,
    *,
    higher_is_better: Callable[[str], bool],
) -> bool:
    """Given figures by section, the goals by figure name and which figures must reach their goal from
    below (`higher_is_better(name)`), print one line per figure (with its verdict when it has a goal);
    return True when every goal was met."""
    ok = True
    for section, figures in results.items():
        out.write(f"{section}\n")
        for key, value in figures.items():
            goal = goals.get(key)
            verdict = ""
            if goal is not None:
                higher = higher_is_better(key)
                met = value >= goal if higher else value <= goal
                ok &= met
                verdict = f"   goal {'>=' if higher else '<='} {goal:g}: {'met' if met else 'MISSED'}"
            out.write(f"  {key:34} {value:14.3f}{verdict}\n")
        out.flush()
    return ok
